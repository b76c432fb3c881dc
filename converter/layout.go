package converter

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/trace"
)

// ErrTraceMismatch is wrapped when a start-up trace does not describe the
// flat index it is given with: another table size, or blocks of other sizes.
var ErrTraceMismatch = errors.New("trace does not match the flat index it was recorded on")

// TraceFiles maps a start-up trace onto the files it read: the paths of the
// regular files of old (the flat index the trace was recorded on) that hold
// bytes of a traced block, in first-touch order. A file's place is the
// first touch of any of its blocks; files first touched through the same
// block keep their order in that block. A trace names blocks, not bytes, so
// a file that only shares a touched block with one start-up read is
// listed too.
//
// The trace is checked against old before it is used: it must have been
// decoded (trace.Decode validates it: distinct blocks, at most
// trace.MaxEvents), name old's table size, and give each touched block the
// sizes old gives it. Anything else is an error wrapping ErrTraceMismatch
// or trace.ErrMalformed, never a partial order. Memory is proportional to
// old's block table and entries, whatever the trace.
func TraceFiles(old *flat.Index, t *trace.Trace) ([]string, error) {
	if old == nil || t == nil {
		return nil, errors.New("trace layout: no index or no trace")
	}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("trace layout: %w", err)
	}
	if t.Blocks != len(old.Blocks) {
		return nil, fmt.Errorf("trace layout: %w: trace of %d blocks, index of %d", ErrTraceMismatch, t.Blocks, len(old.Blocks))
	}
	// rank[b] is 1 + the position of block b's first touch, 0 if untouched.
	rank := make([]uint32, len(old.Blocks))
	for i, e := range t.Events {
		b := old.Blocks[e.Block] // in range: Validate checked it against t.Blocks
		if e.Size != b.ULen || e.Stored != b.CLen {
			return nil, fmt.Errorf("trace layout: %w: event %d gives block %d %d/%d bytes, the index %d/%d",
				ErrTraceMismatch, i, e.Block, e.Size, e.Stored, b.ULen, b.CLen)
		}
		rank[e.Block] = uint32(i) + 1
	}
	type touched struct {
		entry  int
		rank   uint32 // of the file's first-touched block
		offset uint32 // of the file's extent in that block
	}
	var files []touched
	for i := range old.Entries {
		e := &old.Entries[i]
		if e.Type != flat.TypeReg {
			continue
		}
		var best touched
		for _, x := range e.Extents {
			if int(x.Block) >= len(rank) {
				return nil, fmt.Errorf("trace layout: %q: extent block %d outside the index's table", e.Path, x.Block)
			}
			r := rank[x.Block]
			if r != 0 && (best.rank == 0 || r < best.rank || r == best.rank && x.Offset < best.offset) {
				best = touched{entry: i, rank: r, offset: x.Offset}
			}
		}
		if best.rank != 0 {
			files = append(files, best)
		}
	}
	slices.SortFunc(files, func(a, b touched) int {
		return cmp.Or(cmp.Compare(a.rank, b.rank), cmp.Compare(a.offset, b.offset), cmp.Compare(a.entry, b.entry))
	})
	out := make([]string, len(files))
	for i, f := range files {
		out[i] = old.Entries[f.entry].Path
	}
	return out, nil
}

// WithTraceLayout lays out the contents of the files a start-up trace read
// first, in first-touch order, ahead of every other file (which follow in
// path order); see TraceFiles. old is the flat index the trace was
// recorded on: a trace names blocks of one flat image, so it is read
// through that image's index, and paths are what carries over to the new
// one. Paths the new image no longer has are passed over. The two parts
// are chunked separately, so start-up's blocks end where its files end.
func WithTraceLayout(old *flat.Index, t *trace.Trace) Option {
	return func(c *config) error {
		paths, err := TraceFiles(old, t)
		if err != nil {
			return err
		}
		c.first = paths
		return nil
	}
}

// WithFirstFiles lays out the contents of the regular files at paths first,
// in the order given, as WithTraceLayout does with a trace's files. Paths
// the image does not hold as regular files, and repeats, are passed over.
func WithFirstFiles(paths []string) Option {
	return func(c *config) error { c.first = slices.Clone(paths); return nil }
}

// layoutOrder splits files (in path order) into the files named by first,
// in first's order, and the others, in path order. entries names each
// file's path.
func layoutOrder(entries []flat.Entry, files []fileRef, first []string) (lead, rest []fileRef) {
	if len(first) == 0 {
		return nil, files
	}
	pos := make(map[string]int, len(files))
	for i, f := range files {
		pos[entries[f.entry].Path] = i
	}
	taken := make([]bool, len(files))
	for _, p := range first {
		i, ok := pos[p]
		if !ok || taken[i] {
			continue
		}
		taken[i] = true
		lead = append(lead, files[i])
	}
	rest = make([]fileRef, 0, len(files)-len(lead))
	for i, f := range files {
		if !taken[i] {
			rest = append(rest, f)
		}
	}
	return lead, rest
}
