// Package provenance records where a result came from: the commit of the
// source it was measured with (and whether that source had uncommitted
// changes), when, on what machine, and the command that reproduces it.
// A number without these cannot be checked by anyone else, so every results
// file Shoal writes (bench/results, simulation/results) carries a Stamp.
//
// The commit comes from the running binary's build info when the go command
// stamped it there (go build in a git checkout), because that describes the
// code that actually ran even if the tree has changed since; otherwise from
// git in the working directory; otherwise it is "unknown".
package provenance

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

// Module is the module path of the source tree whose commit a Stamp
// records; git is asked only inside a checkout of it.
const Module = "github.com/shoal-project/shoal"

// Outputs are the directories, relative to the repository root, that hold
// results rather than code. Changes there do not make the tree dirty: a
// benchmark or a sweep writes one results file after another, and each must
// not find the tree dirty because of the one before.
var Outputs = []string{"bench/results", "simulation/results"}

// Stamp is the provenance of one results file. Its fields are meant to sit
// at the top level of the file's JSON.
type Stamp struct {
	// Commit is the short commit hash, with "-dirty" appended when the tree
	// had changes (tracked or untracked, outside Outputs), or "unknown".
	Commit string `json:"commit"`
	// Dirty is set with the "-dirty" suffix, so that a reader need not
	// parse the commit.
	Dirty bool `json:"dirty,omitempty"`
	// Date is when the result was written, UTC, RFC 3339.
	Date      string  `json:"date"`
	Machine   Machine `json:"machine"`
	Reproduce string  `json:"reproduce"`
}

// Machine describes where a result was measured.
type Machine struct {
	Cores  int    `json:"cores"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
}

// Host describes this machine.
func Host() Machine {
	var u syscall.Utsname
	var kernel strings.Builder
	if err := syscall.Uname(&u); err == nil {
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			kernel.WriteByte(byte(c))
		}
	}
	return Machine{Cores: runtime.NumCPU(), Kernel: kernel.String(), Go: runtime.Version()}
}

// Source is the state of the source tree a result was measured with.
type Source struct {
	Commit string // short hash, or "unknown"
	Dirty  bool
}

// String is the commit as a results file records it: the short hash, with
// "-dirty" when the tree had changes.
func (s Source) String() string {
	if s.Dirty {
		return s.Commit + "-dirty"
	}
	return s.Commit
}

// Unknown is the Source when neither the build info nor git says.
var Unknown = Source{Commit: "unknown"}

// shortLen is how many hex digits of a commit hash a Stamp keeps: enough to
// be unique in this repository for a long time, short enough to read.
const shortLen = 12

// Build reads the commit from the running binary's build info; ok is false
// when the go command did not stamp one (go run, go test, -buildvcs=false,
// a git worktree, a build outside a checkout).
func Build() (Source, bool) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Source{}, false
	}
	return fromBuildInfo(bi)
}

func fromBuildInfo(bi *debug.BuildInfo) (Source, bool) {
	if bi.Main.Path != Module {
		return Source{}, false
	}
	var s Source
	for _, kv := range bi.Settings {
		switch kv.Key {
		case "vcs.revision":
			s.Commit = kv.Value
		case "vcs.modified":
			s.Dirty = kv.Value == "true"
		}
	}
	if s.Commit == "" {
		return Source{}, false
	}
	s.Commit = s.Commit[:min(len(s.Commit), shortLen)]
	return s, true
}

// Git describes the git checkout of Module that contains dir: its HEAD,
// and whether any file outside Outputs differs from HEAD or is untracked
// (an untracked source file changes what is built as much as an edited
// one). Ignored files do not count.
func Git(ctx context.Context, dir string) (Source, error) {
	top, err := git(ctx, dir, "rev-parse", "--show-toplevel")
	if err != nil {
		return Source{}, err
	}
	if !isModule(filepath.Join(top, "go.mod")) {
		return Source{}, fmt.Errorf("git: %s is not a checkout of %s", top, Module)
	}
	head, err := git(ctx, top, "rev-parse", fmt.Sprintf("--short=%d", shortLen), "HEAD")
	if err != nil {
		return Source{}, err
	}
	args := []string{"status", "--porcelain", "--", ":/"}
	for _, o := range Outputs {
		args = append(args, ":(top,exclude)"+o)
	}
	st, err := git(ctx, top, args...)
	if err != nil {
		return Source{}, err
	}
	return Source{Commit: head, Dirty: st != ""}, nil
}

// isModule says whether the go.mod at path declares Module.
func isModule(path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	for l := range strings.Lines(string(b)) {
		if strings.TrimSpace(l) == "module "+Module {
			return true
		}
	}
	return false
}

func git(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.TrimSpace(string(out)), nil
}

// Current is the Source of the code running now: the build info's if the
// go command stamped one, otherwise git's in the working directory,
// otherwise Unknown.
func Current(ctx context.Context) Source {
	if s, ok := Build(); ok {
		return s
	}
	if s, err := Git(ctx, "."); err == nil {
		return s
	}
	return Unknown
}

// New stamps a result of src written now on this machine, reproduced by
// the command reproduce.
func New(src Source, reproduce string) Stamp {
	return Stamp{
		Commit:    src.String(),
		Dirty:     src.Dirty,
		Date:      time.Now().UTC().Format(time.RFC3339),
		Machine:   Host(),
		Reproduce: reproduce,
	}
}

// Command renders args as a command line a POSIX shell runs as the same
// argv, quoting only the arguments that need it.
func Command(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = quote(a)
	}
	return strings.Join(q, " ")
}

func quote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,@%+") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
