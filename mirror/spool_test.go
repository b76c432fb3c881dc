package mirror

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// spoolBytes is the disk the mirror in dir holds in spool files right now:
// the blocks allocated to the (unlinked) files under dir/tmp that this
// process has open.
func spoolBytes(t *testing.T, dir string) int64 {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	prefix := filepath.Join(dir, "tmp") + "/"
	var n int64
	for _, e := range fds {
		p := filepath.Join("/proc/self/fd", e.Name())
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, prefix) {
			continue
		}
		if fi, err := os.Stat(p); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
	}
	return n
}

// peak samples f every few milliseconds until stop is called, and
// returns the largest value seen.
func peak(f func() int64) (stop func() int64) {
	var max atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			if v := f(); v > max.Load() {
				max.Store(v)
			}
			select {
			case <-done:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	})
	return func() int64 {
		close(done)
		wg.Wait()
		if v := f(); v > max.Load() {
			max.Store(v)
		}
		return max.Load()
	}
}

// fakePeer is one provider, in process, with a given recipe and blocks. It
// notes what the mirror asks of it, and the mirror's spool when it is
// struck.
type fakePeer struct {
	digest string
	recipe []byte
	blocks map[flat.BlockID][]byte
	dir    string // the mirror's, for spoolBytes
	t      *testing.T

	mu            sync.Mutex
	blockRequests int
	strikes       int
	spoolAtStrike int64
}

func (p *fakePeer) Providers(_ context.Context, key string) ([]string, error) {
	if key != p.digest {
		return nil, nil
	}
	return []string{"hostile"}, nil
}

func (p *fakePeer) Recipe(context.Context, string, string) ([]byte, error) { return p.recipe, nil }

func (p *fakePeer) Blocks(_ context.Context, _, _ string, want []flat.Block) (map[flat.BlockID][]byte, error) {
	p.mu.Lock()
	p.blockRequests++
	p.mu.Unlock()
	out := map[flat.BlockID][]byte{}
	for _, b := range want {
		if data, ok := p.blocks[b.ID]; ok {
			out[b.ID] = data
		}
	}
	return out, nil
}

func (p *fakePeer) Strike(string) {
	n := spoolBytes(p.t, p.dir)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.strikes++
	p.spoolAtStrike = max(p.spoolAtStrike, n)
}

func (p *fakePeer) Provide(context.Context, string) error { return nil }

func (p *fakePeer) counts() (requests, strikes int, spool int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blockRequests, p.strikes, p.spoolAtStrike
}

// TestHostileRecipe: a peer's recipe that does not agree with the blob's
// size as the upstream stated it (at the access check) is refused before
// anything is asked or written, and the peer is struck; the client gets
// the blob from upstream. Among them, a recipe that repeats one block the
// peer really holds (it verifies) for a size 400 times the blob's, which
// used to be written at every offset that named it.
func TestHostileRecipe(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	blob, d := up.pushBlob(t, "hr/x:v1", layerSize)
	honest, err := cut(d, blob)
	if err != nil {
		t.Fatal(err)
	}
	honestBlocks := map[flat.BlockID][]byte{}
	for i := range honest.ids {
		id, off, n := honest.block(i)
		honestBlocks[id] = blob[off : off+n]
	}
	zero := make([]byte, ChunkSize)
	zeroID := flat.Sum(zero)

	repeated := &recipe{digest: honest.digest, size: 1 << 30, chunk: ChunkSize}
	for range repeated.size / ChunkSize {
		repeated.ids = append(repeated.ids, zeroID)
	}
	longer := &recipe{digest: honest.digest, size: honest.size + ChunkSize, chunk: ChunkSize, ids: append(append([]flat.BlockID(nil), honest.ids...), zeroID)}
	shorter := &recipe{digest: honest.digest, size: honest.size - 1, chunk: ChunkSize, ids: honest.ids}
	// The blob cut at another chunk size, with the right IDs: a recipe
	// that would assemble into the right blob, but is not the one every
	// node makes, and not what the size fixes.
	small := &recipe{digest: honest.digest, size: honest.size, chunk: 64 << 10}
	smallBlocks := map[flat.BlockID][]byte{}
	for off := int64(0); off < small.size; off += small.chunk {
		b := blob[off:min(off+small.chunk, small.size)]
		small.ids = append(small.ids, flat.Sum(b))
		smallBlocks[flat.Sum(b)] = b
	}

	for _, tc := range []struct {
		name   string
		r      *recipe
		blocks map[flat.BlockID][]byte
	}{
		{"one block repeated for 1 GiB", repeated, map[flat.BlockID][]byte{zeroID: zero}},
		{"a block too many", longer, map[flat.BlockID][]byte{zeroID: zero}},
		{"a byte short", shorter, honestBlocks},
		{"64 KiB chunks", small, smallBlocks},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := &fakePeer{digest: d, recipe: tc.r.encode(), blocks: tc.blocks, t: t}
			m := startMirror(t, up, nil, p, nil)
			p.dir = m.dir
			spool := peak(func() int64 { return spoolBytes(t, m.dir) })
			resp, body, err := do(t, "GET", m.srv.URL+"/v2/hr/x/blobs/"+d, nil)
			m.settle(t)
			peakSpool := spool()
			if err != nil || resp.StatusCode != 200 || digestOf(body) != d {
				t.Fatalf("GET: %d, %d bytes hashing to %s, %v", resp.StatusCode, len(body), digestOf(body), err)
			}
			requests, strikes, atStrike := p.counts()
			st := m.m.Stats()
			t.Logf("block requests %d, strikes %d, spool when struck %d bytes, spool peak %d bytes; stats %+v",
				requests, strikes, atStrike, peakSpool, st)
			if strikes != 1 || st.BadPeerBlobs != 1 {
				t.Errorf("peer struck %d times, %d bad peer blobs; want 1 and 1", strikes, st.BadPeerBlobs)
			}
			if requests != 0 || atStrike != 0 {
				t.Errorf("the recipe was acted on: %d block requests, %d spool bytes when the peer was struck; want none", requests, atStrike)
			}
			if peakSpool > 2*int64(len(blob)) {
				t.Errorf("spool peaked at %d bytes for a blob of %d", peakSpool, len(blob))
			}
			if st.ServedPeers != 0 || st.FetchedUpstream != int64(len(blob)) {
				t.Errorf("served %d from peers, fetched %d upstream; want 0 and %d", st.ServedPeers, st.FetchedUpstream, len(blob))
			}
		})
	}
}

