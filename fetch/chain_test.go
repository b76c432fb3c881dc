package fetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
)

func newChain(t testing.TB, cache Cache, sources ...Source) *Chain {
	t.Helper()
	c, err := NewChain(cache, sources, WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestChainServesRepeatsFromTheCache(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	store, _ := openStore(t)
	chain := newChain(t, store, im.Registry())
	blocks := im.Index().Blocks
	b := blocks[7]

	for i := range 2 {
		data, err := chain.Fetch(t.Context(), b)
		if err != nil || !b.ID.Verify(data) {
			t.Fatalf("fetch %d: %v", i, err)
		}
	}
	if n := f.reg.rangeRequests.Load(); n != 1 {
		t.Errorf("%d range requests for two fetches of one block, want 1", n)
	}
	st := chain.Stats()
	want := Stats{BytesFromCache: int64(b.ULen), BytesFromRegistry: int64(b.ULen), BlocksFromCache: 1, BlocksFetched: 1,
		Sources: []SourceStats{{Name: RegistryName, Blocks: 1, Bytes: int64(b.ULen)}}}
	if fmt.Sprint(st) != fmt.Sprint(want) {
		t.Errorf("Stats = %+v, want %+v", st, want)
	}

	// A batch: the cached block is not asked for again, the rest are merged.
	bytes0 := f.reg.rangeBytes.Load()
	got, err := chain.FetchMany(t.Context(), blocks)
	if err != nil || len(got) != len(blocks) {
		t.Fatalf("FetchMany: %d of %d, %v", len(got), len(blocks), err)
	}
	if n := f.reg.rangeRequests.Load(); n > 3 {
		t.Errorf("%d range requests in all; the batch should merge around the cached block", n)
	}
	bytes1 := f.reg.rangeBytes.Load()
	if _, err := chain.FetchMany(t.Context(), blocks); err != nil {
		t.Fatal(err)
	}
	if f.reg.rangeBytes.Load() != bytes1 {
		t.Errorf("second batch read %d bytes from the registry, want 0", f.reg.rangeBytes.Load()-bytes1)
	}
	st = chain.Stats()
	t.Logf("batch of %d blocks: %d registry bytes; then %+v", len(blocks), bytes1-bytes0, st)
	if st.BlocksFetched != int64(len(blocks)) || st.BlocksFromCache != int64(1+1+len(blocks)) {
		t.Errorf("Stats = %+v: want every block fetched once, the rest from the cache", st)
	}
}

func TestChainSingleflight(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	store, _ := openStore(t)
	chain := newChain(t, store, im.Registry())
	f.reg.delay.Store(int64(200 * time.Millisecond)) // keep the first fetch in flight
	blocks := im.Index().Blocks

	// run starts readers at once; reader i gets the block of want(i) and
	// possibly others. It returns what each reader got for block b.
	run := func(b flat.Block, readers int, read func(i int) ([]byte, error)) [][]byte {
		results := make([][]byte, readers)
		errs := make([]error, readers)
		var wg sync.WaitGroup
		for i := range readers {
			wg.Go(func() { results[i], errs[i] = read(i) })
		}
		wg.Wait()
		for i := range readers {
			if errs[i] != nil || !b.ID.Verify(results[i]) {
				t.Fatalf("reader %d: %v", i, errs[i])
			}
		}
		return results
	}

	const readers = 16
	b := blocks[3]
	results := run(b, readers, func(int) ([]byte, error) { return chain.Fetch(t.Context(), b) })
	if n := f.reg.rangeRequests.Load(); n != 1 {
		t.Errorf("%d registry requests for %d concurrent readers of one block, want 1", n, readers)
	}
	results[0][0] ^= 0xff // every reader owns its slice
	for i := 1; i < readers; i++ {
		if !b.ID.Verify(results[i]) {
			t.Fatalf("reader %d shares its slice with reader 0", i)
		}
	}

	// Single fetches and overlapping batches share flights too: each block
	// is fetched once (a batch waits for a block another reader has in
	// flight, so there may be two requests, never more).
	b = blocks[21]
	run(b, readers, func(i int) ([]byte, error) {
		if i%2 == 0 {
			return chain.Fetch(t.Context(), b)
		}
		got, err := chain.FetchMany(t.Context(), blocks[20:23])
		return got[b.ID], err
	})
	if n := f.reg.rangeRequests.Load() - 1; n > 2 {
		t.Errorf("%d registry requests for overlapping readers of 3 blocks, want at most 2", n)
	}
	if st := chain.Stats(); st.BlocksFetched != 1+3 {
		t.Errorf("Stats = %+v, want 4 blocks fetched, each once", st)
	}
}

// TestChainWaiterOutlivesCancelledFetcher: the reader whose fetch the others
// wait on gives up; they take the block over instead of failing.
func TestChainWaiterOutlivesCancelledFetcher(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	chain := newChain(t, nil, im.Registry())
	f.reg.delay.Store(int64(300 * time.Millisecond))
	b := im.Index().Blocks[5]

	ctx, cancel := context.WithCancel(t.Context())
	first := make(chan error, 1)
	go func() {
		_, err := chain.Fetch(ctx, b)
		first <- err
	}()
	for { // wait until the first reader has claimed the block
		chain.mu.Lock()
		_, claimed := chain.inflight[b.ID]
		chain.mu.Unlock()
		if claimed {
			break
		}
		time.Sleep(time.Millisecond)
	}
	second := make(chan error, 1)
	go func() {
		data, err := chain.Fetch(t.Context(), b)
		if err == nil && !b.ID.Verify(data) {
			err = errors.New("wrong bytes")
		}
		second <- err
	}()
	// Cancel only once the second reader waits on the first one's call:
	// cancelled before it joined, it would claim the block itself and the
	// takeover would go untested.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		chain.mu.Lock()
		cl := chain.inflight[b.ID]
		joined := cl != nil && cl.waiters == 1
		chain.mu.Unlock()
		if joined {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second reader never waited on the first one's fetch")
		}
	}
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled reader: %v, want context.Canceled", err)
	}
	if err := <-second; err != nil {
		t.Errorf("waiting reader: %v", err)
	}
}

