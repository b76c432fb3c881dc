package sandbox

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoal-project/shoal/internal/testenv"
)

func TestMain(m *testing.M) {
	Init()
	os.Exit(m.Run())
}

// debianRoot extracts the cached Debian root filesystem into a temp dir.
func debianRoot(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for namespaces and overlayfs")
	}
	tarball := testenv.DebianTarball(t)
	dir := t.TempDir()
	out, err := exec.Command("tar", "-xf", tarball, "-C", dir, "--numeric-owner").CombinedOutput()
	if err != nil {
		t.Fatalf("extract: %v\n%s", err, out)
	}
	return dir
}

func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out
}

func TestRun(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	lower := debianRoot(t)
	spec := func(args ...string) (Spec, *bytes.Buffer, *bytes.Buffer) {
		run := t.TempDir()
		up, work := filepath.Join(run, "upper"), filepath.Join(run, "work")
		for _, d := range []string{up, work} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		var o, e bytes.Buffer
		return Spec{Lower: lower, Upper: up, Work: work, Args: args, Stdout: &o, Stderr: &e, Hostname: "shoal-test"}, &o, &e
	}

	s, out, serr := spec("sh", "-c", "echo hello from $(cat /etc/debian_version | cut -c1-2); echo pid=$$; hostname; ls /proc/1/exe >/dev/null && echo proc-ok; echo x > /written; test -c /dev/null && echo dev-ok; exit 3")
	err := Run(t.Context(), s)
	var ee *ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("err = %v, want exit status 3; stderr %s", err, serr)
	}
	for _, want := range []string{"hello from 12", "pid=1", "shoal-test", "proc-ok", "dev-ok"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output %q lacks %q", out.String(), want)
		}
	}
	if _, err := os.Stat(filepath.Join(lower, "written")); err == nil {
		t.Error("a write reached the lower layer")
	}
	if b, err := os.ReadFile(filepath.Join(s.Upper, "written")); err != nil || string(b) != "x\n" {
		t.Errorf("write not in the upper layer: %q, %v", b, err)
	}
	if m := mountsUnder(t, filepath.Dir(s.Upper)); len(m) > 0 {
		t.Errorf("mounts left behind: %v", m)
	}

	s, out, _ = spec("python3", "-c", "import json, http.server; print('ok')")
	if err := Run(t.Context(), s); err != nil || strings.TrimSpace(out.String()) != "ok" {
		t.Errorf("python3: %v, output %q", err, out.String())
	}

	// A command killed from outside (here by its context) leaves no mounts.
	s, _, _ = spec("sleep", "30")
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if err := Run(ctx, s); !errors.As(err, &ee) || ee.ExitCode() != 128+9 {
		t.Errorf("killed command: err = %v", err)
	}
	if m := mountsUnder(t, filepath.Dir(s.Upper)); len(m) > 0 {
		t.Errorf("mounts left behind: %v", m)
	}

	s, _, errOut := spec("no-such-command")
	if err := Run(t.Context(), s); err == nil || !strings.Contains(errOut.String(), "command not found") {
		t.Errorf("missing command: err = %v, stderr %q", err, errOut.String())
	}
	if m := mountsUnder(t, filepath.Dir(s.Upper)); len(m) > 0 {
		t.Errorf("mounts left behind: %v", m)
	}
}