// TestSpoolTooSmall: a blob larger than the block cache's quota (it could
// never be kept) or than MaxSpool is not spooled: it is streamed from
// upstream to each client, verified, with nothing written or kept. HEAD and
// Range work as for any blob; a corrupt upstream is cut short; an upstream
// that does not announce the size gets 503.
func TestSpoolTooSmall(t *testing.T) {
	t.Parallel()
	const limit = 8 << 20
	up := startUpstream(t)
	blob, d := up.pushBlob(t, "q/big:v1", 20<<20)
	for _, tc := range []struct {
		name  string
		opts  []blockstore.Option
		tweak func(*Config)
	}{
		{"cache quota", []blockstore.Option{blockstore.WithQuota(limit)}, nil},
		{"MaxSpool", nil, func(c *Config) { c.MaxSpool = limit }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := openStore(t, "", tc.opts...)
			m := startMirror(t, up, store, nil, tc.tweak)
			url := m.srv.URL + "/v2/q/big/blobs/" + d
			spool := peak(func() int64 { return spoolBytes(t, m.dir) })
			resp, body, err := do(t, "GET", url, nil)
			m.settle(t)
			peakSpool := spool()
			t.Logf("blob of %d bytes, limit %d: spool peak %d bytes, cache holds %d; stats %+v",
				len(blob), limit, peakSpool, store.Stats().Bytes, m.m.Stats())
			if err != nil || resp.StatusCode != 200 || digestOf(body) != d {
				t.Fatalf("GET: %d, %d bytes hashing to %s, %v", resp.StatusCode, len(body), digestOf(body), err)
			}
			if peakSpool > limit {
				t.Errorf("spool peaked at %d bytes, past the limit of %d", peakSpool, limit)
			}
			if st := m.m.Stats(); st.SpoolRefused == 0 || st.Kept != 0 || st.ServedUpstream != int64(len(blob)) {
				t.Errorf("stats: %+v", st)
			}

			resp, body, err = do(t, "HEAD", url, nil)
			if err != nil || resp.StatusCode != 200 || resp.ContentLength != int64(len(blob)) || len(body) != 0 {
				t.Errorf("HEAD: %d, Content-Length %d, %d body bytes, %v", resp.StatusCode, resp.ContentLength, len(body), err)
			}
			for _, rng := range []struct {
				h          string
				start, end int
			}{{"bytes=100-199", 100, 200}, {"bytes=-10", len(blob) - 10, len(blob)}} {
				resp, body, err = do(t, "GET", url, map[string]string{"Range": rng.h})
				if err != nil || resp.StatusCode != http.StatusPartialContent || string(body) != string(blob[rng.start:rng.end]) {
					t.Errorf("GET %s: %d, %d bytes, %v", rng.h, resp.StatusCode, len(body), err)
				}
			}
			m.settle(t)
			if n := store.Stats().Reserved; n != 0 || m.m.Stats().SpoolBytes != 0 {
				t.Errorf("%d bytes still reserved in the cache, %d by the spool", n, m.m.Stats().SpoolBytes)
			}
		})
	}

	// One mirror for the hostile upstreams; each case after the other, as
	// they flip the upstream's switches.
	m := startMirror(t, up, nil, nil, func(c *Config) { c.MaxSpool = limit })
	url := m.srv.URL + "/v2/q/big/blobs/" + d
	up.corrupt.Store(true)
	resp, body, err := do(t, "GET", url, nil)
	up.corrupt.Store(false)
	if err == nil || digestOf(body) == d || int64(len(body)) >= resp.ContentLength {
		t.Errorf("corrupt upstream: %d, %d of %d bytes, %v; want a response cut short", resp.StatusCode, len(body), resp.ContentLength, err)
	}
	if st := m.m.Stats(); st.UpstreamMismatches == 0 {
		t.Errorf("mismatch not counted: %+v", st)
	}
	m.settle(t)

	// Without a size from upstream, neither at the access check nor in
	// the answer, the spool grows as bytes arrive, up to the limit; then
	// the blob cannot be streamed either (no Content-Length to give).
	up.noLength.Store(true)
	defer up.noLength.Store(false)
	m = startMirror(t, up, nil, nil, func(c *Config) { c.MaxSpool = limit })
	spool := peak(func() int64 { return spoolBytes(t, m.dir) })
	resp, body, err = do(t, "GET", m.srv.URL+"/v2/q/big/blobs/"+d, nil)
	m.settle(t)
	peakSpool := spool()
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable || ociCode(t, body) != "UNAVAILABLE" {
		t.Errorf("upstream without a size: %d %s, %v; want 503 UNAVAILABLE", resp.StatusCode, body, err)
	}
	t.Logf("upstream without a size: %d %s; spool peak %d bytes", resp.StatusCode, body, peakSpool)
	if st := m.m.Stats(); st.SpoolBytes != 0 || st.Kept != 0 || st.SpoolRefused != 1 || peakSpool > limit {
		t.Errorf("spool peak %d bytes, stats: %+v", peakSpool, st)
	}
}

