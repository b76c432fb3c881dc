//go:build linux

package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ContainerdBinary and CtrBinary are where Debian's containerd package
// installs the daemon and its client; $SHOAL_CONTAINERD_BIN and
// $SHOAL_CTR_BIN override them.
const (
	ContainerdBinary = "/usr/bin/containerd"
	CtrBinary        = "/usr/bin/ctr"
)

// containerdSeq numbers the containerd instances of this process, for
// their namespaces.
var containerdSeq atomic.Int64

const (
	containerdReadyTimeout = 30 * time.Second
	containerdStopTimeout  = 10 * time.Second
)

// Containerd is a containerd daemon a test started with a private
// configuration: its root, state and sockets live in the test's temporary
// directory, the CRI plugin is off (no CNI, no kubelet), and nothing it
// leaves behind (tasks, shims, overlay mounts) outlives the test.
type Containerd struct {
	// Address is the daemon's gRPC socket (ctr -a).
	Address string
	// Dir holds config.toml, root/, state/, the sockets and containerd.log.
	Dir string
	// Root and State are the daemon's root and state directories.
	Root, State string
	// Namespace is the containerd namespace Ctr uses, unique to this
	// instance ("shoal-test-PID-N"): runc names its cgroups and state
	// directories after it, and Stop removes them.
	Namespace string

	// CgroupParent is the cgroup of the CRI plugin's pods (WithCRI), named
	// like Namespace so that Stop removes it with the rest.
	CgroupParent string

	tb     testing.TB
	proc   *Process
	cri    bool   // the CRI plugin runs (WithCRI)
	crictl string // crictl's path, with CRI
	ctrs   atomic.Int64
}

// ContainerdOption configures StartContainerd.
type ContainerdOption func(*containerdConfig)

type containerdConfig struct {
	proxies map[string]string // snapshotter name → socket
	extra   []string
	cri     *CRIOptions // nil: the CRI plugin is off
}

// WithProxySnapshotter registers a remote snapshotter, served over gRPC on
// socket, under name (a proxy_plugins entry of type "snapshot"), so that
// `ctr run --snapshotter name` uses it.
func WithProxySnapshotter(name, socket string) ContainerdOption {
	return func(c *containerdConfig) { c.proxies[name] = socket }
}

// WithConfig appends TOML to containerd's config.toml (version 2 schema),
// e.g. a [plugins."io.containerd.grpc.v1.cri".registry] section or a
// registry config_path. It must not repeat a table StartContainerd writes
// (root, state, [grpc], [ttrpc], [debug], [metrics], [proxy_plugins]).
func WithConfig(toml string) ContainerdOption {
	return func(c *containerdConfig) { c.extra = append(c.extra, toml) }
}

func containerdBinary() string {
	if b := os.Getenv("SHOAL_CONTAINERD_BIN"); b != "" {
		return b
	}
	return ContainerdBinary
}

func ctrBinary() string {
	if b := os.Getenv("SHOAL_CTR_BIN"); b != "" {
		return b
	}
	return CtrBinary
}

// StartContainerd starts Debian's containerd as root on private sockets and
// returns once it answers `ctr version`. At the end of the test it kills
// every task it ran, stops the daemon, kills the shims it spawned, and
// detaches every mount left under its directories. Without containerd,
// runc or root the test is skipped, or fails in CI.
func StartContainerd(tb testing.TB, opts ...ContainerdOption) *Containerd {
	tb.Helper()
	if os.Geteuid() != 0 {
		SkipOrFatal(tb, "testenv: containerd needs root")
	}
	for _, bin := range []string{containerdBinary(), ctrBinary(), "runc", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(bin); err != nil {
			SkipOrFatal(tb, "testenv: %v (apt-get install containerd runc)", err)
		}
	}
	cfg := containerdConfig{proxies: map[string]string{}}
	for _, o := range opts {
		o(&cfg)
	}
	var crictl string
	if cfg.cri != nil {
		crictl = findCrictl(tb)
	}
	// Unix socket paths are limited to 108 bytes; test temporary
	// directories can be long, so the sockets go in a short directory.
	dir := tb.TempDir()
	sockDir, err := os.MkdirTemp("", "ctrd")
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	c := &Containerd{
		Address: filepath.Join(sockDir, "c.sock"), Dir: dir,
		Root: filepath.Join(dir, "root"), State: filepath.Join(dir, "state"), tb: tb,
		Namespace: fmt.Sprintf("shoal-test-%d-%d", os.Getpid(), containerdSeq.Add(1)),
		cri:       cfg.cri != nil, crictl: crictl,
	}
	c.CgroupParent = "/" + c.Namespace
	tb.Cleanup(func() {
		c.Stop()
		_ = os.RemoveAll(sockDir)
	})
	var b strings.Builder
	fmt.Fprintf(&b, "version = 2\nroot = %q\nstate = %q\n", c.Root, c.State)
	// Without WithCRI the tests drive containerd with ctr and the Go
	// client only, and CRI (which wants CNI and a kubelet) is off.
	if cfg.cri == nil {
		b.WriteString("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n")
	}
	fmt.Fprintf(&b, "[grpc]\n  address = %q\n\n[ttrpc]\n  address = %q\n\n", c.Address, c.Address+".ttrpc")
	b.WriteString("[debug]\n  address = \"\"\n  level = \"info\"\n\n[metrics]\n  address = \"\"\n\n")
	fmt.Fprintf(&b, "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = %q\n\n", filepath.Join(dir, "opt"))
	if len(cfg.proxies) > 0 {
		b.WriteString("[proxy_plugins]\n")
		for name, sock := range cfg.proxies {
			fmt.Fprintf(&b, "  [proxy_plugins.%q]\n    type = \"snapshot\"\n    address = %q\n", name, sock)
		}
		b.WriteString("\n")
	}
	if cfg.cri != nil {
		b.WriteString(criConfig(dir, cfg.cri))
		if err := os.WriteFile(filepath.Join(dir, "crictl.yaml"), []byte("timeout: 60\ndebug: false\npull-image-on-create: false\n"), 0o644); err != nil {
			tb.Fatalf("testenv: %v", err)
		}
	}
	for _, e := range cfg.extra {
		b.WriteString(e)
		b.WriteString("\n")
	}
	conf := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(conf, []byte(b.String()), 0o644); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	logf, err := os.Create(c.LogPath())
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	defer logf.Close()
	cmd := exec.Command(containerdBinary(), "--config", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, and killed if the test binary dies. The shims
	// it spawns leave that group (setsid); stop finds them by address.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	c.proc, err = StartLocked(cmd)
	if err != nil {
		tb.Fatalf("testenv: start containerd: %v", err)
	}
	ctx, cancel := context.WithTimeout(tb.Context(), containerdReadyTimeout)
	defer cancel()
	if err := c.waitReady(ctx); err != nil {
		c.logTail()
		tb.Fatalf("testenv: containerd did not come up: %v", err)
	}
	return c
}

// LogPath is containerd's log (stdout and stderr).
func (c *Containerd) LogPath() string { return filepath.Join(c.Dir, "containerd.log") }

// Ctr returns `ctr -a ADDRESS -n NAMESPACE ARGS...`, ready to run.
func (c *Containerd) Ctr(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, ctrBinary(), append([]string{"-a", c.Address, "-n", c.Namespace}, args...)...)
}

