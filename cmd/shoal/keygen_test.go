package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/p2p"
)

func TestKeygen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "swarm.key")
	keygen := func(args ...string) (code int, stdout, stderr string) {
		var o, e bytes.Buffer
		code = run(append([]string{"keygen"}, args...), &o, &e)
		return code, o.String(), e.String()
	}
	// checkFile loads the key file as the daemon does and checks its mode.
	checkFile := func() []byte {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", path, st.Mode().Perm())
		}
		k, err := p2p.LoadPSK(path)
		if err != nil || len(k) != 32 {
			t.Fatalf("LoadPSK: %d bytes, %v", len(k), err)
		}
		return k
	}

	if code, out, errOut := keygen(path); code != 0 || out != "" {
		t.Fatalf("keygen FILE: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	first := checkFile()

	// An existing key is never replaced by accident.
	code, _, errOut := keygen(path)
	if code != 1 || !strings.Contains(errOut, "exists") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("keygen over an existing file: exit %d, stderr %q; want 1 and one line saying it exists", code, errOut)
	}
	if again := checkFile(); !bytes.Equal(again, first) {
		t.Error("keygen without --force changed the existing key")
	}
	if code, _, errOut := keygen("--force", path); code != 0 {
		t.Fatalf("keygen --force: exit %d, %s", code, errOut)
	}
	if replaced := checkFile(); bytes.Equal(replaced, first) {
		t.Error("keygen --force left the old key")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".shoal-keygen-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}

	// To stdout, for `kubectl create secret`.
	for _, args := range [][]string{{"-"}, nil} {
		code, out, errOut := keygen(args...)
		if code != 0 {
			t.Fatalf("keygen %q: exit %d, %s", args, code, errOut)
		}
		if k, err := p2p.ParsePSK([]byte(out)); err != nil || len(k) != 32 {
			t.Errorf("keygen %q printed %q: %v", args, out, err)
		}
	}
	if code, _, _ := keygen("a", "b"); code != 2 {
		t.Errorf("keygen with two files: exit %d, want 2 (usage)", code)
	}
	if code, _, errOut := keygen(filepath.Join(dir, "no/such/dir/key")); code != 1 || !strings.Contains(errOut, "no such file") {
		t.Errorf("keygen into a missing directory: exit %d, %q", code, errOut)
	}
}
