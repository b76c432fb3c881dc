package converter

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/trace"
)

// layoutImage is a synthetic image of 120 files of random bytes, 1 KiB to
// 200 KiB, in a few directories (about 12 MB), chunked at 16 KiB blocks:
// several blocks per file for most, several files per block for the small.
func layoutImage(t testing.TB) v1.Image {
	t.Helper()
	rng := rand.New(rand.NewPCG(20, 1))
	var es []ent
	for i := range 120 {
		size := 1<<10 + rng.IntN(200<<10)
		if i%3 == 0 {
			size = 1<<10 + rng.IntN(8<<10) // many small files, as python's
		}
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		es = append(es, ent{name: fmt.Sprintf("d%d/f%03d", i%5, i), body: string(b)})
	}
	es = append(es, ent{name: "d0/link", typ: '1', link: "d0/f000"})
	return imageOf(t, es)
}

const layoutBlock = 16 << 10

// buildLayout converts img and returns the index, the flat image's digest
// and every file's contents (as treeOf sees them).
func buildLayout(t *testing.T, img v1.Image, opts ...Option) (*Result, string, testenv.Tree) {
	t.Helper()
	res, flatImg, cleanup, err := Build(t.Context(), img, append([]Option{quiet(), WithAvgBlockSize(layoutBlock)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	d, err := flatImg.Digest()
	if err != nil {
		t.Fatal(err)
	}
	blobs := map[string][]byte{}
	for _, b := range res.Index.Blobs {
		h, _ := v1.NewHash(b.Digest)
		l, err := flatImg.LayerByDigest(h)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		blobs[b.Digest], err = io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	x := res.Index
	tree := treeOf(t, x, func(b flat.Block) []byte {
		out, err := flat.DecodeBlock(b, blobs[x.Blobs[b.Blob].Digest][b.Offset:b.Offset+uint64(b.CLen)], nil)
		if err != nil {
			t.Fatal(err)
		}
		return out
	})
	return res, d.String(), tree
}

// traceOf makes the trace a start-up reading files (paths, in this order)
// of x would record: each file's blocks, first touch only.
func traceOf(t *testing.T, x *flat.Index, paths ...string) *trace.Trace {
	t.Helper()
	tr := &trace.Trace{Version: trace.Version, Image: "sha256:" + strings.Repeat("ab", 32), Blocks: len(x.Blocks)}
	seen := map[uint32]bool{}
	for _, p := range paths {
		i, ok := x.Lookup(p)
		if !ok {
			t.Fatalf("no %s in the index", p)
		}
		for _, e := range x.Entries[x.Resolve(i)].Extents {
			if !seen[e.Block] {
				seen[e.Block] = true
				b := x.Blocks[e.Block]
				tr.Events = append(tr.Events, trace.Event{Block: e.Block, Size: b.ULen, Stored: b.CLen})
			}
		}
	}
	if err := tr.Validate(); err != nil {
		t.Fatal(err)
	}
	return tr
}

// fileBlocks is the blocks holding a file's bytes, in order.
func fileBlocks(t *testing.T, x *flat.Index, p string) []uint32 {
	t.Helper()
	i, ok := x.Lookup(p)
	if !ok {
		t.Fatalf("no %s in the index", p)
	}
	var out []uint32
	for _, e := range x.Entries[x.Resolve(i)].Extents {
		out = append(out, e.Block)
	}
	return out
}

// TestTraceLayout: the files a trace read come first, contiguous and in
// first-touch order; the rest follow in path order; the result is
// deterministic, every file's contents are unchanged, and reconverting
// with another trace reuses the blocks of the files neither trace moved.
func TestTraceLayout(t *testing.T) {
	img := layoutImage(t)
	base, baseDigest, baseTree := buildLayout(t, img)
	old := base.Index
	if base.Stats.LeadFiles != 0 {
		t.Fatalf("no trace, yet %d lead files", base.Stats.LeadFiles)
	}

	// Start-up reads a big file, then small ones in several directories,
	// out of path order, and a hard link's target.
	startup := []string{"d4/f119", "d1/f006", "d3/f003", "d0/f000", "d2/f097", "d1/f046"}
	tr := traceOf(t, old, startup...)
	first, err := TraceFiles(old, tr)
	if err != nil {
		t.Fatal(err)
	}
	// The trace names blocks: the files sharing them come along, after the
	// ones read first through each block, but every read file is there,
	// in the order of its first touch.
	var pos []int
	for _, p := range startup {
		i := slices.Index(first, p)
		if i < 0 {
			t.Fatalf("%s read at start-up, not in the layout's lead %v", p, first)
		}
		pos = append(pos, i)
	}
	if !slices.IsSorted(pos) {
		t.Fatalf("start-up files at %v of the lead %v: not in first-touch order", pos, first)
	}

	res, digest, tree := buildLayout(t, img, WithTraceLayout(old, tr))
	x := res.Index
	if !maps.Equal(tree, baseTree) {
		t.Fatal("a trace-ordered image's files differ from the path-ordered one's")
	}
	if digest == baseDigest {
		t.Fatal("the trace changed nothing")
	}
	if res.Stats.LeadFiles != len(first) {
		t.Fatalf("%d lead files, want %d", res.Stats.LeadFiles, len(first))
	}
	// Lead files hold blocks 0..LeadBlocks-1, in order, and nothing else
	// does: start-up's blocks are one contiguous run at the blob's start.
	var next uint32
	for _, p := range first {
		for _, b := range fileBlocks(t, x, p) {
			if b != next && b != next-1 { // next-1: a block shared with the previous file
				t.Fatalf("%s: block %d where %d (or %d) belongs: lead not contiguous in first-touch order", p, b, next, next-1)
			}
			next = b + 1
		}
	}
	if int(next) != res.Stats.LeadBlocks {
		t.Fatalf("lead files end at block %d, stats say %d lead blocks", next, res.Stats.LeadBlocks)
	}
	for i := range x.Entries {
		e := &x.Entries[i]
		if e.Type == flat.TypeReg && !slices.Contains(first, e.Path) {
			for _, ex := range e.Extents {
				if ex.Block < next {
					t.Fatalf("%s, not read at start-up, is in lead block %d", e.Path, ex.Block)
				}
			}
		}
	}
	for i := 1; i < len(x.Blocks); i++ {
		if x.Blocks[i].Blob == x.Blocks[i-1].Blob && x.Blocks[i].Offset != x.Blocks[i-1].Offset+uint64(x.Blocks[i-1].CLen) {
			t.Fatalf("block %d not right after block %d in its blob", i, i-1)
		}
	}

	// Deterministic: the same inputs give the same digest.
	if _, again, _ := buildLayout(t, img, WithTraceLayout(old, tr)); again != digest {
		t.Fatalf("same image and trace, digests %s and %s", digest, again)
	}

	// Reconvert from the trace-ordered image with a new trace: the rest is
	// chunked on its own, so its blocks are the same except around the
	// files that moved.
	tr2 := traceOf(t, x, "d2/f097", "d0/f030", "d4/f119")
	res2, _, tree2 := buildLayout(t, img, WithTraceLayout(x, tr2))
	if !maps.Equal(tree2, baseTree) {
		t.Fatal("reconverted image's files differ")
	}
	rb, total := sharedBytes(t, x, res2.Index)
	t.Logf("reconvert with a new trace: %.1f%% of the bytes of %d blocks reused; lead %d files, %d blocks",
		100*float64(rb)/float64(total), len(res2.Index.Blocks), res2.Stats.LeadFiles, res2.Stats.LeadBlocks)
	// Every block of a file that sits in the same place in both layouts
	// (in the rest, and neither it nor its neighbours moved) is reused.
	have := map[flat.BlockID]bool{}
	for _, b := range x.Blocks {
		have[b.ID] = true
	}
	moved := map[string]bool{}
	first2, _ := TraceFiles(x, tr2)
	for _, p := range append(slices.Clone(first), first2...) {
		moved[p] = true
	}
	var stable, stableReused int
	x2 := res2.Index
	var prevMoved bool
	for i := range x2.Entries {
		e := &x2.Entries[i]
		if e.Type != flat.TypeReg {
			continue
		}
		if moved[e.Path] {
			prevMoved = true
			continue
		}
		// Skip the first and last blocks of a file next to a gap: the
		// cut there depends on the bytes before it, which changed.
		bs := fileBlocks(t, x2, e.Path)
		if prevMoved && len(bs) > 0 {
			bs = bs[1:]
		}
		prevMoved = false
		for _, b := range bs[:max(len(bs)-1, 0)] {
			stable++
			if have[x2.Blocks[b].ID] {
				stableReused++
			}
		}
	}
	t.Logf("blocks inside files in place: %d of %d reused", stableReused, stable)
	if stable == 0 || float64(stableReused) < 0.95*float64(stable) {
		t.Fatalf("only %d of %d blocks inside unmoved files reused on reconversion", stableReused, stable)
	}
}

// TestTraceLayoutHostile: a trace that does not fit the index — blocks out
// of range, repeated, another table's size, other sizes, too many events —
// gets one clear error, never a panic or a partial layout.
func TestTraceLayoutHostile(t *testing.T) {
	img := layoutImage(t)
	base, _, _ := buildLayout(t, img)
	old := base.Index
	good := traceOf(t, old, "d1/f006", "d0/f000")
	clone := func(f func(*trace.Trace)) *trace.Trace {
		c := *good
		c.Events = slices.Clone(good.Events)
		f(&c)
		return &c
	}
	cases := map[string]struct {
		tr   *trace.Trace
		want error
	}{
		"block out of range": {clone(func(c *trace.Trace) { c.Events[0].Block = uint32(c.Blocks) }), trace.ErrMalformed},
		"block far out":      {clone(func(c *trace.Trace) { c.Events[0].Block = 1<<32 - 1 }), trace.ErrMalformed},
		"duplicated":         {clone(func(c *trace.Trace) { c.Events = append(c.Events, c.Events[0]) }), trace.ErrMalformed},
		"bigger table":       {clone(func(c *trace.Trace) { c.Blocks = 1 << 31; c.Events[0].Block = 1<<31 - 1 }), ErrTraceMismatch},
		"smaller table":      {clone(func(c *trace.Trace) { c.Blocks = len(c.Events) }), nil},
		"other sizes":        {clone(func(c *trace.Trace) { c.Events[1].Size++ }), ErrTraceMismatch},
		"too many events": {clone(func(c *trace.Trace) {
			c.Events = make([]trace.Event, trace.MaxEvents+1)
		}), trace.ErrMalformed},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := TraceFiles(old, tc.tr)
			if err == nil {
				t.Fatal("accepted")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if _, _, _, err := Build(t.Context(), img, quiet(), WithTraceLayout(old, tc.tr)); err == nil {
				t.Fatal("Build accepted the trace")
			}
			t.Log(err)
		})
	}
	// A huge trace from a stream stops at the decoder's bound.
	var huge bytes.Buffer
	huge.WriteString(`{"version":1,"image":"sha256:` + strings.Repeat("ab", 32) + `","blocks":2147483648,"events":[`)
	for i := range trace.MaxEvents + 1 {
		if i > 0 {
			huge.WriteByte(',')
		}
		fmt.Fprintf(&huge, `{"b":%d}`, i)
	}
	huge.WriteString("]}")
	if _, err := trace.Decode(&huge, 0); !errors.Is(err, trace.ErrMalformed) {
		t.Fatalf("a trace of %d events decoded: %v", trace.MaxEvents+1, err)
	}
	// Files the new image lacks, and repeats, are passed over.
	res, _, _ := buildLayout(t, img, WithFirstFiles([]string{"gone", "d1/f006", "d1/f006", "d0/link", "d1"}))
	if res.Stats.LeadFiles != 1 {
		t.Fatalf("%d lead files, want 1 (d1/f006)", res.Stats.LeadFiles)
	}
}
