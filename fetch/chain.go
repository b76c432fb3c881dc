package fetch

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
)

// Source is somewhere blocks can be fetched from: peers, the registry.
// FetchMany returns the verified, uncompressed bytes of as many of blocks as
// it can; for any it does not return, it returns an error saying why (a
// source that simply does not have a block may instead leave it out and
// return nil). Name identifies the source in stats and logs; the Chain counts
// a source named RegistryName as the registry and every other one as peers.
type Source interface {
	FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error)
	Name() string
}

// Cache is the local block cache the Chain reads first and fills with what
// it fetches; *blockstore.Store is the implementation. Get returns
// blockstore.ErrNotFound for a block it does not hold and must never return
// bytes that do not match id (the blockstore hashes on every Get, and
// returns blockstore.ErrCorrupt instead, which the Chain treats as a miss).
type Cache interface {
	Get(ctx context.Context, id flat.BlockID) ([]byte, error)
	Put(ctx context.Context, id flat.BlockID, data []byte) error
}

var _ Cache = (*blockstore.Store)(nil)

// Chain resolves blocks: the local cache first, then each source in order,
// each asked only for what the ones before it did not deliver. What it
// fetches is verified, stored in the cache, and served. Concurrent requests
// for one block, through Fetch or FetchMany, make one fetch. It is safe for
// concurrent use and satisfies lazyfs's Fetcher.
type Chain struct {
	observer Observer
	cache    Cache
	sources  []Source
	log      *slog.Logger

	mu       sync.Mutex
	inflight map[flat.BlockID]*call

	cacheBlocks, cacheBytes atomic.Int64
	putErrors, badBlocks    atomic.Int64
	bySource                []sourceCounters // parallel to sources

	prefetchSlots   chan struct{} // a token per running Prefetch batch
	prefetches      sync.WaitGroup
	prefetchDropped atomic.Int64
}

// maxPrefetches bounds the Prefetch batches running at once; hints beyond
// it are dropped, as hints may be.
const maxPrefetches = 4

type sourceCounters struct {
	blocks, bytes atomic.Int64
}

// Chain satisfies lazyfs's Fetcher and its optional Prefetcher extension.
var _ interface {
	Fetch(context.Context, flat.Block) ([]byte, error)
	Prefetch(context.Context, []flat.Block)
} = (*Chain)(nil)

// call is one block being resolved; done closes once the rest is set.
type call struct {
	done      chan struct{}
	waiters   int    // FetchMany calls waiting on it; guarded by Chain.mu
	data      []byte // private to the call: each waiter takes a copy
	err       error
	abandoned bool // the fetching caller's context ended before it finished
}

// NewChain makes a chain over cache (nil: no cache) and sources, tried in
// order (peers before the registry). Of the options, only WithLogger applies.
func NewChain(cache Cache, sources []Source, opts ...Option) (*Chain, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, fmt.Errorf("new fetch chain: %w", err)
	}
	if cache == nil && len(sources) == 0 {
		return nil, errors.New("new fetch chain: no cache and no sources")
	}
	return &Chain{
		cache:    cache,
		sources:  sources,
		log:      cfg.log.With("component", "fetch"),
		observer: cfg.observer,
		inflight: map[flat.BlockID]*call{},
		bySource: make([]sourceCounters, len(sources)),

		prefetchSlots: make(chan struct{}, maxPrefetches),
	}, nil
}

// Stats is what a Chain has served, by where the bytes came from. Bytes are
// uncompressed block bytes, each fetch counted once however many concurrent
// readers shared it.
type Stats struct {
	BytesFromCache    int64         `json:"bytes_from_cache"`
	BytesFromPeers    int64         `json:"bytes_from_peers"`
	BytesFromRegistry int64         `json:"bytes_from_registry"`
	BlocksFromCache   int64         `json:"blocks_from_cache"`
	BlocksFetched     int64         `json:"blocks_fetched"`    // from any source (cache misses)
	CachePutErrors    int64         `json:"cache_put_errors"`  // fetched blocks the cache refused
	BadSourceBlocks   int64         `json:"bad_source_blocks"` // blocks a source returned that failed verification
	PrefetchDropped   int64         `json:"prefetch_dropped"`  // Prefetch batches dropped because enough were running
	Sources           []SourceStats `json:"sources,omitempty"`
}

// SourceStats is one source's share.
type SourceStats struct {
	Name   string `json:"name"`
	Blocks int64  `json:"blocks"`
	Bytes  int64  `json:"bytes"`
}

// Stats returns the counters.
func (c *Chain) Stats() Stats {
	st := Stats{
		BytesFromCache:  c.cacheBytes.Load(),
		BlocksFromCache: c.cacheBlocks.Load(),
		CachePutErrors:  c.putErrors.Load(),
		BadSourceBlocks: c.badBlocks.Load(),
		PrefetchDropped: c.prefetchDropped.Load(),
	}
	for i, s := range c.sources {
		ss := SourceStats{Name: s.Name(), Blocks: c.bySource[i].blocks.Load(), Bytes: c.bySource[i].bytes.Load()}
		st.Sources = append(st.Sources, ss)
		st.BlocksFetched += ss.Blocks
		if ss.Name == RegistryName {
			st.BytesFromRegistry += ss.Bytes
		} else {
			st.BytesFromPeers += ss.Bytes
		}
	}
	return st
}

