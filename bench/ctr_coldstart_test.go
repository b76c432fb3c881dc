package bench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/snapshotter"
)

// TestBenchCtrColdStart: `ctr run` time to first output ("ok" from
// pythonCmd) of the big image (about 500 MB), cold, through containerd
// (Debian's 1.6, runc) with the Shoal snapshotter against containerd's
// own overlayfs snapshotter, same image, same registry, alternating A B.
// Each run gets a fresh containerd (empty content store and snapshots)
// and, for Shoal, a fresh daemon (empty block cache, registry only). The
// clock starts at the pull: Shoal `shoal pull` then `ctr run --snapshotter
// shoal`; baseline `ctr images pull` (which unpacks into overlayfs) then
// `ctr run`. A counting proxy in front of the registry measures what each
// side pulled.
func TestBenchCtrColdStart(t *testing.T) {
	needBench(t)
	needRoot(t)
	bin := buildShoal(t)
	reg := testenv.StartRegistry(t)
	src, img := bigFlat(t, reg, bin)
	proxy := reg.Proxy(t)
	ref := proxy.Ref(strings.TrimPrefix(src, reg.Host+"/"))

	var (
		shoalOK, shoalPull, baseOK, basePull, speedups []float64
		shoalWire, baseWire, shoalBlocks               []float64
		imageBytes                                     int64
	)
	for i := range pairs() {
		ok, pull, wire, blocks, ib := ctrRunShoal(t, bin, ref, proxy, i)
		shoalOK, shoalPull = append(shoalOK, secs(ok)), append(shoalPull, secs(pull))
		shoalWire, shoalBlocks, imageBytes = append(shoalWire, float64(wire)), append(shoalBlocks, float64(blocks)), ib

		bok, bpull, bwire := ctrRunBaseline(t, ref, proxy, i)
		baseOK, basePull, baseWire = append(baseOK, secs(bok)), append(basePull, secs(bpull)), append(baseWire, float64(bwire))
		speedups = append(speedups, secs(bok)/secs(ok))
		t.Logf("pair %d: shoal ok after %v (pull %v, registry %d B); overlayfs ok after %v (pull %v, registry %d B)",
			i, ok.Round(time.Millisecond), pull.Round(time.Millisecond), wire, bok.Round(time.Millisecond), bpull.Round(time.Millisecond), bwire)
	}
	info := imageInfo(t, src, img)
	info["bytes"] = imageBytes
	writeResult(t, "ctr-coldstart-python", map[string]any{
		"runs":       len(shoalOK),
		"image":      info,
		"command":    pythonCmd,
		"containerd": containerdVersion(),
		"cold": "each run has a fresh containerd (root, state, content store, snapshots) and, for shoal, a fresh daemon state directory (empty block cache); " +
			"the kernel page cache is NOT dropped, so it may hold the registry's blob files and files of a previous run",
		"shoal": map[string]any{
			"name":     "shoal pull --plain-http REF, then ctr run --rm --snapshotter shoal REF id python3 ... (daemon in the bench process, registry only, no peers)",
			"median_s": median(shoalOK), "samples_s": shoalOK,
			"pull_median_s": median(shoalPull), "pull_samples_s": shoalPull,
			"registry_wire_bytes": median(shoalWire), "registry_wire_samples": shoalWire,
			"bytes_from_registry": median(shoalBlocks), "bytes_from_registry_samples": shoalBlocks,
			"bytes_note": "registry_wire_bytes: response bytes the registry served (manifests, config, index, blocks; counting proxy); " +
				"bytes_from_registry: uncompressed block bytes the daemon fetched (its status)",
		},
		"baseline": map[string]any{
			"name":     "ctr images pull --plain-http REF (containerd's overlayfs snapshotter unpacks every layer), then ctr run --rm REF id python3 ...",
			"median_s": median(baseOK), "samples_s": baseOK,
			"pull_median_s": median(basePull), "pull_samples_s": basePull,
			"registry_wire_bytes": median(baseWire), "registry_wire_samples": baseWire,
		},
		"ratio_median": median(speedups),
		"ratio_note":   "speedup: baseline time-to-ok ÷ shoal time-to-ok, per pair, median (above 1: shoal starts faster)",
		"time_note":    "time to ok: from starting the pull to the line \"ok\" on ctr run's stdout",
	})
}

