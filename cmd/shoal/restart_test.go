//go:build linux && !race

// Integration test with a Debian image and daemons in processes of their
// own (SIGKILL is the point): built without the race detector, as the
// other heavy ones.

package main

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestRestartKeepsMounts: a process reads every file of a lazily mounted
// Debian image, checking each against the image, while the daemon serving
// the mount is SIGKILLed and started again, then stopped (SIGTERM) and
// started again, as an upgrade does. Every read succeeds with the right
// bytes; the longest wait between two files is reported and must stay
// under 5 s; the mount keeps its ID, and unmounts cleanly at the end.
func TestRestartKeepsMounts(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: real registry, Debian image, FUSE")
	}
	if os.Geteuid() != 0 {
		testenv.SkipOrFatal(t, "needs root for FUSE")
	}
	ctx := t.Context()
	reg := testenv.StartRegistry(t)
	src := reg.Ref("debian:restart")
	img := testenv.PushDebianImage(t, src)
	if _, err := converter.Convert(ctx, src, "", converter.WithPlainHTTP(true)); err != nil {
		t.Fatal(err)
	}
	want := testenv.ExtractTree(t, img)

	sock, ks := testenv.StartKeeper(t)

	state := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	start := func(name string) *exec.Cmd {
		t.Helper()
		cmd := exec.Command(exe, "daemon", "--state-dir", state, "--plain-http", "--no-p2p", "--keeper-socket", sock, "--log-level", "info")
		cmd.Env = append(os.Environ(), asShoalEnv+"=1")
		return testenv.StartProcess(t, name, cmd)
	}
	dial := func() *daemon.Client {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			c, err := daemon.Dial(ctx, daemon.SocketPath(state))
			if err == nil {
				if _, err = c.Status(ctx); err == nil {
					return c
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("daemon never answered: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	d1 := start("daemon 1")
	mi, err := dial().Mount(ctx, daemon.MountRequest{Ref: src})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(mi.Dir, syscall.MNT_DETACH) })

	// The reader: sha256sum of every regular file, one at a time, so that
	// each file's first read reaches the daemon.
	r := testenv.ReadFiles(t, mi.Dir)
	// And `shoal run` under the daemon: its mount is the daemon's, its
	// container's root an overlay on it, and it unmounts by ID at the end.
	runCmd := exec.Command(exe, "run", "--plain-http", "--state-dir", state, src, "--",
		"/bin/sh", "-c", "cd / && find ./usr -type f -print0 | sort -z | xargs -0 -n 16 sha256sum")
	runCmd.Env = append(os.Environ(), asShoalEnv+"=1")
	rr := testenv.StartReader(t, runCmd)
	const wait = 2 * time.Minute

	r.WaitFiles(t, 300, wait)
	rr.WaitFiles(t, 100, wait)
	var d2, d3 *exec.Cmd
	after := r.Across(t, 0, func() { d1.Process.Kill(); d1.Wait() }, func() { d2 = start("daemon 2") })
	t.Logf("SIGKILL: the next file came %v after the kill", after.Round(time.Millisecond))
	after = r.Across(t, 300, func() {
		d2.Process.Signal(syscall.SIGTERM)
		if err := d2.Wait(); err != nil {
			t.Fatalf("daemon 2 on SIGTERM: %v", err)
		}
	}, func() { d3 = start("daemon 3") })
	c3 := dial()
	t.Logf("SIGTERM and restart: the next file came %v after the stop", after.Round(time.Millisecond))

	if err := rr.Wait(); err != nil {
		t.Fatalf("shoal run failed across the restarts: %v", err)
	}
	rr.CheckTreeUnder(t, want, "usr/")
	t.Logf("shoal run read %d files across the restarts; longest wait between two files %v", rr.Files(), rr.LongestGap().Round(time.Millisecond))
	if err := r.Wait(); err != nil {
		t.Fatalf("the reader failed across the restarts: %v", err)
	}
	r.CheckTree(t, want)
	worst := r.LongestGap()
	t.Logf("%d files read across a SIGKILL and a SIGTERM restart; longest wait between two files %v", r.Files(), worst.Round(time.Millisecond))
	if worst > 5*time.Second {
		t.Errorf("reads paused %v across a restart, want at most 5 s", worst)
	}

	st, err := c3.Status(ctx)
	if err != nil || len(st.Mounts) != 1 || st.Mounts[0].ID != mi.ID || st.Mounts[0].Dir != mi.Dir {
		t.Fatalf("status after the restarts: %+v, %v; want the mount %s at %s", st.Mounts, err, mi.ID, mi.Dir)
	}
	if _, err := c3.Unmount(ctx, daemon.UnmountRequest{ID: mi.ID}); err != nil {
		t.Fatal(err)
	}
	d3.Process.Signal(syscall.SIGTERM)
	if err := d3.Wait(); err != nil {
		t.Fatalf("daemon 3 on SIGTERM: %v", err)
	}
	if got := ks.Entries(); len(got) != 0 {
		t.Errorf("the keeper still holds %d entries after the unmount", len(got))
	}
}
