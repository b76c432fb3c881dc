package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestSimulateProvenance: the JSON of shoal simulate, on stdout and in
// --out, says which commit, when, on what machine and by which command it
// was made.
func TestSimulateProvenance(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	args := []string{"simulate", "--trace", "../../simulation/testdata/python-debian.trace.json",
		"--nodes", "3", "--strategies", "lazy-no-peers,lazy-swarm", "--seeds", "1"}
	wantCmd := "shoal simulate --trace ../../simulation/testdata/python-debian.trace.json --nodes 3 --strategies lazy-no-peers,lazy-swarm --seeds 1"
	for _, c := range []struct {
		name string
		out  []string // extra flags
		file string   // where the JSON goes; "" for stdout
	}{
		{"stdout", nil, ""},
		{"out dir", []string{"--out", dir, "--name", "r"}, filepath.Join(dir, "r.json")},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			if code := run(slices.Concat(args, c.out), &stdout, &stderr); code != 0 {
				t.Fatalf("exit %d:\n%s", code, stderr.String())
			}
			b := stdout.Bytes()
			if c.file != "" {
				var err error
				if b, err = os.ReadFile(c.file); err != nil {
					t.Fatal(err)
				}
			}
			var rep struct {
				Commit    *string `json:"commit"`
				Dirty     bool    `json:"dirty"`
				Date      string  `json:"date"`
				Reproduce string  `json:"reproduce"`
				Machine   struct {
					Cores  int    `json:"cores"`
					Kernel string `json:"kernel"`
					Go     string `json:"go"`
				} `json:"machine"`
				Results []json.RawMessage `json:"results"`
			}
			if err := json.Unmarshal(b, &rep); err != nil {
				t.Fatalf("%v:\n%.500s", err, b)
			}
			if len(rep.Results) != 2 {
				t.Errorf("%d results, want 2", len(rep.Results))
			}
			// go test binaries carry no VCS stamp: the commit is git's in
			// the working directory, or unknown outside a checkout.
			if rep.Commit == nil || !regexp.MustCompile(`^([0-9a-f]{12}(-dirty)?|unknown)$`).MatchString(*rep.Commit) {
				t.Errorf("commit %v: want a 12-digit hash, -dirty or not, or unknown", rep.Commit)
			} else if strings.HasSuffix(*rep.Commit, "-dirty") != rep.Dirty {
				t.Errorf("commit %s with dirty %v", *rep.Commit, rep.Dirty)
			}
			if d, err := time.Parse(time.RFC3339, rep.Date); err != nil || !strings.HasSuffix(rep.Date, "Z") || time.Since(d) > time.Hour {
				t.Errorf("date %q: want now in UTC, RFC 3339 (%v)", rep.Date, err)
			}
			if m := rep.Machine; m.Cores < 1 || m.Kernel == "" || !strings.HasPrefix(m.Go, "go") {
				t.Errorf("machine %+v: want cores, kernel and go version", m)
			}
			want := wantCmd
			if c.out != nil {
				want += " " + strings.Join(c.out, " ")
			}
			if rep.Reproduce != want {
				t.Errorf("reproduce %q, want %q", rep.Reproduce, want)
			}
		})
	}
}
