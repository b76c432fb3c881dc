package node

import (
	"context"
	"fmt"

	"github.com/shoal-project/shoal/flat"
)

// Progress is how far a prefetch has come, in uncompressed block bytes.
type Progress struct {
	Blocks     int   `json:"blocks"`
	Done       int   `json:"done"`
	Bytes      int64 `json:"bytes"`
	DoneBytes  int64 `json:"done_bytes"`
	Downloaded int64 `json:"downloaded"` // bytes that were not in the cache yet
}

// prefetchBatch is how many blocks one FetchMany asks for: adjacent blocks
// of a blob, so the registry sees a few large merged ranges and peers a few
// batched requests.
const prefetchBatch = 64

// Prefetch fills the block cache with every block of img, in block-table
// order (blob order), through the image's chain: cache, then peers, then
// the registry. report, if not nil, is called after each batch.
func (n *Node) Prefetch(ctx context.Context, img *Image, report func(Progress)) (Progress, error) {
	x := img.Index
	p := Progress{Blocks: len(x.Blocks)}
	for _, b := range x.Blocks {
		p.Bytes += int64(b.ULen)
	}
	for start := 0; start < len(x.Blocks); start += prefetchBatch {
		batch := x.Blocks[start:min(start+prefetchBatch, len(x.Blocks))]
		var missing []flat.Block
		for _, b := range batch {
			if ok, err := n.store.Has(ctx, b.ID); err != nil || !ok {
				missing = append(missing, b)
			}
		}
		if len(missing) > 0 {
			got, err := img.Chain.FetchMany(ctx, missing)
			if err != nil {
				return p, fmt.Errorf("prefetch %s: %w", img.Ref, err)
			}
			for _, data := range got {
				p.Downloaded += int64(len(data))
			}
		}
		for _, b := range batch {
			p.Done++
			p.DoneBytes += int64(b.ULen)
		}
		if report != nil {
			report(p)
		}
	}
	return p, nil
}