// TestChainRefetchesCorruptCachedBlock rots a block inside the real
// blockstore's badger database while the store is closed (the key layout is
// blockstore's: 'd' + the 32 digest bytes), then reads it through the chain.
func TestChainRefetchesCorruptCachedBlock(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	b := im.Index().Blocks[11]
	dir := t.TempDir()
	store, err := blockstore.Open(t.Context(), dir, blockstore.WithLogger(quiet()), blockstore.WithGCInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	good, err := im.Registry().Fetch(t.Context(), b)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Put(t.Context(), b.ID, good); err != nil {
		t.Fatal(err)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil).WithValueLogFileSize(64 << 20).WithMemTableSize(8 << 20))
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(good)
	bad[len(bad)/2] ^= 0x01
	if err := db.Update(func(txn *badger.Txn) error { return txn.Set(append([]byte{'d'}, b.ID[:]...), bad) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	store, err = blockstore.Open(t.Context(), dir, blockstore.WithLogger(quiet()), blockstore.WithGCInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })

	chain := newChain(t, store, im.Registry())
	req0 := f.reg.rangeRequests.Load()
	data, err := chain.Fetch(t.Context(), b)
	if err != nil || !bytes.Equal(data, good) {
		t.Fatalf("Fetch: %v (equal: %v)", err, bytes.Equal(data, good))
	}
	if f.reg.rangeRequests.Load() == req0 {
		t.Fatal("served without asking the registry: the tampering did not reach the store (has blockstore's key layout changed?)")
	}
	if st := chain.Stats(); st.BytesFromCache != 0 || st.BytesFromRegistry != int64(b.ULen) {
		t.Errorf("Stats = %+v, want the block from the registry", st)
	}
	// The good copy is cached again.
	if got, err := store.Get(t.Context(), b.ID); err != nil || !bytes.Equal(got, good) {
		t.Errorf("store after refetch: %v", err)
	}
}

// fakeSource serves from a map of blocks, with a twist.
type fakeSource struct {
	name  string
	have  map[flat.BlockID][]byte
	err   error // returned with whatever it has
	wrong bool  // serves bytes that do not match the IDs

	mu    sync.Mutex
	asked int
}

func (s *fakeSource) Name() string { return s.name }

func (s *fakeSource) FetchMany(_ context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	s.mu.Lock()
	s.asked += len(blocks)
	s.mu.Unlock()
	out := map[flat.BlockID][]byte{}
	for _, b := range blocks {
		if data, ok := s.have[b.ID]; ok {
			if s.wrong {
				data = bytes.Clone(data)
				data[0] ^= 1
			}
			out[b.ID] = data
		}
	}
	return out, s.err
}

func TestChainFallsThroughSources(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	blocks := im.Index().Blocks[:20]
	all, err := im.Registry().FetchMany(t.Context(), blocks)
	if err != nil {
		t.Fatal(err)
	}
	half := map[flat.BlockID][]byte{}
	for _, b := range blocks[:10] {
		half[b.ID] = all[b.ID]
	}
	var halfBytes int64
	for _, d := range half {
		halfBytes += int64(len(d))
	}
	tests := []struct {
		name          string
		peer          *fakeSource
		wantPeerBytes int64
		wantBad       int64
	}{
		{name: "peer has half", peer: &fakeSource{name: "peers", have: half}, wantPeerBytes: halfBytes},
		{name: "peer has half and fails", peer: &fakeSource{name: "peers", have: half, err: errors.New("peer went away")}, wantPeerBytes: halfBytes},
		{name: "peer has nothing", peer: &fakeSource{name: "peers"}},
		{name: "peer fails outright", peer: &fakeSource{name: "peers", err: errors.New("no route to host")}},
		{name: "peer sends wrong bytes", peer: &fakeSource{name: "peers", have: half, wrong: true}, wantBad: 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			im := f.open(t)
			chain := newChain(t, nil, tt.peer, im.Registry())
			got, err := chain.FetchMany(t.Context(), blocks)
			if err != nil {
				t.Fatal(err)
			}
			for _, b := range blocks {
				if !bytes.Equal(got[b.ID], all[b.ID]) {
					t.Fatalf("block %s: wrong or missing", b.ID)
				}
			}
			st := chain.Stats()
			var total int64
			for _, b := range blocks {
				total += int64(b.ULen)
			}
			if st.BytesFromPeers != tt.wantPeerBytes || st.BytesFromRegistry != total-tt.wantPeerBytes ||
				st.BadSourceBlocks != tt.wantBad || st.BlocksFetched != int64(len(blocks)) {
				t.Errorf("Stats = %+v; want %d bytes from peers, %d from the registry, %d bad", st, tt.wantPeerBytes, total-tt.wantPeerBytes, tt.wantBad)
			}
			if tt.peer.asked != len(blocks) {
				t.Errorf("peer asked for %d blocks, want %d", tt.peer.asked, len(blocks))
			}
		})
	}
}

