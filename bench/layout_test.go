package bench

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/trace"
)

// TestBenchTraceLayout: over-fetch at start — block bytes fetched ÷ bytes
// read — of python3 in the big image, path-ordered (the converter without
// a trace) vs trace-ordered (`shoal convert --trace`, from the start-up
// trace recorded on the path-ordered image). Each image has its own
// start-up trace recorded and published, so both cold runs prefetch their
// trace, as a node does; then alternating cold runs A B C A B C, C being
// the second round (converted with the trace recorded on B). Also: how
// many ranges the trace's blocks form in the blobs, and the blocks each
// conversion reuses from the one before (path → traced, and traced →
// traced again with the trace recorded on the traced image).
func TestBenchTraceLayout(t *testing.T) {
	needBench(t)
	needRoot(t)
	bin := buildShoal(t)
	reg := testenv.StartRegistry(t)
	src, img := bigFlat(t, reg, bin)
	dir := t.TempDir()

	pathTrace := recordAndPush(t, bin, src, filepath.Join(dir, "path.trace.json"))
	traced := reg.Ref("bench/big:v1-traced")
	convTraced := convertTraced(t, bin, src, traced, filepath.Join(dir, "path.trace.json"))
	tracedTrace := recordAndPush(t, bin, traced, filepath.Join(dir, "traced.trace.json"))
	retraced := reg.Ref("bench/big:v1-retraced")
	convRetraced := convertTraced(t, bin, src, retraced, filepath.Join(dir, "traced.trace.json"))

	retracedTrace := recordAndPush(t, bin, retraced, filepath.Join(dir, "retraced.trace.json"))
	pathIdx, tracedIdx, retracedIdx := openIndex(t, src), openIndex(t, traced), openIndex(t, retraced)

	var pathRuns, tracedRuns, retracedRuns []shoalRunStats
	var pathOF, tracedOF, retracedOF, pathS, tracedS, retracedS, ratios []float64
	for i := range pairs() {
		ok, _, a := runShoalCold(t, localCommand, bin, src)
		tok, _, b := runShoalCold(t, localCommand, bin, traced)
		rok, _, c := runShoalCold(t, localCommand, bin, retraced)
		pathRuns, tracedRuns, retracedRuns = append(pathRuns, a), append(tracedRuns, b), append(retracedRuns, c)
		oa, ob := float64(a.BytesFromRegistry)/float64(a.BytesRead), float64(b.BytesFromRegistry)/float64(b.BytesRead)
		oc := float64(c.BytesFromRegistry) / float64(c.BytesRead)
		pathOF, tracedOF, retracedOF = append(pathOF, oa), append(tracedOF, ob), append(retracedOF, oc)
		pathS, tracedS, retracedS = append(pathS, secs(ok)), append(tracedS, secs(tok)), append(retracedS, secs(rok))
		ratios = append(ratios, ob/oa)
		t.Logf("round %d: path order %.2fx (%d of %d B, %d requests, ok %v); trace order %.2fx (%d of %d B, %d requests, ok %v); second round %.2fx (%d of %d B, %d requests, ok %v)",
			i, oa, a.BytesFromRegistry, a.BytesRead, a.RegistryRequests, ok, ob, b.BytesFromRegistry, b.BytesRead, b.RegistryRequests, tok,
			oc, c.BytesFromRegistry, c.BytesRead, c.RegistryRequests, rok)
	}
	side := func(name string, runs []shoalRunStats, of, s []float64, x *flat.Index, tr *trace.Trace) map[string]any {
		med := func(f func(shoalRunStats) int64) float64 {
			xs := make([]float64, len(runs))
			for i, r := range runs {
				xs[i] = float64(f(r))
			}
			return median(xs)
		}
		size, stored := tr.Bytes()
		return map[string]any{
			"name":                       name,
			"overfetch_median":           median(of),
			"overfetch_samples":          of,
			"bytes_from_registry_median": med(func(s shoalRunStats) int64 { return s.BytesFromRegistry }),
			"bytes_read_median":          med(func(s shoalRunStats) int64 { return s.BytesRead }),
			"registry_requests_median":   med(func(s shoalRunStats) int64 { return s.RegistryRequests }),
			"registry_wire_bytes_median": med(func(s shoalRunStats) int64 { return s.RegistryWireBytes }),
			"time_to_ok_median_s":        median(s),
			"time_to_ok_samples_s":       s,
			"stats_samples":              runs,
			"trace": map[string]any{"blocks": len(tr.Events), "bytes": size, "stored_bytes": stored,
				"ranges": traceRanges(x, tr, 0), "merged_ranges": traceRanges(x, tr, fetch.DefaultMergeGap),
				"blocks_in_image": len(x.Blocks)},
		}
	}
	reuse := func(a, b *flat.Index) map[string]any {
		blocks, bytes, total := sharedBlocks(a, b)
		return map[string]any{"blocks": blocks, "of_blocks": len(b.Blocks), "bytes": bytes, "of_bytes": total,
			"bytes_share": float64(bytes) / float64(total)}
	}
	info := imageInfo(t, src, img)
	writeResult(t, "trace-layout", map[string]any{
		"runs":    len(pathRuns),
		"image":   info,
		"command": pythonCmd,
		"cold":    "each run has a fresh --state-dir (empty block cache) and prefetches its image's published start-up trace (recorded on that image by a cold `shoal run --record-trace`); the kernel page cache is not dropped",
		"baseline": side("path order: `shoal convert` without a trace (files in path order, blocks spanning files)",
			pathRuns, pathOF, pathS, pathIdx, pathTrace),
		"shoal": side("trace order: `shoal convert --trace` with the trace recorded on the path-ordered image (its files first, in first-touch order, chunked apart from the rest)",
			tracedRuns, tracedOF, tracedS, tracedIdx, tracedTrace),
		"shoal_second_round": side("trace order, second round: `shoal convert --trace` with the trace recorded on the trace-ordered image",
			retracedRuns, retracedOF, retracedS, retracedIdx, retracedTrace),
		"overfetch_note": "block bytes fetched at start ÷ bytes read: bytes_from_registry (uncompressed block bytes) ÷ bytes_read of `shoal run --stats`; goal ≤ 1.2",
		"ratio_median":   median(ratios),
		"ratio_note":     "trace-order over-fetch ÷ path-order over-fetch, per pair, median (below 1: trace order fetches less per byte read)",
		"ranges_note":    "ranges: runs of the trace's blocks back to back in one blob; merged_ranges: the same with gaps up to fetch.DefaultMergeGap bridged, as the fetcher merges (before it splits requests at fetch.DefaultMaxRequestSize and the seeder batches at seeder.DefaultBatchBytes)",
		"conversion": map[string]any{
			"traced":   convTraced,
			"retraced": convRetraced,
		},
		"reuse": map[string]any{
			"path_to_traced":     reuse(pathIdx, tracedIdx),
			"traced_to_retraced": reuse(tracedIdx, retracedIdx),
			"note":               "blocks (and their uncompressed bytes) of the second image already in the first: a node holding the first fetches only the rest. retraced is the source converted again with the trace recorded on the traced image",
		},
	})
}

