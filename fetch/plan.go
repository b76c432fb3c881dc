package fetch

import (
	"cmp"
	"slices"

	"github.com/shoal-project/shoal/flat"
)

// span is one range request: bytes [start, end) of blob, serving blocks.
type span struct {
	blob       uint32
	start, end uint64
	blocks     []flat.Block // in offset order
}

// plan groups blocks into range requests. Blocks of one blob are merged into
// one span while the bytes between them are at most gap and the span stays
// within maxSize; a block larger than maxSize gets a span of its own. Blocks
// are taken in (blob, offset) order whatever their order in the argument,
// which is left untouched; duplicate IDs are fetched once.
func plan(blocks []flat.Block, gap, maxSize int64) []span {
	sorted := slices.Clone(blocks)
	slices.SortFunc(sorted, func(a, b flat.Block) int {
		return cmp.Or(cmp.Compare(a.Blob, b.Blob), cmp.Compare(a.Offset, b.Offset), cmp.Compare(a.CLen, b.CLen))
	})
	seen := make(map[flat.BlockID]struct{}, len(sorted))
	var out []span
	for _, b := range sorted {
		if _, dup := seen[b.ID]; dup {
			continue
		}
		seen[b.ID] = struct{}{}
		end := b.Offset + uint64(b.CLen)
		if n := len(out); n > 0 {
			s := &out[n-1]
			if s.blob == b.Blob && b.Offset <= s.end+uint64(gap) && int64(max(end, s.end)-s.start) <= maxSize {
				s.end = max(s.end, end)
				s.blocks = append(s.blocks, b)
				continue
			}
		}
		out = append(out, span{blob: b.Blob, start: b.Offset, end: end, blocks: []flat.Block{b}})
	}
	return out
}