// failingCache is a blockstore whose disk is full.
type failingCache struct{ *blockstore.Store }

func (failingCache) Put(context.Context, flat.BlockID, []byte) error {
	return fmt.Errorf("put: %w", blockstore.ErrNoSpace)
}

func TestChainServesWhatTheCacheRefuses(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	store, _ := openStore(t)
	chain := newChain(t, failingCache{store}, im.Registry())
	blocks := im.Index().Blocks[:5]
	for range 2 {
		got, err := chain.FetchMany(t.Context(), blocks)
		if err != nil || len(got) != len(blocks) {
			t.Fatalf("FetchMany: %d blocks, %v", len(got), err)
		}
	}
	if st := chain.Stats(); st.CachePutErrors != 10 || st.BlocksFetched != 10 || st.BytesFromCache != 0 {
		t.Errorf("Stats = %+v; want every block fetched twice and 10 put errors", st)
	}
}

func TestChainErrors(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	f.reg.setFault(always(faultCorrupt))
	chain := newChain(t, nil, &fakeSource{name: "peers"}, im.Registry())
	b := im.Index().Blocks[9]
	data, err := chain.Fetch(t.Context(), b)
	if data != nil || !errors.Is(err, flat.ErrCorruptBlock) {
		t.Fatalf("Fetch = %d bytes, %v; want flat.ErrCorruptBlock", len(data), err)
	}
	t.Logf("%v", err)

	if _, err := NewChain(nil, nil); err == nil {
		t.Error("NewChain with nothing to fetch from succeeded")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := chain.Fetch(ctx, b); !errors.Is(err, context.Canceled) {
		t.Errorf("Fetch with a cancelled context: %v", err)
	}
}

// TestChainPrefetch: a readahead hint becomes one merged request, and the
// reads that follow are cache hits.
func TestChainPrefetch(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	store, _ := openStore(t)
	chain := newChain(t, store, im.Registry())
	blocks := im.Index().Blocks[10:30]
	if _, err := chain.Fetch(t.Context(), blocks[0]); err != nil { // already cached: skipped
		t.Fatal(err)
	}
	chain.Prefetch(t.Context(), blocks)
	chain.prefetches.Wait()
	if n := f.reg.rangeRequests.Load(); n != 2 {
		t.Errorf("%d range requests, want 2 (one Fetch, one merged prefetch)", n)
	}
	for _, b := range blocks {
		if data, err := chain.Fetch(t.Context(), b); err != nil || !b.ID.Verify(data) {
			t.Fatalf("Fetch after prefetch: %v", err)
		}
	}
	if n := f.reg.rangeRequests.Load(); n != 2 {
		t.Errorf("reads after the prefetch went to the registry: %d requests", n)
	}
	st := chain.Stats()
	if st.BlocksFetched != int64(len(blocks)) || st.BlocksFromCache != int64(len(blocks)) {
		t.Errorf("Stats = %+v; want %d blocks fetched and as many cache hits", st, len(blocks))
	}

	// Hints beyond the running limit are dropped, not queued.
	f.reg.delay.Store(int64(100 * time.Millisecond))
	rest := im.Index().Blocks[40:]
	for i := range maxPrefetches + 2 {
		chain.Prefetch(t.Context(), rest[i:i+1])
	}
	chain.prefetches.Wait()
	if st := chain.Stats(); st.PrefetchDropped != 2 {
		t.Errorf("PrefetchDropped = %d, want 2", st.PrefetchDropped)
	}
}