// Fetch returns the verified, uncompressed bytes of block b. The slice
// belongs to the caller.
func (c *Chain) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	got, err := c.FetchMany(ctx, []flat.Block{b})
	if data, ok := got[b.ID]; ok {
		return data, nil
	}
	if err == nil { // cannot happen: a block missing from got always has an error
		err = errors.New("not returned")
	}
	return nil, fmt.Errorf("fetch block %s: %w", b.ID, err)
}

// Prefetch starts fetching blocks in the background, as one batch so the
// sources can merge their requests, and stores them in the cache, where the
// Fetch calls that follow find them (a Fetch that arrives while the batch is
// in flight joins it). Blocks the cache already holds are skipped. Prefetch
// does not block: when maxPrefetches batches are running the hint is
// dropped. ctx bounds the work; lazyfs ends it at Unmount. Without a cache,
// only Fetch calls that arrive while the batch is in flight gain from it.
func (c *Chain) Prefetch(ctx context.Context, blocks []flat.Block) {
	if len(blocks) == 0 || ctx.Err() != nil {
		return
	}
	select {
	case c.prefetchSlots <- struct{}{}:
	default:
		c.prefetchDropped.Add(1)
		return
	}
	blocks = slices.Clone(blocks)
	c.prefetches.Go(func() {
		defer func() { <-c.prefetchSlots }()
		want := blocks
		if h, ok := c.cache.(interface {
			Has(context.Context, flat.BlockID) (bool, error)
		}); ok {
			want = want[:0]
			for _, b := range blocks {
				if has, err := h.Has(ctx, b.ID); err != nil || !has {
					want = append(want, b)
				}
			}
		}
		if len(want) == 0 {
			return
		}
		if _, err := c.FetchMany(ctx, want); err != nil && ctx.Err() == nil {
			c.log.Debug("prefetch incomplete", "blocks", len(want), "err", err)
		}
	})
}

// FetchMany returns the verified, uncompressed bytes of as many of blocks as
// can be had, and an error if any is missing. Blocks not already being
// fetched are resolved together, so a source can merge their requests;
// blocks another call is fetching are waited for. The slices belong to the
// caller.
func (c *Chain) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	out := make(map[flat.BlockID][]byte, len(blocks))
	var firstErr error
	failed := 0
	pending := blocks
	for len(pending) > 0 {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		mine, theirs := c.claim(pending, out)
		if len(mine) > 0 {
			got, err := c.resolveClaimed(ctx, mine)
			for _, b := range mine {
				if data, ok := got[b.ID]; ok {
					out[b.ID] = data
				} else {
					failed++
					firstErr = cmp.Or(firstErr, err)
				}
			}
		}
		pending = nil
		for _, w := range theirs {
			select {
			case <-w.call.done:
			case <-ctx.Done():
				return out, ctx.Err()
			}
			switch {
			case w.call.err == nil:
				out[w.block.ID] = bytes.Clone(w.call.data)
			case w.call.abandoned:
				// The caller that fetched it gave up; this one has not.
				pending = append(pending, w.block)
			default:
				failed++
				firstErr = cmp.Or(firstErr, w.call.err)
			}
		}
	}
	if failed > 0 {
		if len(blocks) == 1 {
			return out, firstErr
		}
		return out, fmt.Errorf("%d of %d blocks unavailable: %w", failed, len(blocks), firstErr)
	}
	return out, nil
}

// resolveClaimed resolves blocks this call claimed and publishes the
// outcome to the calls waiting for them, even if a source panics.
func (c *Chain) resolveClaimed(ctx context.Context, mine []flat.Block) (got map[flat.BlockID][]byte, err error) {
	defer func() {
		if p := recover(); p != nil {
			c.finish(mine, nil, fmt.Errorf("panic while fetching: %v", p), false)
			panic(p)
		}
	}()
	got, err = c.resolve(ctx, mine)
	c.finish(mine, got, err, ctx.Err() != nil)
	return got, err
}

type waiter struct {
	block flat.Block
	call  *call
}

// claim registers a call for every block of want that nobody is fetching
// (and that is not already in have) and returns those blocks, and the calls
// to wait for in the others. Duplicates in want are taken once.
func (c *Chain) claim(want []flat.Block, have map[flat.BlockID][]byte) (mine []flat.Block, theirs []waiter) {
	seen := make(map[flat.BlockID]struct{}, len(want))
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range want {
		if _, ok := have[b.ID]; ok {
			continue
		}
		if _, dup := seen[b.ID]; dup {
			continue
		}
		seen[b.ID] = struct{}{}
		if cl, ok := c.inflight[b.ID]; ok {
			cl.waiters++
			theirs = append(theirs, waiter{block: b, call: cl})
			continue
		}
		c.inflight[b.ID] = &call{done: make(chan struct{})}
		mine = append(mine, b)
	}
	return mine, theirs
}

