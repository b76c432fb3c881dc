package bench

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/internal/provenance"
)

// TestResultRefusesDirtyTree: a results file is written from a clean tree,
// or from a dirty (or undescribable) one only with SHOAL_BENCH_DIRTY=1, and
// then says it is dirty and not for quoting. Every file records commit,
// date, machine and a reproducing command.
func TestResultRefusesDirtyTree(t *testing.T) {
	t.Parallel()
	const derived = "SHOAL_BENCH=1 go test -run '^TestBenchX$' ./bench/"
	gitErr := errors.New("git: not a git repository")
	cases := []struct {
		name       string
		src        provenance.Source
		srcErr     error
		dirtyOK    bool
		reproduce  any // the scenario's own, or nil
		wantErr    string
		wantCommit string
		wantRepro  string
	}{
		{name: "clean", src: provenance.Source{Commit: "0123456789ab"}, wantCommit: "0123456789ab", wantRepro: derived},
		{name: "clean, overridden needlessly", src: provenance.Source{Commit: "0123456789ab"}, dirtyOK: true, wantCommit: "0123456789ab", wantRepro: derived},
		{name: "scenario's own command", src: provenance.Source{Commit: "0123456789ab"}, reproduce: "make calibrate", wantCommit: "0123456789ab", wantRepro: "make calibrate"},
		{name: "dirty", src: provenance.Source{Commit: "0123456789ab", Dirty: true}, wantErr: "uncommitted changes (0123456789ab-dirty"},
		{name: "dirty with SHOAL_BENCH_DIRTY=1", src: provenance.Source{Commit: "0123456789ab", Dirty: true}, dirtyOK: true, wantCommit: "0123456789ab-dirty", wantRepro: derived},
		{name: "no git", srcErr: gitErr, wantErr: "cannot tell whether the tree is clean"},
		{name: "no git with SHOAL_BENCH_DIRTY=1", srcErr: gitErr, dirtyOK: true, wantCommit: "unknown-dirty", wantRepro: derived},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			v := map[string]any{"runs": 3}
			if c.reproduce != nil {
				v["reproduce"] = c.reproduce
			}
			b, err := resultJSON("x", v, c.src, c.srcErr, c.dirtyOK, derived)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), "SHOAL_BENCH_DIRTY=1") {
					t.Fatalf("err = %v, want one containing %q and naming SHOAL_BENCH_DIRTY=1", err, c.wantErr)
				}
				if b != nil {
					t.Errorf("refused, yet returned %s", b)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got struct {
				Scenario  string             `json:"scenario"`
				Runs      int                `json:"runs"`
				Commit    string             `json:"commit"`
				Date      string             `json:"date"`
				Machine   provenance.Machine `json:"machine"`
				Reproduce string             `json:"reproduce"`
				Dirty     bool               `json:"dirty"`
				Warning   string             `json:"warning"`
			}
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatal(err)
			}
			if got.Scenario != "x" || got.Runs != 3 || got.Commit != c.wantCommit || got.Reproduce != c.wantRepro {
				t.Errorf("got %+v, want scenario x, runs 3, commit %s, reproduce %q", got, c.wantCommit, c.wantRepro)
			}
			if got.Date == "" || got.Machine.Cores < 1 || got.Machine.Kernel == "" {
				t.Errorf("date %q, machine %+v: want both", got.Date, got.Machine)
			}
			dirty := strings.HasSuffix(c.wantCommit, "-dirty")
			if got.Dirty != dirty || (got.Warning != "") != dirty {
				t.Errorf("dirty %v, warning %q; want dirty %v and a warning iff dirty", got.Dirty, got.Warning, dirty)
			}
			if dirty && !strings.Contains(got.Warning, "not for quoting") {
				t.Errorf("warning %q does not say the result is not for quoting", got.Warning)
			}
		})
	}
}

func TestReproduceCommand(t *testing.T) {
	t.Parallel()
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	cases := []struct {
		name string
		env  map[string]string
		root bool
		want string
	}{
		{"defaults", nil, false,
			"SHOAL_BENCH=1 SHOAL_BENCH_PAIRS=3 go test -count=1 -timeout 90m -run '^TestBenchRollout$' -v ./bench/"},
		{"knobs set, as root", map[string]string{"SHOAL_BENCH_PAIRS": "5", "SHOAL_BENCH_NODES": "20", "SHOAL_CHAOS": "kill", "SHOAL_BENCH_DIRTY": "1", "SHOAL_BENCH_BIN": "/x/shoal"}, true,
			"SHOAL_BENCH=1 SHOAL_BENCH_PAIRS=5 SHOAL_BENCH_NODES=20 SHOAL_CHAOS=kill go test -count=1 -timeout 90m -run '^TestBenchRollout$' -v ./bench/ (as root)"},
	}
	for _, c := range cases {
		if got := reproduce("TestBenchRollout", env(c.env), c.root); got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
}
