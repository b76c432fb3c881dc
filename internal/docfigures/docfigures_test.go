package docfigures

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const root = "../.."

// unsourced lists the results files the documents quote that do not say
// they came from a clean tree (a "-dirty" commit, or no commit at all:
// written before results carried provenance). docs/architecture.md
// ("Quoting a number") names each of them; once make bench or a simulate
// target writes one again from a clean tree, the test fails until it
// leaves this list.
var unsourced = map[string]string{
	"bench/results/cached-read-throughput.json":      "725dcea-dirty",
	"bench/results/coldstart-python.json":            "82744b0-dirty",
	"bench/results/convert-throughput.json":          "722108d-dirty",
	"bench/results/rollout.json":                     "12b4a8d-dirty",
	"simulation/results/rollout.json":                "no commit",
	"simulation/results/rollout-traced.json":         "no commit",
	"simulation/results/gone/reset.json":             "no commit",
	"simulation/results/gone/silent.json":            "no commit",
	"simulation/results/gone/left.json":              "no commit",
	"simulation/results/gone/silent4.json":           "no commit",
	"simulation/results/gone/silent4-nohedge.json":   "no commit",
	"simulation/results/byzantine/liar.json":         "no commit; made at 585f5b8",
	"simulation/results/byzantine/liar-before.json":  "no commit; made at 585f5b8",
	"simulation/results/byzantine/liar2.json":        "no commit; made at 585f5b8",
	"simulation/results/byzantine/liar2-before.json": "no commit; made at 585f5b8",
}

func documents(t *testing.T) []string {
	t.Helper()
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{filepath.Join(root, "README.md")}, docs...)
}

func figures(t *testing.T) []Figure {
	t.Helper()
	var all []Figure
	for _, path := range documents(t) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, path)
		figs, err := Parse(rel, b)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, figs...)
	}
	return all
}

// TestDocFigures is make check-docs: every referenced figure in README.md
// and docs/*.md matches its results file.
func TestDocFigures(t *testing.T) {
	figs := figures(t)
	// The documents quote these files' figures; losing the references
	// (a rewrite that drops the comments) must not pass silently.
	for _, want := range []string{
		"bench/results/chaos-rollout.json", "bench/results/calibration.json",
		"bench/results/cached-read-throughput.json", "bench/results/convert-throughput.json",
		"bench/results/coldstart-python.json", "bench/results/rollout.json",
		"simulation/results/byzantine/liar.json", "simulation/results/rollout.json",
	} {
		n := 0
		for _, f := range figs {
			if f.File == want {
				n++
			}
		}
		if n == 0 {
			t.Errorf("no document quotes %s with a reference", want)
		}
	}
	for _, err := range Check(root, figs) {
		t.Error(err)
	}
	t.Logf("%d figures checked", len(figs))
}