// finish publishes the outcome of the claimed blocks to their waiters. No
// waiter can join once a call leaves inflight, so the count is final here.
func (c *Chain) finish(mine []flat.Block, got map[flat.BlockID][]byte, err error, abandoned bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range mine {
		cl := c.inflight[b.ID]
		delete(c.inflight, b.ID)
		if data, ok := got[b.ID]; ok {
			if cl.waiters > 0 {
				// The fetching caller owns data and may write to it while
				// the waiters copy; they copy from a private copy instead.
				cl.data = bytes.Clone(data)
			}
		} else {
			cl.err, cl.abandoned = err, abandoned
		}
		close(cl.done)
	}
}

// resolve fetches blocks through the cache and then the sources, and stores
// what the sources delivered. For any block it does not return, err says why.
func (c *Chain) resolve(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	got := make(map[flat.BlockID][]byte, len(blocks))
	missing := blocks
	if c.cache != nil {
		missing = make([]flat.Block, 0, len(blocks))
		start := time.Now()
		var hits int
		var hitBytes int64
		for _, b := range blocks {
			data, err := c.cache.Get(ctx, b.ID)
			switch {
			case err == nil && len(data) == int(b.ULen):
				got[b.ID] = data
				c.cacheBlocks.Add(1)
				c.cacheBytes.Add(int64(len(data)))
				hits++
				hitBytes += int64(len(data))
				continue
			case err == nil:
				c.log.Error("cache returned a block of the wrong length; fetching it again", "block", b.ID.String(), "len", len(data), "want", b.ULen)
			case errors.Is(err, blockstore.ErrNotFound):
			case errors.Is(err, blockstore.ErrCorrupt):
				c.log.Warn("cached copy of a block was corrupt and has been dropped; fetching it again", "block", b.ID.String(), "err", err)
			case ctx.Err() != nil:
				return got, fmt.Errorf("read cache: %w", ctx.Err())
			default:
				c.log.Warn("cache read failed; fetching the block instead", "block", b.ID.String(), "err", err)
			}
			missing = append(missing, b)
		}
		if c.observer != nil && hits > 0 {
			c.observer.Fetched("cache", hits, hitBytes, time.Since(start), nil)
		}
	}

	var errs []error
	var fetched []flat.Block
	for i, src := range c.sources {
		if len(missing) == 0 || ctx.Err() != nil {
			break
		}
		start := time.Now()
		res, err := src.FetchMany(ctx, missing)
		took := time.Since(start)
		var delivered int
		var deliveredBytes int64
		var still []flat.Block
		for _, b := range missing {
			data, ok := res[b.ID]
			if ok && (len(data) != int(b.ULen) || !b.ID.Verify(data)) {
				// A source's bug must not become an application's wrong byte.
				c.badBlocks.Add(1)
				c.log.Error("source returned bytes that do not match the block id; dropped", "source", src.Name(), "block", b.ID.String())
				ok = false
			}
			if !ok {
				still = append(still, b)
				continue
			}
			got[b.ID] = data
			fetched = append(fetched, b)
			c.bySource[i].blocks.Add(1)
			c.bySource[i].bytes.Add(int64(len(data)))
			delivered++
			deliveredBytes += int64(len(data))
		}
		if c.observer != nil {
			c.observer.Fetched(src.Name(), delivered, deliveredBytes, took, err)
		}
		if len(still) > 0 {
			if err == nil {
				err = fmt.Errorf("%d blocks not found", len(still))
			}
			errs = append(errs, fmt.Errorf("%s: %w", src.Name(), err))
			if i < len(c.sources)-1 && ctx.Err() == nil {
				c.log.Debug("source missed blocks; trying the next", "source", src.Name(), "missing", len(still), "err", err)
			}
		}
		missing = still
	}

	if c.cache != nil {
		// The bytes are paid for: store them even if the caller has gone.
		putCtx := context.WithoutCancel(ctx)
		for _, b := range fetched {
			if err := c.cache.Put(putCtx, b.ID, got[b.ID]); err != nil {
				// Serving goes on from memory. Log the first failure and then
				// every power of two, so a full disk does not flood the log.
				if n := c.putErrors.Add(1); bits.OnesCount64(uint64(n)) == 1 {
					c.log.Warn("could not cache a fetched block; serving it anyway", "block", b.ID.String(), "put_errors", n, "err", err)
				}
			}
		}
	}

	if len(missing) == 0 {
		return got, nil
	}
	if err := ctx.Err(); err != nil {
		return got, err
	}
	if len(c.sources) == 0 {
		return got, errors.New("not in the local cache, and no sources to fetch from")
	}
	return got, fmt.Errorf("no source could deliver %d blocks: %w", len(missing), joinErrors(errs...))
}
