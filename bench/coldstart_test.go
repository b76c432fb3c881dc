package bench

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/sandbox"
)

// pythonCmd imports two modules of the standard library and prints "ok": a
// start that reads a few MB of a 500 MB image.
var pythonCmd = []string{"python3", "-c", `import json, http.server; print("ok")`}

// shoalRunStats is what `shoal run --stats FILE` writes (cmd/shoal.RunStats).
type shoalRunStats struct {
	BytesFromCache    int64 `json:"bytes_from_cache"`
	BytesFromPeers    int64 `json:"bytes_from_peers"`
	BytesFromRegistry int64 `json:"bytes_from_registry"`
	RegistryWireBytes int64 `json:"registry_wire_bytes"`
	RegistryRequests  int64 `json:"registry_requests"`
	BlocksFetched     int64 `json:"blocks_fetched"`
	ImageBytes        int64 `json:"image_bytes"`
	BytesRead         int64 `json:"bytes_read"`
	MountMS           int64 `json:"mount_ms"`
	RunMS             int64 `json:"run_ms"`
	ExitCode          int   `json:"exit_code"`
}

// TestBenchColdStartPython: time to "ok" of a python3 command in the big
// image (about 500 MB), cold. Shoal: `shoal run` with a fresh state
// directory (no block cached), fetching lazily from the registry. Baseline:
// a standard client's full pull — go-containerregistry fetches every layer
// and unpacks it to a fresh directory — then the same command in the same
// sandbox (sandbox.Run) over that directory. Alternating A B A B.
func TestBenchColdStartPython(t *testing.T) {
	needBench(t)
	needRoot(t)
	bin := buildShoal(t)
	reg := testenv.StartRegistry(t)
	src, img := bigFlat(t, reg, bin)

	var (
		shoalOK, shoalExit, baseOK, baseExit, basePull, speedups []float64
		runs                                                     []shoalRunStats
		basePulled                                               int64
	)
	for i := range pairs() {
		ok, exit, st := runShoalCold(t, localCommand, bin, src)
		shoalOK, shoalExit, runs = append(shoalOK, secs(ok)), append(shoalExit, secs(exit)), append(runs, st)

		bok, bexit, pull, pulled := runBaselineCold(t, src)
		baseOK, baseExit, basePull = append(baseOK, secs(bok)), append(baseExit, secs(bexit)), append(basePull, secs(pull))
		basePulled = pulled
		speedups = append(speedups, secs(bok)/secs(ok))
		t.Logf("pair %d: shoal ok after %v (exit %v, %d B from registry, %d B read); baseline ok after %v (pull+unpack %v, %d B pulled)",
			i, ok.Round(time.Millisecond), exit.Round(time.Millisecond), st.BytesFromRegistry, st.BytesRead,
			bok.Round(time.Millisecond), pull.Round(time.Millisecond), pulled)
	}

	med := func(f func(shoalRunStats) int64) float64 {
		xs := make([]float64, len(runs))
		for i, r := range runs {
			xs[i] = float64(f(r))
		}
		return median(xs)
	}
	imageBytes := float64(runs[0].ImageBytes)
	fromReg := med(func(s shoalRunStats) int64 { return s.BytesFromRegistry })
	wire := med(func(s shoalRunStats) int64 { return s.RegistryWireBytes })
	read := med(func(s shoalRunStats) int64 { return s.BytesRead })
	info := imageInfo(t, src, img)
	info["bytes"] = runs[0].ImageBytes
	writeResult(t, "coldstart-python", map[string]any{
		"runs":    len(shoalOK),
		"image":   info,
		"command": pythonCmd,
		"cold": "each shoal run has a fresh --state-dir (empty block cache); each baseline run unpacks into a fresh directory; " +
			"the kernel page cache is NOT dropped, so it may hold the registry's blob files, the shoal binary and python's files written by a previous baseline unpack",
		"shoal": map[string]any{
			"name":     "shoal run --plain-http --state-dir <fresh> --stats FILE REF -- python3 ... (lazy mount of the flat form, registry only, no peers)",
			"median_s": median(shoalOK), "samples_s": shoalOK,
			"time_to_ok_median_s": median(shoalOK), "time_to_exit_median_s": median(shoalExit), "time_to_exit_samples_s": shoalExit,
			"bytes_from_registry": fromReg, "registry_wire_bytes": wire, "bytes_read": read,
			"bytes_from_peers":                   med(func(s shoalRunStats) int64 { return s.BytesFromPeers }),
			"image_bytes":                        runs[0].ImageBytes,
			"mount_ms":                           med(func(s shoalRunStats) int64 { return s.MountMS }),
			"run_ms":                             med(func(s shoalRunStats) int64 { return s.RunMS }),
			"registry_requests":                  med(func(s shoalRunStats) int64 { return s.RegistryRequests }),
			"registry_wire_bytes_per_image_byte": wire / imageBytes,
			"bytes_from_registry_per_image_byte": fromReg / imageBytes,
			"registry_wire_bytes_per_byte_read":  wire / read,
			"stats_samples":                      runs,
			"stats_note":                         "medians over runs of `shoal run --stats`; bytes_from_registry are uncompressed block bytes, registry_wire_bytes compressed bytes on the wire",
		},
		"baseline": map[string]any{
			"name":     "full pull: go-containerregistry fetches every layer, gunzips and unpacks it to a fresh directory (whiteouts, links, owners, modes, mtimes), then sandbox.Run of the same command over it",
			"median_s": median(baseOK), "samples_s": baseOK,
			"time_to_ok_median_s": median(baseOK), "time_to_exit_median_s": median(baseExit), "time_to_exit_samples_s": baseExit,
			"pull_unpack_median_s": median(basePull), "pull_unpack_samples_s": basePull,
			"registry_bytes":                basePulled,
			"registry_bytes_note":           "compressed layer bytes read from the registry (the sum of the layer sizes)",
			"registry_bytes_per_image_byte": float64(basePulled) / imageBytes,
		},
		"ratio_median": median(speedups),
		"ratio_note":   "speedup: baseline time-to-ok ÷ shoal time-to-ok, per pair, median (above 1: shoal starts faster)",
		"time_note":    "time to ok: from starting the client (exec of shoal run / the pull) to the line \"ok\" on the command's stdout",
	})
}