// TestSpoolWithinFreeSpace: on a 48 MiB file system holding the cache
// (whose guard keeps 16 MiB free) and the mirror's state, a 40 MiB blob
// is not spooled: it is streamed from upstream, verified, and the file
// system never gets fuller than the guard allows. A blob that does fit is
// spooled and kept as before.
func TestSpoolWithinFreeSpace(t *testing.T) {
	t.Parallel()
	dir := testenv.Tmpfs(t, 48<<20)
	const reserve = 16 << 20
	up := startUpstream(t)
	blob, d := up.pushBlob(t, "fs/big:v1", 40<<20)
	smallBlob, sd := up.pushBlob(t, "fs/small:v1", 4<<20)
	store := openStore(t, filepath.Join(dir, "blocks"), blockstore.WithMinFreeSpace(reserve),
		blockstore.WithMemTableSize(1<<20), blockstore.WithValueLogFileSize(8<<20))
	m := startMirror(t, up, store, nil, func(c *Config) { c.Dir = filepath.Join(dir, "mirror") })

	free := func() int64 {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			t.Error(err)
		}
		return int64(st.Bavail) * int64(st.Bsize)
	}
	t.Logf("free at start: %d bytes", free())
	used := peak(func() int64 { return 48<<20 - free() })
	resp, body, err := do(t, "GET", m.srv.URL+"/v2/fs/big/blobs/"+d, nil)
	m.settle(t)
	fullest := used()
	t.Logf("blob of %d bytes: file system at most %d bytes used (%d free), spool %d; stats %+v",
		len(blob), fullest, 48<<20-fullest, spoolBytes(t, m.dir), m.m.Stats())
	if err != nil || resp.StatusCode != 200 || digestOf(body) != d {
		t.Fatalf("GET: %d, %d bytes hashing to %s, %v", resp.StatusCode, len(body), digestOf(body), err)
	}
	if 48<<20-fullest < reserve/2 {
		t.Errorf("the file system got down to %d bytes free; the cache keeps %d", 48<<20-fullest, reserve)
	}

	resp, body, err = do(t, "GET", m.srv.URL+"/v2/fs/small/blobs/"+sd, nil)
	if err != nil || resp.StatusCode != 200 || digestOf(body) != sd {
		t.Fatalf("GET small: %d, %d bytes hashing to %s, %v", resp.StatusCode, len(body), digestOf(body), err)
	}
	m.settle(t)
	if _, _, ok := m.m.keep.recipe(t.Context(), sd, 1<<30); !ok {
		t.Errorf("a blob of %d bytes that fits was not kept", len(smallBlob))
	}
}
