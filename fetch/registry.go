package fetch

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/shoal-project/shoal/flat"
)

// RegistryName is the Name of the Registry source, and how the Chain knows
// which of its sources is the origin.
const RegistryName = "registry"

// Registry reads the blocks of one flat image from its registry with HTTP
// Range requests on the data blobs. Get it from Image.Registry. It is safe
// for concurrent use. Every block it returns has been decompressed and
// verified against its ID.
type Registry struct {
	cfg   *config
	c     *blobClient
	blobs []flat.Blob
	ref   string
	sched *scheduler // shared by all calls: demand before prefetch before fill

	blocks  atomic.Int64 // verified blocks returned
	retries atomic.Int64 // range requests repeated after a failure
	corrupt atomic.Int64 // blocks that arrived not matching their ID
}

var (
	_ Source = (*Registry)(nil)
	_ interface {
		Fetch(context.Context, flat.Block) ([]byte, error)
	} = (*Registry)(nil)
)

// RegistryStats counts a Registry's traffic since it was made.
type RegistryStats struct {
	Requests      int64 `json:"requests"`       // HTTP requests, retries and the index download included
	Bytes         int64 `json:"bytes"`          // response body bytes received
	Blocks        int64 `json:"blocks"`         // verified blocks returned
	Retries       int64 `json:"retries"`        // range requests repeated
	CorruptBlocks int64 `json:"corrupt_blocks"` // blocks received that failed verification
}

// Name implements Source.
func (r *Registry) Name() string { return RegistryName }

// Stats returns the counters.
func (r *Registry) Stats() RegistryStats {
	return RegistryStats{
		Requests:      r.c.requests.Load(),
		Bytes:         r.c.bytes.Load(),
		Blocks:        r.blocks.Load(),
		Retries:       r.retries.Load(),
		CorruptBlocks: r.corrupt.Load(),
	}
}

// Fetch returns the verified, uncompressed bytes of one block of the image.
func (r *Registry) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	got, err := r.FetchMany(ctx, []flat.Block{b})
	if data, ok := got[b.ID]; ok {
		return data, nil
	}
	if err == nil { // cannot happen: every block FetchMany does not return has an error
		err = fmt.Errorf("block %s: not returned", b.ID)
	}
	return nil, err
}

// FetchMany implements Source. It merges the blocks into as few range
// requests as the merge gap and the request size cap allow, runs up to the
// configured number of them at once, and retries failed requests (only for
// the blocks still missing) with backoff. It returns every block it could
// fetch and verify; if any is missing the error says why, wrapping
// flat.ErrCorruptBlock if the registry kept sending bad bytes, ErrNotFound,
// ErrDenied or ErrTimeout. The blocks must come from this image's index.
func (r *Registry) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	out := make(map[flat.BlockID][]byte, len(blocks))
	var fails failures
	pending := make([]flat.Block, 0, len(blocks))
	for _, b := range blocks {
		if int(b.Blob) >= len(r.blobs) || b.Offset+uint64(b.CLen) > r.blobs[b.Blob].Size || b.CLen == 0 {
			fails.add(1, fmt.Errorf("block %s (blob %d, bytes %d+%d): %w: not in this image's data blobs", b.ID, b.Blob, b.Offset, b.CLen, errBadRequest))
			continue
		}
		pending = append(pending, b)
	}

	for attempt := 1; len(pending) > 0; attempt++ {
		spans := plan(pending, r.cfg.mergeGap, r.cfg.maxRequest)
		results := make([]spanResult, len(spans))
		g := errgroup.Group{}
		g.SetLimit(r.cfg.parallel)
		for i := range spans {
			g.Go(func() error {
				results[i] = r.fetchSpan(ctx, spans[i])
				return nil
			})
		}
		_ = g.Wait() // the goroutines report through results

		pending = pending[:0]
		var retryErr error
		for i, res := range results {
			for id, data := range res.got {
				out[id] = data
			}
			if len(res.failed) == 0 {
				continue
			}
			if ctx.Err() == nil && retryable(res.err) && attempt < r.cfg.attempts {
				pending = append(pending, res.failed...)
				retryErr = cmpRetry(retryErr, res.err)
				r.retries.Add(1)
				r.cfg.log.Debug("range request failed, will retry", "component", "fetch", "ref", r.ref,
					"blob", r.blobs[spans[i].blob].Digest, "start", spans[i].start, "end", spans[i].end,
					"attempt", attempt, "err", res.err)
				continue
			}
			fails.add(len(res.failed), res.err)
		}
		if len(pending) > 0 {
			if err := sleep(ctx, r.cfg.retryDelay(attempt, retryErr)); err != nil {
				fails.add(len(pending), err)
				break
			}
		}
	}
	r.blocks.Add(int64(len(out)))
	if fails.n > 0 {
		return out, fmt.Errorf("%s: %d of %d blocks failed: %w", r.ref, fails.n, len(blocks), fails.err())
	}
	return out, nil
}

// cmpRetry keeps the error whose retry should wait longest: one carrying a
// Retry-After.
func cmpRetry(cur, next error) error {
	var se *statusError
	if cur == nil || (errors.As(next, &se) && se.retryAfter > 0) {
		return next
	}
	return cur
}

type spanResult struct {
	got    map[flat.BlockID][]byte
	failed []flat.Block
	err    error // why failed is not empty
}

// fetchSpan does one range request and decodes and verifies its blocks.
func (r *Registry) fetchSpan(ctx context.Context, s span) spanResult {
	blob := r.blobs[s.blob]
	n := int64(s.end - s.start)
	if r.sched != nil {
		release, err := r.sched.acquire(ctx, PriorityOf(ctx))
		if err != nil {
			return spanResult{failed: s.blocks, err: err}
		}
		defer release()
	}
	body, err := r.c.get(ctx, blob.Digest, int64(s.start), n, int64(blob.Size), false, r.cfg.timeout)
	if err != nil {
		return spanResult{failed: s.blocks, err: fmt.Errorf("GET %s bytes %d-%d (%d blocks): %w", blob.Digest, s.start, s.end-1, len(s.blocks), err)}
	}
	res := spanResult{got: make(map[flat.BlockID][]byte, len(s.blocks))}
	for _, b := range s.blocks {
		raw := body[b.Offset-s.start : b.Offset-s.start+uint64(b.CLen)]
		data, err := flat.DecodeBlock(b, raw, nil)
		if err != nil {
			r.corrupt.Add(1)
			r.cfg.log.Warn("registry sent a corrupt block", "component", "fetch", "ref", r.ref, "blob", blob.Digest, "block", b.ID.String(), "err", err)
			res.failed = append(res.failed, b)
			if res.err == nil {
				res.err = fmt.Errorf("GET %s bytes %d-%d: %w", blob.Digest, s.start, s.end-1, err)
			}
			continue
		}
		res.got[b.ID] = data
	}
	return res
}

// failures gathers why blocks failed: a count, and a few distinct reasons.
type failures struct {
	n    int
	errs []error
	more int
}

func (f *failures) add(n int, err error) {
	f.n += n
	for _, e := range f.errs {
		if e.Error() == err.Error() {
			return
		}
	}
	if len(f.errs) < 3 {
		f.errs = append(f.errs, err)
	} else {
		f.more++
	}
}

func (f *failures) err() error {
	if f.more > 0 {
		return joinErrors(append(f.errs, fmt.Errorf("and %d more errors", f.more))...)
	}
	return joinErrors(f.errs...)
}