// ctrRunShoal times one cold Shoal start: a fresh daemon and containerd,
// `shoal pull`, `ctr run --snapshotter shoal`. It returns the time to ok
// and to the end of the pull, the bytes the registry served, the block
// bytes the daemon fetched from it, and the image's size.
func ctrRunShoal(t *testing.T, bin, ref string, proxy *testenv.CountingProxy, i int) (toOK, pull time.Duration, wire, blocks, imageBytes int64) {
	t.Helper()
	state, remove := scratchDir(t, "bench-ctr-shoal-")
	defer remove()
	sock := filepath.Join(state, "sn.sock")
	stopDaemon, client := benchDaemon(t, state, sock)
	defer stopDaemon()
	c := testenv.StartContainerd(t, testenv.WithProxySnapshotter(snapshotter.DefaultName, sock))
	defer c.Stop()

	proxy.Reset()
	stdout := &okWriter{start: time.Now()}
	out, err := exec.CommandContext(t.Context(), bin, "pull", "--containerd-address", c.Address, "--namespace", c.Namespace,
		"--plain-http", ref).CombinedOutput()
	if err != nil {
		t.Fatalf("shoal pull: %v\n%s", err, out)
	}
	pull = time.Since(stdout.start)
	ctrRunOK(t, c, stdout, "--snapshotter", snapshotter.DefaultName, ref, fmt.Sprintf("shoal%d", i))
	toOK = stdout.okAfter()
	wire = proxy.BytesServed()
	st, err := client.Status(t.Context())
	if err != nil || len(st.Mounts) != 1 {
		t.Fatalf("daemon status: %v, %+v; want one flat mount", err, st)
	}
	return toOK, pull, wire, st.Mounts[0].Fetch.BytesFromRegistry, st.Mounts[0].ImageBytes
}

// ctrRunBaseline times one cold start with containerd's overlayfs
// snapshotter: a fresh containerd, `ctr images pull`, `ctr run`.
func ctrRunBaseline(t *testing.T, ref string, proxy *testenv.CountingProxy, i int) (toOK, pull time.Duration, wire int64) {
	t.Helper()
	c := testenv.StartContainerd(t)
	defer c.Stop()
	proxy.Reset()
	stdout := &okWriter{start: time.Now()}
	if out, err := c.Ctr(t.Context(), "images", "pull", "--plain-http", ref).CombinedOutput(); err != nil {
		t.Fatalf("ctr images pull: %v\n%s", err, out)
	}
	pull = time.Since(stdout.start)
	ctrRunOK(t, c, stdout, ref, fmt.Sprintf("base%d", i))
	return stdout.okAfter(), pull, proxy.BytesServed()
}

// ctrRunOK runs `ctr run --rm ARGS... pythonCmd` with stdout to w and
// fails unless it printed ok.
func ctrRunOK(t *testing.T, c *testenv.Containerd, w *okWriter, args ...string) {
	t.Helper()
	argv := append(append([]string{"run", "--rm"}, args...), pythonCmd...)
	cmd := c.Ctr(t.Context(), argv...)
	var stderr syncBuffer
	cmd.Stdout, cmd.Stderr = w, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("ctr %s: %v\nstdout: %s\nstderr: %s", strings.Join(argv, " "), err, w.String(), stderr.String())
	}
	if w.okAfter() == 0 {
		t.Fatalf("ctr run printed no ok line: %q, stderr %q", w.String(), stderr.String())
	}
}

// benchDaemon runs a Shoal daemon in this process on state (registry only,
// plain HTTP) with its snapshotter on sock.
func benchDaemon(t *testing.T, state, sock string) (stop func(), c *daemon.Client) {
	t.Helper()
	d, err := daemon.New(daemon.Config{StateDir: state, PlainHTTP: true, P2P: daemon.P2PConfig{Disabled: true},
		Snapshotter: daemon.SnapshotterConfig{Socket: sock}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = daemon.Dial(t.Context(), daemon.SocketPath(state)); err == nil {
			if _, err = os.Stat(sock); err == nil {
				return stop, c
			}
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func containerdVersion() string {
	out, err := exec.Command(testenv.ContainerdBinary, "--version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}
