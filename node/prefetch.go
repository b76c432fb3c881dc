package node

import (
	"context"
	"fmt"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/seeder"
)

// Progress is how far a prefetch has come, in stored (compressed) block
// bytes, as they cross the network.
type Progress = seeder.Progress

// prefetchBatchBytes is the stored bytes of one batch: a few large merged
// range requests toward the registry, one batched request per peer.
const prefetchBatchBytes = 8 << 20

// Prefetch fills the block cache with every block of img through the
// image's chain (cache, then peers, then the registry): the blocks of its
// start-up trace first, if one was published, then the rest in block-table
// (blob) order, two batches at a time, at prefetch priority (below reads,
// above background fills). report, if not nil, is called after each batch.
func (n *Node) Prefetch(ctx context.Context, img *Image, report func(Progress)) (Progress, error) {
	s := seeder.Start(ctx, img.Index, img.Chain, n.store, seeder.Config{
		Trace: img.Trace, Fill: true, FillPriority: fetch.Prefetch, BatchBytes: prefetchBatchBytes,
		Parallel: 2, FillParallel: 2, OnProgress: report, Log: n.cfg.log,
	})
	<-s.Done()
	s.Stop()
	p := s.Progress()
	if err := s.Err(); err != nil {
		return p, fmt.Errorf("prefetch %s: %w", img.Ref, err)
	}
	return p, nil
}
