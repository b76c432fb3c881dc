// Package sandbox runs a command inside an image's root filesystem: a
// writable overlayfs upper over a read-only lower (the lazy mount), in a new
// mount and PID namespace with its own /proc, a minimal /dev and a read-only
// /sys, and the image as its root.
//
// The command runs in a re-executed copy of the current binary (the reexec
// pattern of Docker and runc): the parent starts /proc/self/exe with
// CLONE_NEWNS|CLONE_NEWPID, the child — PID 1 of the new namespace — makes
// the mounts, pivots into the overlay and execs the command. Every mount the
// child makes lives in its private mount namespace, so the kernel removes them
// all when the namespace dies, however the command ends (exit, signal, kill
// -9 of the parent): nothing is left behind for the caller to clean but the
// upper directory, which it owns.
//
// Binaries that use it call Init first thing in main (and in TestMain).
package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// initArg is argv[0] of the re-executed child.
const initArg = "shoal-sandbox-init"

// Spec is what to run and where.
type Spec struct {
	Lower    string   // read-only root filesystem (e.g. the lazy FUSE mount)
	Upper    string   // empty directory for the writable layer (kept by the caller)
	Work     string   // empty directory on the same filesystem as Upper
	Args     []string // command and arguments, looked up in the image's PATH
	Env      []string // environment (default: a standard PATH)
	Dir      string   // working directory inside the image (default "/")
	Hostname string

	Stdin  io.Reader `json:"-"`
	Stdout io.Writer `json:"-"`
	Stderr io.Writer `json:"-"`
}

// ExitError reports a command that ran and exited non-zero or by a signal.
type ExitError struct {
	Code   int
	Signal syscall.Signal
}

func (e *ExitError) Error() string {
	if e.Signal != 0 {
		return fmt.Sprintf("command killed by signal %v", e.Signal)
	}
	return fmt.Sprintf("command exited with status %d", e.Code)
}

// ExitCode is the shell's view of the status: the code, or 128+signal.
func (e *ExitError) ExitCode() int {
	if e.Signal != 0 {
		return 128 + int(e.Signal)
	}
	return e.Code
}

// Run runs spec.Args in the sandbox and waits for it. A non-zero exit is an
// *ExitError; other errors mean the sandbox could not be set up. Cancelling
// ctx kills the command (and with it the namespace and its mounts).
func Run(ctx context.Context, spec Spec) error {
	if len(spec.Args) == 0 {
		return errors.New("sandbox: no command")
	}
	for _, d := range []string{spec.Lower, spec.Upper, spec.Work} {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("sandbox: %q is not an absolute path", d)
		}
	}
	if spec.Env == nil {
		spec.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}
	}
	if spec.Dir == "" {
		spec.Dir = "/"
	}
	cfg, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("sandbox: find own binary: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, self)
	cmd.Args = []string{initArg}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = spec.Stdin, spec.Stdout, spec.Stderr
	cmd.ExtraFiles = []*os.File{r}
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC,
		Pdeathsig:  syscall.SIGKILL,
	}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return fmt.Errorf("sandbox: start: %w", err)
	}
	r.Close()
	_, werr := w.Write(cfg)
	w.Close()
	err = cmd.Wait()
	if werr != nil && err == nil {
		return fmt.Errorf("sandbox: send config: %w", werr)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		ws, _ := ee.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			return &ExitError{Signal: ws.Signal()}
		}
		if ws.ExitStatus() == setupFailed {
			return errors.New("sandbox: setting up the container failed (see the message above)")
		}
		return &ExitError{Code: ws.ExitStatus()}
	}
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	return nil
}

// setupFailed is the child's exit status when it could not build the sandbox.
const setupFailed = 125

// Init must be called at the start of main. In the re-executed child it sets
// up the sandbox and execs the command (never returning); elsewhere it
// returns at once.
func Init() {
	if len(os.Args) == 0 || os.Args[0] != initArg {
		return
	}
	if err := child(); err != nil {
		fmt.Fprintf(os.Stderr, "shoal: sandbox: %v\n", err)
		os.Exit(setupFailed)
	}
}

func child() error {
	f := os.NewFile(3, "config")
	var spec Spec
	if err := json.NewDecoder(f).Decode(&spec); err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	f.Close()
	// Nothing we mount may propagate back to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	root := filepath.Join(filepath.Dir(spec.Upper), "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", spec.Lower, spec.Upper, spec.Work)
	if err := unix.Mount("overlay", root, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay (%s): %w", opts, err)
	}
	mounts := []struct {
		src, dst, typ string
		flags         uintptr
		data          string
	}{
		{"proc", "proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_RDONLY, ""},
		{"tmpfs", "dev", "tmpfs", unix.MS_NOSUID, "mode=755,size=65536k"},
		{"tmpfs", "tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	}
	for _, m := range mounts {
		dst := filepath.Join(root, m.dst)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, dst, m.typ, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on /%s: %w", m.typ, m.dst, err)
		}
	}
	// A minimal /dev: bind the host's harmless character devices.
	for _, d := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		dst := filepath.Join(root, "dev", d)
		if err := os.WriteFile(dst, nil, 0o666); err != nil {
			return err
		}
		if err := unix.Mount("/dev/"+d, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind /dev/%s: %w", d, err)
		}
	}
	for _, l := range [][2]string{{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"}} {
		_ = os.Symlink(l[0], filepath.Join(root, "dev", l[1]))
	}
	if err := os.MkdirAll(filepath.Join(root, "dev", "shm"), 0o1777); err != nil {
		return err
	}
	if spec.Hostname != "" {
		_ = unix.Sethostname([]byte(spec.Hostname))
	}
	// pivot_root into the overlay, then drop the old root.
	old := filepath.Join(root, ".oldroot")
	if err := os.MkdirAll(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(root, old); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.oldroot", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	_ = os.Remove("/.oldroot")
	if err := unix.Chdir(spec.Dir); err != nil {
		return fmt.Errorf("chdir %s: %w", spec.Dir, err)
	}
	path, err := lookPath(spec.Args[0], spec.Env)
	if err != nil {
		return err
	}
	return unix.Exec(path, spec.Args, spec.Env)
}

// lookPath resolves a command name against the PATH in env, inside the image.
func lookPath(name string, env []string) (string, error) {
	if filepath.IsAbs(name) || filepath.Base(name) != name {
		return name, nil
	}
	pathVar := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if len(kv) > 5 && kv[:5] == "PATH=" {
			pathVar = kv[5:]
		}
	}
	for _, dir := range filepath.SplitList(pathVar) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: command not found in the image's PATH", name)
}
