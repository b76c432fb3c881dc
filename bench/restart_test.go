package bench

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestBenchRestart measures what a daemon restart costs a process reading a
// lazily mounted Debian image (every file once, sha256sum): the time from
// SIGKILL of the daemon to the next file read, with a new daemon started at
// once, and the same for an upgrade in place (SIGTERM, then a daemon from
// another copy of the binary). The baseline, in the same run, alternating:
// the same restart without a keeper, where the reader fails.
func TestBenchRestart(t *testing.T) {
	needBench(t)
	if os.Geteuid() != 0 {
		t.Fatal("needs root for FUSE")
	}
	bin := buildShoal(t)
	upgraded := filepath.Join(t.TempDir(), "shoal-next")
	if b, err := os.ReadFile(bin); err != nil || os.WriteFile(upgraded, b, 0o755) != nil {
		t.Fatalf("copy the binary: %v", err)
	}
	reg := testenv.StartRegistry(t)
	src := reg.Ref("bench/debian:restart")
	img := testenv.PushDebianImage(t, src)
	if out, err := exec.CommandContext(t.Context(), bin, "convert", "--plain-http", src).CombinedOutput(); err != nil {
		t.Fatalf("shoal convert: %v\n%s", err, out)
	}
	want := testenv.ExtractTree(t, img)

	sock := filepath.Join(t.TempDir(), "keeper.sock")
	keeper := exec.Command(bin, "keeper", "--socket", sock)
	keeper.Stderr = testenv.LogWriter(t, "keeper")
	if err := keeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { keeper.Process.Signal(syscall.SIGTERM); keeper.Wait() })

	var kills, upgrades []float64
	keeperFailed, baselineFailed, baselineRuns := 0, 0, 0
	for range pairs() {
		k, u, ok := restartRun(t, bin, upgraded, src, sock, want)
		if !ok {
			keeperFailed++
		} else {
			kills, upgrades = append(kills, k), append(upgrades, u)
		}
		_, _, ok = restartRun(t, bin, upgraded, src, "", want)
		baselineRuns++
		if !ok {
			baselineFailed++
		}
	}
	if keeperFailed > 0 {
		t.Errorf("%d of %d readers failed across restarts with a keeper", keeperFailed, pairs())
	}
	stats := func(v []float64) map[string]any {
		if len(v) == 0 {
			return map[string]any{"runs": 0}
		}
		s := slices.Sorted(slices.Values(v))
		return map[string]any{"runs": len(s), "p50_s": round3(s[len(s)/2]), "max_s": round3(s[len(s)-1]), "all_s": s}
	}
	info := imageInfo(t, src, img)
	info["description"] = "testenv.DebianImage: Debian bookworm minbase + python3"
	writeResult(t, "restart", map[string]any{
		"image": info,
		"what": "a process reads every file of a lazily mounted Debian image once (sha256sum) while the daemon is SIGKILLed and " +
			"started again, then stopped (SIGTERM) and started from another copy of the binary; times are from the signal " +
			"to the next file read",
		"keeper": map[string]any{
			"sigkill_to_next_file":        stats(kills),
			"upgrade_to_next_file":        stats(upgrades),
			"readers_failed":              keeperFailed,
			"readers":                     pairs(),
			"files_per_reader":            countFiles(want),
			"daemon_flags":                "--keeper-socket",
			"daemon_restarted_at_once_by": "the bench (as systemd or the kubelet would)",
		},
		"baseline_no_keeper": map[string]any{
			"readers_failed": baselineFailed,
			"readers":        baselineRuns,
			"note":           "without a keeper the mount dies with the daemon: the reader fails (ENOTCONN) at the SIGKILL",
		},
	})
}

// restartRun is one reader across a SIGKILL and an upgrade, with a keeper
// at sock ("" for none). It returns the two times from signal to next file,
// and whether the reader read every file right.
func restartRun(t *testing.T, bin, upgraded, src, sock string, want testenv.Tree) (kill, upgrade float64, ok bool) {
	t.Helper()
	state := t.TempDir()
	start := func(exe string) *exec.Cmd {
		args := []string{"daemon", "--state-dir", state, "--plain-http", "--no-p2p"}
		if sock != "" {
			args = append(args, "--keeper-socket", sock)
		}
		return testenv.StartProcess(t, "daemon", exec.Command(exe, args...))
	}
	dial := func() *daemon.Client {
		deadline := time.Now().Add(time.Minute)
		for {
			c, err := daemon.Dial(t.Context(), daemon.SocketPath(state))
			if err == nil {
				if _, err = c.Status(t.Context()); err == nil {
					return c
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("daemon never answered: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	d := start(bin)
	mi, err := dial().Mount(t.Context(), daemon.MountRequest{Ref: src})
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(mi.Dir, syscall.MNT_DETACH)
	r := testenv.ReadFiles(t, mi.Dir)
	const wait = 2 * time.Minute
	r.WaitFiles(t, 300, wait)
	at := time.Now()
	d.Process.Kill()
	d.Wait()
	d = start(bin)
	if sock == "" {
		err := r.Wait()
		t.Logf("without a keeper: the reader ended after %d files: %v", r.Files(), err)
		d.Process.Signal(syscall.SIGTERM)
		d.Wait()
		return 0, 0, err == nil && r.Files() == countFiles(want)
	}
	kill = r.WaitFiles(t, r.Files()+1, wait).Sub(at).Seconds()
	upgrade = r.Across(t, 300, func() { d.Process.Signal(syscall.SIGTERM); d.Wait() }, func() { d = start(upgraded) }).Seconds()
	c := dial()
	err = r.Wait()
	r.CheckTree(t, want)
	t.Logf("with a keeper: %d files, next file %.3f s after SIGKILL, %.3f s after SIGTERM; longest gap %v; %v",
		r.Files(), kill, upgrade, r.LongestGap(), err)
	if _, uerr := c.Unmount(t.Context(), daemon.UnmountRequest{ID: mi.ID}); uerr != nil {
		t.Errorf("unmount after the restarts: %v", uerr)
	}
	d.Process.Signal(syscall.SIGTERM)
	d.Wait()
	return kill, upgrade, err == nil && !t.Failed()
}

func countFiles(tr testenv.Tree) int {
	n := 0
	for _, e := range tr {
		if e.Kind == "file" {
			n++
		}
	}
	return n
}

func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }
