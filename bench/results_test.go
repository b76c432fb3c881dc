package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/shoal-project/shoal/internal/provenance"
)

// needBench skips unless SHOAL_BENCH=1 (make bench), and fails when the
// results could not be written: from a dirty tree without
// SHOAL_BENCH_DIRTY=1 (see resultJSON). It fails at the start of a
// scenario, not after an hour of measuring.
func needBench(t *testing.T) {
	t.Helper()
	if os.Getenv("SHOAL_BENCH") != "1" {
		t.Skip("benchmark scenario: run with SHOAL_BENCH=1 (make bench)")
	}
	src, srcErr := source()
	if _, err := stamp(src, srcErr, dirtyOK(), ""); err != nil {
		t.Fatal(err)
	}
}

// pairs is how many A/B pairs every timed scenario runs.
func pairs() int { return pairsFrom(os.Getenv) }

func pairsFrom(getenv func(string) string) int {
	if n := getenv("SHOAL_BENCH_PAIRS"); n != "" {
		if v, err := strconv.Atoi(n); err == nil && v > 0 {
			return v
		}
	}
	return 3
}

// source is the state of the tree the benchmarks measure, read once: the
// test binary and shoal (make bench builds it first) are built from the
// tree as it was at the start, so a later edit does not change what was
// measured.
var source = sync.OnceValues(func() (provenance.Source, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return provenance.Git(ctx, ".")
})

// dirtyOK says whether SHOAL_BENCH_DIRTY=1 allows results from a dirty tree.
func dirtyOK() bool { return os.Getenv("SHOAL_BENCH_DIRTY") == "1" }

// notForQuoting is the warning a results file from a dirty tree carries.
const notForQuoting = "written from a tree with uncommitted changes (SHOAL_BENCH_DIRTY=1): not for quoting in README.md or docs/; commit and run again"

// stamp is the provenance of a results file measured with src (srcErr: why
// the tree could not be described). A result from uncommitted code
// describes code nobody can read, so a dirty tree, or one git cannot
// describe, is refused unless dirtyOK; then the stamp is marked dirty.
func stamp(src provenance.Source, srcErr error, dirtyOK bool, reproduce string) (provenance.Stamp, error) {
	switch {
	case srcErr != nil && !dirtyOK:
		return provenance.Stamp{}, fmt.Errorf("cannot tell whether the tree is clean (%v): a results file must name its commit; set SHOAL_BENCH_DIRTY=1 for results marked not for quoting", srcErr)
	case srcErr != nil:
		src = provenance.Source{Commit: provenance.Unknown.Commit, Dirty: true}
	case src.Dirty && !dirtyOK:
		return provenance.Stamp{}, fmt.Errorf("the tree has uncommitted changes (%s; git status shows them): a result from it describes code nobody can read; commit first, or set SHOAL_BENCH_DIRTY=1 for results marked not for quoting", src)
	}
	return provenance.New(src, reproduce), nil
}

// reproduceKnobs are the environment variables that change what a scenario
// measures; a reproducing command sets those that were set.
var reproduceKnobs = []string{"SHOAL_BENCH_NODES", "SHOAL_BENCH_SEEDS", "SHOAL_BENCH_REGISTRY_MBIT", "SHOAL_CHAOS"}

// reproduce is the command that runs test again as it ran now.
func reproduce(test string, getenv func(string) string, root bool) string {
	env := []string{"SHOAL_BENCH=1", fmt.Sprintf("SHOAL_BENCH_PAIRS=%d", pairsFrom(getenv))}
	for _, k := range reproduceKnobs {
		if v := getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	cmd := provenance.Command(append(env, "go", "test", "-count=1", "-timeout", "90m", "-run", "^"+test+"$", "-v", "./bench/"))
	if root {
		cmd += " (as root)"
	}
	return cmd
}

// machine and commit describe this run, for files that are not results
// (the trace's image facts) and for the calibration's inputs.
func machine() provenance.Machine { return provenance.Host() }

func commit() string {
	src, err := source()
	if err != nil {
		return provenance.Unknown.Commit
	}
	return src.String()
}

// writeResult writes bench/results/<scenario>.json; see resultJSON.
func writeResult(t *testing.T, scenario string, v map[string]any) {
	t.Helper()
	src, srcErr := source()
	b, err := resultJSON(scenario, v, src, srcErr, dirtyOK(), reproduce(t.Name(), os.Getenv, os.Geteuid() == 0))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("results")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, scenario+".json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s:\n%s", p, b)
}

// resultJSON is a scenario's results file: v with the scenario's name and
// its provenance (commit, date, machine; see stamp). v's own "reproduce"
// wins over the derived command, for a scenario that a make target runs
// with more than go test (make calibrate). From a dirty tree with dirtyOK,
// the file says "dirty": true and carries a warning not to quote it.
func resultJSON(scenario string, v map[string]any, src provenance.Source, srcErr error, dirtyOK bool, reproduce string) ([]byte, error) {
	st, err := stamp(src, srcErr, dirtyOK, reproduce)
	if err != nil {
		return nil, fmt.Errorf("results %s: %w", scenario, err)
	}
	v["scenario"] = scenario
	v["commit"] = st.Commit
	v["date"] = st.Date
	v["machine"] = st.Machine
	if _, ok := v["reproduce"]; !ok {
		v["reproduce"] = st.Reproduce
	}
	if st.Dirty {
		v["dirty"] = true
		v["warning"] = notForQuoting
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("results %s: %w", scenario, err)
	}
	return append(b, '\n'), nil
}

// traceOut is where TestBenchRecordTrace writes the trace and image facts
// it records: SHOAL_TRACE_OUT if set (make trace-fixture sets it to
// simulation/testdata, the fixture the simulator's tests read), otherwise
// results/trace. A benchmark run never rewrites a test fixture.
func traceOut(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("SHOAL_TRACE_OUT")
	if dir == "" {
		dir = filepath.Join("results", "trace")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func secs(d time.Duration) float64 { return d.Seconds() }