// commander makes a command: localCommand, or a netlab host's Command.
type commander func(ctx context.Context, name string, args ...string) *exec.Cmd

// localCommand runs a command on this host, stopped gently when ctx ends:
// shoal run unmounts before it exits.
func localCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	return cmd
}

// runShoalCold runs `shoal run [flags]` of pythonCmd with a fresh state
// directory, through command, and returns the time to "ok", the time to
// the process's exit, and its stats.
func runShoalCold(t *testing.T, command commander, bin, ref string, flags ...string) (toOK, toExit time.Duration, st shoalRunStats) {
	t.Helper()
	state, remove := scratchDir(t, "bench-shoal-state-")
	defer func() { remove(); unix.Sync() }()
	statsFile := filepath.Join(state, "stats.json")
	args := append([]string{"run", "--plain-http", "--state-dir", state, "--stats", statsFile}, flags...)
	args = append(append(args, ref, "--"), pythonCmd...)
	cmd := command(t.Context(), bin, args...)
	var stderr syncBuffer
	stdout := &okWriter{}
	cmd.Stdout, cmd.Stderr = stdout, &stderr
	stdout.start = time.Now()
	err := cmd.Run()
	toExit = time.Since(stdout.start)
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", bin, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	if toOK = stdout.okAfter(); toOK == 0 {
		t.Fatalf("shoal run printed no ok line: stdout %q, stderr %q", stdout.String(), stderr.String())
	}
	b, err := os.ReadFile(statsFile)
	if err != nil {
		t.Fatalf("shoal run --stats: %v", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("shoal run --stats: %v\n%s", err, b)
	}
	return toOK, toExit, st
}

// runBaselineCold pulls and unpacks the image to a fresh directory and runs
// the command over it. It returns the time to "ok", to the command's exit,
// and to the end of the unpack, and the compressed bytes pulled.
func runBaselineCold(t *testing.T, ref string) (toOK, toExit, pull time.Duration, pulled int64) {
	t.Helper()
	root, remove := scratchDir(t, "bench-baseline-")
	defer func() { remove(); unix.Sync() }()
	lower, upper, work := filepath.Join(root, "lower"), filepath.Join(root, "upper"), filepath.Join(root, "work")
	stdout := &okWriter{start: time.Now()}
	pulled, cf, err := unpackImage(t.Context(), ref, lower)
	if err != nil {
		t.Fatalf("baseline pull and unpack: %v", err)
	}
	pull = time.Since(stdout.start)
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var stderr syncBuffer
	err = sandbox.Run(t.Context(), sandbox.Spec{Lower: lower, Upper: upper, Work: work, Args: pythonCmd,
		Env: cf.Config.Env, Dir: cf.Config.WorkingDir, Hostname: "shoal", Stdout: stdout, Stderr: &stderr})
	toExit = time.Since(stdout.start)
	if err != nil { // an *sandbox.ExitError or a setup failure
		t.Fatalf("baseline sandbox.Run: %v\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	if toOK = stdout.okAfter(); toOK == 0 {
		t.Fatalf("baseline printed no ok line: stdout %q, stderr %q", stdout.String(), stderr.String())
	}
	return toOK, toExit, pull, pulled
}
