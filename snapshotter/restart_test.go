//go:build linux && !race

package snapshotter_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/snapshotter"
)

// daemonHelperEnv makes the test binary run a daemon with the
// daemon.Config in its value (JSON) until SIGTERM: a daemon in a process
// of its own, that TestContainerdRestart can SIGKILL.
const daemonHelperEnv = "SHOAL_TEST_DAEMON_CONFIG"

func TestMain(m *testing.M) {
	if v := os.Getenv(daemonHelperEnv); v != "" {
		os.Exit(runDaemonHelper(v))
	}
	os.Exit(m.Run())
}

func runDaemonHelper(config string) int {
	var cfg daemon.Config
	if err := json.Unmarshal([]byte(config), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	d, err := daemon.New(cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := d.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TestContainerdRestart: a container started by containerd and runc from a
// converted Debian image, through the Shoal snapshotter, reads every file
// under /usr once (sha256sum) while the daemon is SIGKILLed and started
// again, then stopped (SIGTERM) and started again. The container exits 0,
// every file reads right, and reads never pause more than 5 s.
func TestContainerdRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd with the Debian image")
	}
	if os.Geteuid() != 0 {
		testenv.SkipOrFatal(t, "needs root for containerd and FUSE")
	}
	ctx := t.Context()
	reg := testenv.StartRegistry(t)
	ref := reg.Ref("debian:restart")
	img := testenv.PushDebianImage(t, ref)
	if _, err := converter.Convert(ctx, ref, "", converter.WithPlainHTTP(true)); err != nil {
		t.Fatal(err)
	}
	want := testenv.ExtractTree(t, img)

	ksock, _ := testenv.StartKeeper(t)

	sockDir, err := os.MkdirTemp("", "shoal-sn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "sn.sock")
	state := t.TempDir()
	// The last daemon leaves its mounts to the keeper, which lets them go
	// when the test ends: detach them before the directory is removed.
	t.Cleanup(func() {
		for _, m := range testenv.MountsUnder(state) {
			syscall.Unmount(m, syscall.MNT_DETACH)
		}
	})
	cfg, err := json.Marshal(daemon.Config{StateDir: state, PlainHTTP: true, P2P: daemon.P2PConfig{Disabled: true},
		Snapshotter: daemon.SnapshotterConfig{Socket: sock}, KeeperSocket: ksock})
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	start := func(name string) (*exec.Cmd, *daemon.Client) {
		t.Helper()
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), daemonHelperEnv+"="+string(cfg))
		testenv.StartProcess(t, name, cmd)
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
			c, err := daemon.Dial(ctx, daemon.SocketPath(state))
			if err == nil {
				if _, err = os.Stat(sock); err == nil {
					return cmd, c
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not come up: %v", name, err)
			}
		}
	}
	d1, _ := start("daemon 1")
	c := testenv.StartContainerd(t, testenv.WithProxySnapshotter(snapshotter.DefaultName, sock))
	res, err := snapshotter.Pull(ctx, ref, snapshotter.PullOptions{Address: c.Address, Namespace: c.Namespace, PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.StartReader(t, c.Ctr(ctx, "run", "--rm", "--snapshotter", snapshotter.DefaultName, res.Name, "reader",
		"/bin/sh", "-c", "cd / && find ./usr -type f -print0 | sort -z | xargs -0 -n 16 sha256sum"))
	const wait = 2 * time.Minute

	r.WaitFiles(t, 300, wait)
	var d2, d3 *exec.Cmd
	var c3 *daemon.Client
	after := r.Across(t, 0, func() { d1.Process.Kill(); d1.Wait() }, func() { d2, _ = start("daemon 2") })
	t.Logf("SIGKILL: the container's next file came %v after the kill", after.Round(time.Millisecond))
	after = r.Across(t, 300, func() {
		d2.Process.Signal(syscall.SIGTERM)
		if err := d2.Wait(); err != nil {
			t.Fatalf("daemon 2 on SIGTERM: %v", err)
		}
	}, func() { d3, c3 = start("daemon 3") })
	t.Logf("SIGTERM and restart: the container's next file came %v after the stop", after.Round(time.Millisecond))

	if err := r.Wait(); err != nil {
		t.Fatalf("the container failed across the restarts: %v", err)
	}
	r.CheckTreeUnder(t, want, "usr/")
	worst := r.LongestGap()
	t.Logf("the container read %d files across a SIGKILL and a SIGTERM restart; longest wait between two files %v", r.Files(), worst.Round(time.Millisecond))
	if worst > 5*time.Second {
		t.Errorf("reads paused %v across a restart, want at most 5 s", worst)
	}
	if st, err := c3.Status(ctx); err != nil || len(st.Mounts) != 1 {
		t.Errorf("daemon 3 holds %+v, %v; want the flat mount", st, err)
	}
	// The snapshotter adopted the mount: the next container starts from it.
	if out, err := c.Ctr(ctx, "run", "--rm", "--snapshotter", snapshotter.DefaultName, res.Name, "again", "/bin/cat", "/etc/debian_version").CombinedOutput(); err != nil {
		t.Errorf("a container after the restarts: %v\n%s", err, out)
	}
	d3.Process.Signal(syscall.SIGTERM)
	if err := d3.Wait(); err != nil {
		t.Errorf("daemon 3 on SIGTERM: %v", err)
	}
}
