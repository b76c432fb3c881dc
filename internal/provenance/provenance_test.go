package provenance

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

// TestGitDirty: a fresh checkout is clean; an edited or an untracked file
// makes it dirty; a changed results file does not; outside a checkout of
// this module Git fails instead of describing some other repository.
func TestGitDirty(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatalf("git is needed to describe the source tree: %v", err)
	}
	cases := []struct {
		name  string
		edit  func(t *testing.T, dir string)
		dirty bool
	}{
		{"clean", func(*testing.T, string) {}, false},
		{"edited source", func(t *testing.T, dir string) { write(t, dir, "main.go", "package main // changed\n") }, true},
		{"untracked source", func(t *testing.T, dir string) { write(t, dir, "extra.go", "package main\n") }, true},
		{"staged source", func(t *testing.T, dir string) {
			write(t, dir, "main.go", "package main // staged\n")
			run(t, dir, "git", "add", "main.go")
		}, true},
		{"edited bench result", func(t *testing.T, dir string) { write(t, dir, "bench/results/x.json", "{\"v\": 2}\n") }, false},
		{"new simulation result", func(t *testing.T, dir string) { write(t, dir, "simulation/results/new.json", "{}\n") }, false},
		{"ignored file", func(t *testing.T, dir string) { write(t, dir, "bin/shoal", "binary") }, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := checkout(t, "module "+Module+"\n\ngo 1.26\n")
			head := strings.TrimSpace(run(t, dir, "git", "rev-parse", "--short=12", "HEAD"))
			c.edit(t, dir)
			// From a subdirectory, as bench tests run in bench/.
			s, err := Git(t.Context(), filepath.Join(dir, "bench"))
			if err != nil {
				t.Fatal(err)
			}
			if s.Commit != head || s.Dirty != c.dirty {
				t.Errorf("Git = %+v, want commit %s dirty %v", s, head, c.dirty)
			}
		})
	}
	t.Run("other module", func(t *testing.T) {
		t.Parallel()
		dir := checkout(t, "module example.com/other\n")
		if s, err := Git(t.Context(), dir); err == nil {
			t.Errorf("Git in a checkout of another module = %+v, want an error", s)
		}
	})
	t.Run("not a checkout", func(t *testing.T) {
		t.Parallel()
		if s, err := Git(t.Context(), t.TempDir()); err == nil {
			t.Errorf("Git outside a checkout = %+v, want an error", s)
		}
	})
}

// checkout makes a git repository with one commit: go.mod with the given
// text, a source file, a results file and a .gitignore.
func checkout(t *testing.T, gomod string) string {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, "go.mod", gomod)
	write(t, dir, "main.go", "package main\n")
	write(t, dir, "bench/results/x.json", "{\"v\": 1}\n")
	write(t, dir, ".gitignore", "/bin/\n")
	run(t, dir, "git", "init", "-q")
	run(t, dir, "git", "add", ".")
	run(t, dir, "git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "x")
	return dir
}

func write(t *testing.T, dir, name, text string) {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func run(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestFromBuildInfo(t *testing.T) {
	t.Parallel()
	const rev = "0123456789abcdef0123456789abcdef01234567"
	cases := []struct {
		name     string
		bi       debug.BuildInfo
		want     Source
		wantOK   bool
		wantText string
	}{
		{"clean", debug.BuildInfo{Main: debug.Module{Path: Module}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: "false"}}},
			Source{Commit: rev[:12]}, true, rev[:12]},
		{"modified", debug.BuildInfo{Main: debug.Module{Path: Module}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: "true"}}},
			Source{Commit: rev[:12], Dirty: true}, true, rev[:12] + "-dirty"},
		{"not stamped", debug.BuildInfo{Main: debug.Module{Path: Module}}, Source{}, false, ""},
		{"another main module", debug.BuildInfo{Main: debug.Module{Path: "example.com/other"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: rev}}}, Source{}, false, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got, ok := fromBuildInfo(&c.bi)
			if got != c.want || ok != c.wantOK {
				t.Errorf("fromBuildInfo = %+v, %v; want %+v, %v", got, ok, c.want, c.wantOK)
			}
			if ok && got.String() != c.wantText {
				t.Errorf("String() = %q, want %q", got.String(), c.wantText)
			}
		})
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	s := New(Source{Commit: "abc", Dirty: true}, "shoal simulate --nodes 10")
	if s.Commit != "abc-dirty" || !s.Dirty || s.Reproduce != "shoal simulate --nodes 10" {
		t.Errorf("New = %+v", s)
	}
	if d, err := time.Parse(time.RFC3339, s.Date); err != nil || d.Location() != time.UTC || time.Since(d) > time.Hour {
		t.Errorf("Date %q: want now, UTC, RFC 3339 (%v)", s.Date, err)
	}
	if s.Machine.Cores < 1 || s.Machine.Kernel == "" || !strings.HasPrefix(s.Machine.Go, "go") {
		t.Errorf("Machine = %+v", s.Machine)
	}
}

func TestCommand(t *testing.T) {
	t.Parallel()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"shoal", "simulate", "--nodes", "10,100", "--trace", "simulation/testdata/t.json"},
			"shoal simulate --nodes 10,100 --trace simulation/testdata/t.json"},
		{[]string{"go", "test", "-run", "^TestX$", "./bench/"}, "go test -run '^TestX$' ./bench/"},
		{[]string{"echo", "it's", "", "a b"}, `echo 'it'\''s' '' 'a b'`},
	}
	for _, c := range cases {
		if got := Command(c.args); got != c.want {
			t.Errorf("Command(%q) = %s, want %s", c.args, got, c.want)
		}
		// A shell splits it back into the same argv.
		var want strings.Builder
		for _, a := range c.args {
			want.WriteString("[" + a + "]")
		}
		if out := run(t, t.TempDir(), "sh", "-c", "printf '[%s]' "+Command(c.args)); out != want.String() {
			t.Errorf("sh split %s into %s, want %s", Command(c.args), out, want.String())
		}
	}
}