// TestQuotedFilesSourced: a quoted file records a clean commit, or is on
// the unsourced list (and leaves it once it does).
func TestQuotedFilesSourced(t *testing.T) {
	quoted := map[string]bool{}
	for _, f := range figures(t) {
		quoted[f.File] = true
	}
	for file := range quoted {
		b, err := os.ReadFile(filepath.Join(root, file))
		if err != nil {
			t.Error(err)
			continue
		}
		var stamp struct {
			Commit string `json:"commit"`
		}
		if err := json.Unmarshal(b, &stamp); err != nil {
			t.Errorf("%s: %v", file, err)
			continue
		}
		clean := stamp.Commit != "" && stamp.Commit != "unknown" && !strings.HasSuffix(stamp.Commit, "-dirty")
		_, listed := unsourced[file]
		switch {
		case !clean && !listed:
			t.Errorf("%s is quoted but records commit %q: regenerate it from a clean tree, or list it in unsourced and say so where it is quoted", file, stamp.Commit)
		case clean && listed:
			t.Errorf("%s now records the clean commit %s: remove it from unsourced", file, stamp.Commit)
		}
	}
	arch, err := os.ReadFile(filepath.Join(root, "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(arch), "### Quoting a number")
	section, _, _ = strings.Cut(section, "\n## ")
	section = strings.Join(strings.Fields(section), " ")
	for file := range unsourced {
		if !quoted[file] {
			t.Errorf("%s is in unsourced but no document quotes it: remove it", file)
		}
		// The section may name a file by the end of its path, once the
		// directories before it have been named.
		named := false
		for rest := file; rest != "" && !named; {
			named = strings.Contains(section, "`"+rest+"`")
			_, rest, _ = strings.Cut(rest, "/")
		}
		if !named {
			t.Errorf("%s is quoted, and docs/architecture.md (Quoting a number) does not say it records no clean commit", file)
		}
	}
}

func TestParse(t *testing.T) {
	doc := "p99 14.1 s<!-- src a.json .x --> against 10.2 s clean<!-- src a.json .y -->\n" +
		"| −10.1%<!-- src a.json .e *100 --> | 0.52–0.61<!-- src a.json .r max --> | 3,145,728 bytes <!-- src a.json .n --> |\n" +
		"0.52-0.61<!-- src a.json .r max -->"
	figs, err := Parse("d.md", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"14.1", "10.2", "−10.1", "0.61", "3,145,728", "0.61"}
	var got []string
	for _, f := range figs {
		got = append(got, f.Quoted)
	}
	if !slices.Equal(got, want) {
		t.Errorf("figures %q", got)
	}
	if figs[2].Ops[0] != "*100" || figs[0].Path != ".x" || figs[0].Line != 1 || figs[5].Line != 3 {
		t.Errorf("parsed %+v", figs)
	}
	for _, bad := range []string{
		"no figure here <!-- src a.json .x -->",
		"1.5 <!-- src a.json -->",
		"1.5 a unit far too long <!-- src a.json .x -->",
	} {
		if _, err := Parse("d.md", []byte(bad)); err == nil {
			t.Errorf("Parse(%q) passed", bad)
		}
	}
}

func TestMatches(t *testing.T) {
	for _, c := range []struct {
		quoted string
		value  float64
		want   bool
	}{
		{"14.1", 14.098118109, true},
		{"14.2", 14.098118109, false},
		{"14", 13.6, true},
		{"1.00", 1, true},
		{"1.0", 1.06, false},
		{"−10.1", -10.07, true},
		{"10.1", -10.07, false},
		{"3,145,728", 3145728, true},
		{"0.57", 0.565, true}, // a tie rounds either way
		{"0.56", 0.565, true},
		{"0.56", 0.5651, false},
	} {
		got, err := Matches(c.quoted, c.value)
		if err != nil || got != c.want {
			t.Errorf("Matches(%q, %v) = %v, %v; want %v", c.quoted, c.value, got, err, c.want)
		}
	}
}

func TestEval(t *testing.T) {
	var doc any
	if err := json.Unmarshal([]byte(`{
		"a": {"p50": 14.098, "clean": 10.1},
		"r": [0.57, 0.52, 0.61],
		"results": [{"strategy": "s", "nodes": 1000, "p": 4.24}, {"strategy": "s", "nodes": 10000, "p": 3.7}],
		"by": {"usr/lib/python3.11": {"ratio": 0.54}},
		"e": -0.1007, "bytes": 12820953, "s": "x"}`), &doc); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		ops  []string
		want float64
	}{
		{".a.p50", nil, 14.098},
		{".r", []string{"min"}, 0.52},
		{".r", []string{"max"}, 0.61},
		{".r", []string{"median"}, 0.57},
		{".r[1]", nil, 0.52},
		{`.by["usr/lib/python3.11"].ratio`, nil, 0.54},
		{".results[nodes=10000].p", nil, 3.7},
		{".results[strategy=s,nodes=1000].p", nil, 4.24},
		{".e", []string{"*100"}, -10.07},
		{".bytes", []string{"/1e6"}, 12.820953},
		{".a.p50", []string{"-.a.clean"}, 14.098 - 10.1},
		{".a.p50", []string{"/.a.clean"}, 14.098 / 10.1},
	} {
		got, err := Eval(doc, c.path, c.ops)
		if err != nil || math.Abs(got-c.want) > 1e-12 {
			t.Errorf("Eval(%s %v) = %v, %v; want %v", c.path, c.ops, got, err, c.want)
		}
	}
	for _, c := range []struct {
		path string
		ops  []string
	}{
		{".nope", nil},
		{".results[strategy=s].p", nil}, // two match
		{".r[3]", nil},
		{".s", nil},
		{".a", nil},
		{".r", []string{"sum"}},
		{".a.p50", []string{"min"}},
	} {
		if v, err := Eval(doc, c.path, c.ops); err == nil {
			t.Errorf("Eval(%s %v) = %v, want an error", c.path, c.ops, v)
		}
	}
}

// TestCheckFailsOnEditedFigure: a figure moved away from its file fails,
// and the unedited one passes, on a real results file.
func TestCheckFailsOnEditedFigure(t *testing.T) {
	good := "p99 14.1 s<!-- src bench/results/chaos-rollout.json .shoal.p99_ready_s -->"
	figs, err := Parse("d.md", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	var v any
	b, err := os.ReadFile(filepath.Join(root, figs[0].File))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	p99, err := Eval(v, figs[0].Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	right := strings.Replace(good, "14.1", strconv.FormatFloat(p99, 'f', 1, 64), 1)
	wrong := strings.Replace(good, "14.1", strconv.FormatFloat(p99+0.2, 'f', 1, 64), 1)
	for _, c := range []struct {
		doc   string
		fails bool
	}{{right, false}, {wrong, true}} {
		figs, err := Parse("d.md", []byte(c.doc))
		if err != nil {
			t.Fatal(err)
		}
		if errs := Check(root, figs); (len(errs) > 0) != c.fails {
			t.Errorf("Check(%q) = %v, want failure %v", c.doc, errs, c.fails)
		}
	}
}
