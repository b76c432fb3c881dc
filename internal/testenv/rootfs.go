//go:build linux

package testenv

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The cached root filesystem tarballs, in CacheDir. scripts/debian-rootfs.sh
// writes them; the names say what they are.
const (
	// DebianTarballName is debootstrap --variant=minbase --include=python3
	// bookworm, tarred with numeric owners and xattrs.
	DebianTarballName = "debian-bookworm-minbase-python3.tar"
	// HostTarballName is the fallback when debootstrap cannot reach a mirror:
	// this host's own binaries, libraries and python3. It is not a Debian
	// install, and tests that use it say so in their log.
	HostTarballName = "host-assembled-python3.tar"
)

// CacheDir is where slow-to-build test data is kept between runs:
// $SHOAL_TESTDATA, or $HOME/.cache/shoal-testdata.
func CacheDir() string {
	if d := os.Getenv("SHOAL_TESTDATA"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "shoal-testdata")
	}
	return filepath.Join(os.TempDir(), "shoal-testdata")
}

// DebianTarball returns the path of the cached Debian root filesystem tarball,
// building it first with scripts/debian-rootfs.sh if it is not there yet (a
// minute or more; CI builds it before the tests). If debootstrap cannot run,
// the script's host-assembled fallback is returned instead, with a log line
// saying so; its file name is HostTarballName. When neither can be had the
// test is skipped, or fails in CI.
func DebianTarball(tb testing.TB) string {
	tb.Helper()
	debian := filepath.Join(CacheDir(), DebianTarballName)
	if fi, err := os.Stat(debian); err == nil && fi.Size() > 0 {
		return debian
	}
	script, err := findScript("debian-rootfs.sh")
	if err != nil {
		SkipOrFatal(tb, "testenv: no cached %s and cannot build it: %v", debian, err)
	}
	if os.Geteuid() != 0 {
		SkipOrFatal(tb, "testenv: no cached %s, and building it needs root: run sudo %s", debian, script)
	}
	tb.Logf("testenv: building %s with %s (debootstrap: a minute or more)", debian, script)
	start := time.Now()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(tb.Context(), "bash", script)
	cmd.Env = append(os.Environ(), "SHOAL_TESTDATA="+CacheDir())
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// On cancellation, SIGTERM to the script and debootstrap alike, so that
	// the script's trap unmounts and removes its half-built tree.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = time.Minute
	if err := cmd.Run(); err != nil {
		SkipOrFatal(tb, "testenv: %s: %v\n%s", script, err, stderr.String())
	}
	path := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(path, '\n'); i >= 0 {
		path = path[i+1:]
	}
	tb.Logf("testenv: %s took %v:\n%s", script, time.Since(start).Round(time.Second), strings.TrimSpace(stderr.String()))
	if filepath.Base(path) == HostTarballName {
		tb.Logf("testenv: WARNING: using %s, assembled from host files, NOT a debootstrap image", path)
	}
	return path
}

// findScript looks for scripts/name in the module root above the working
// directory (go test runs each package in its own directory).
func findScript(name string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, "scripts", name)
			if _, err := os.Stat(p); err != nil {
				return "", err
			}
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory, so no scripts/" + name)
		}
		dir = parent
	}
}