// recordAndPush records python's start-up trace on ref with a cold run,
// publishes it and returns it.
func recordAndPush(t *testing.T, bin, ref, file string) *trace.Trace {
	t.Helper()
	runShoalCold(t, localCommand, bin, ref, "--record-trace", file, "--trace-prefetch=false")
	if out, err := exec.CommandContext(t.Context(), bin, "trace", "push", "--plain-http", ref, file).CombinedOutput(); err != nil {
		t.Fatalf("trace push %s: %v\n%s", ref, err, out)
	}
	tr, err := trace.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// convertTraced converts src to dst with `shoal convert --trace` and
// returns its stats.
func convertTraced(t *testing.T, bin, src, dst, traceFile string) map[string]any {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(t.Context(), bin, "convert", "--plain-http", "--json", "--trace", traceFile, src, dst)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("shoal convert --trace: %v\n%s", err, stderr.String())
	}
	var res struct {
		Stats map[string]any `json:"stats"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("shoal convert --json: %v\n%s", err, stdout.String())
	}
	t.Logf("shoal convert --trace %s %s: %v", src, dst, strings.TrimSpace(stderr.String()))
	return res.Stats
}

// openIndex returns the index of the flat image ref names (or its
// "-shoal" tag does).
func openIndex(t *testing.T, ref string) *flat.Index {
	t.Helper()
	if fr, err := fetch.FlatRef(ref); err == nil {
		if im, err := fetch.OpenImage(t.Context(), fr, fetch.WithPlainHTTP(true)); err == nil {
			return im.Index()
		}
	}
	im, err := fetch.OpenImage(t.Context(), ref, fetch.WithPlainHTTP(true))
	if err != nil {
		t.Fatal(err)
	}
	return im.Index()
}

// traceRanges counts the runs of tr's blocks in x's blobs, a gap of at
// most gap bytes between two blocks of one blob joining them.
func traceRanges(x *flat.Index, tr *trace.Trace, gap uint64) int {
	bs := tr.BlockOrder()
	slices.SortFunc(bs, func(a, b uint32) int {
		ba, bb := x.Blocks[a], x.Blocks[b]
		if ba.Blob != bb.Blob {
			return int(ba.Blob) - int(bb.Blob)
		}
		return int(ba.Offset) - int(bb.Offset)
	})
	n := 0
	for i, b := range bs {
		if i == 0 {
			n++
			continue
		}
		p := x.Blocks[bs[i-1]]
		if c := x.Blocks[b]; c.Blob != p.Blob || c.Offset > p.Offset+uint64(p.CLen)+gap {
			n++
		}
	}
	return n
}

// sharedBlocks counts b's blocks, and their bytes, that a holds too.
func sharedBlocks(a, b *flat.Index) (blocks int, bytes, total int64) {
	have := make(map[flat.BlockID]bool, len(a.Blocks))
	for _, blk := range a.Blocks {
		have[blk.ID] = true
	}
	for _, blk := range b.Blocks {
		total += int64(blk.ULen)
		if have[blk.ID] {
			blocks++
			bytes += int64(blk.ULen)
		}
	}
	return blocks, bytes, total
}