// CtrOutput runs ctr with args and returns its standard output; it fails
// the test, with ctr's output, if ctr fails.
func (c *Containerd) CtrOutput(ctx context.Context, args ...string) string {
	c.tb.Helper()
	cmd := c.Ctr(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		c.tb.Fatalf("testenv: ctr %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return string(out)
}

func (c *Containerd) waitReady(ctx context.Context) error {
	var last error
	for {
		if conn, err := net.DialTimeout("unix", c.Address, time.Second); err == nil {
			conn.Close()
			out, err := c.Ctr(ctx, "version").CombinedOutput()
			if err == nil {
				return nil
			}
			last = fmt.Errorf("ctr version: %v: %s", err, bytes.TrimSpace(out))
		} else {
			last = err
		}
		select {
		case <-c.proc.Done:
			return fmt.Errorf("containerd exited: %v", c.proc.Err)
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop kills the tasks, the daemon and its shims, and detaches the mounts
// left under its directories. The test's end does it too; Stop is for a
// test that wants a fresh containerd before then. It is idempotent.
func (c *Containerd) Stop() {
	if c.proc == nil {
		return
	}
	if c.tb.Failed() {
		c.logTail()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	select {
	case <-c.proc.Done:
	default:
		if c.cri {
			c.stopPods(ctx)
		}
		// Tasks first, while the daemon can still reap them properly.
		if out, err := c.Ctr(ctx, "tasks", "list", "-q").Output(); err == nil {
			for _, id := range strings.Fields(string(out)) {
				_ = c.Ctr(ctx, "tasks", "kill", "-s", "SIGKILL", id).Run()
				_ = c.Ctr(ctx, "tasks", "delete", "-f", id).Run()
			}
		}
		_ = syscall.Kill(-c.proc.Cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-c.proc.Done:
		case <-time.After(containerdStopTimeout):
			c.tb.Logf("testenv: containerd ignored SIGTERM for %v; killing it", containerdStopTimeout)
			_ = syscall.Kill(-c.proc.Cmd.Process.Pid, syscall.SIGKILL)
			<-c.proc.Done
		}
	}
	for _, pid := range shimsOf(c.Address) {
		c.tb.Logf("testenv: killing containerd shim %d left behind", pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, dir := range []string{c.State, c.Root} {
		for _, m := range MountsUnder(dir) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
				c.tb.Errorf("testenv: detach %s: %v", m, err)
			}
		}
	}
	// runc leaves the namespace's parent cgroups and state directory.
	cgroups, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", c.Namespace))
	if cg := filepath.Join("/sys/fs/cgroup", c.Namespace); dirExists(cg) {
		cgroups = append(cgroups, cg) // cgroup v2
	}
	for _, cg := range cgroups {
		removeCgroup(cg)
	}
	_ = os.RemoveAll(filepath.Join("/run/containerd/runc", c.Namespace))
	c.proc = nil
}

func dirExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// removeCgroup removes an empty cgroup tree, deepest first (cgroup
// directories go with rmdir; their files are not real).
func removeCgroup(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			removeCgroup(filepath.Join(dir, e.Name()))
		}
	}
	_ = unix.Rmdir(dir)
}

// shimsOf lists the containerd-shim processes started for the daemon at
// address (their command line names it after -address).
func shimsOf(address string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i := range len(args) - 1 {
			if args[i] == "-address" && args[i+1] == address {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// MountsUnder lists the mount points at or below dir, deepest first, as
// /proc/self/mountinfo names them.
func MountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (c *Containerd) logTail() {
	data, err := os.ReadFile(c.LogPath())
	if err != nil || len(bytes.TrimSpace(data)) == 0 {
		return
	}
	const max = 8192
	if len(data) > max {
		data = data[len(data)-max:]
	}
	c.tb.Logf("testenv: containerd log (tail):\n%s", data)
}
