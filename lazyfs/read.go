package lazyfs

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/shoal-project/shoal/flat"
)

// handle is one open file: the state of its reader's sequential stream.
type handle struct {
	mu      sync.Mutex
	lastEnd int64 // end of the previous read; -1 before the first
	maxEnd  int64 // furthest end read so far
	hinted  int   // extents before this index have been hinted for readahead
	counted bool  // counted in FS.opens (a large file, with a backing dir)
}

func newHandle() *handle { return &handle{lastEnd: -1} }

// sequential records a read of [off, end) and reports whether it continues
// a sequential stream: it starts where the previous read ended, or it pushes
// past the furthest point read so far from inside it. The second form keeps
// the kernel's asynchronous readahead, whose requests may arrive out of
// order, counted as sequential.
func (h *handle) sequential(off, end int64) bool {
	seq := off == h.lastEnd || (off < h.maxEnd && end > h.maxEnd)
	h.lastEnd = end
	h.maxEnd = max(h.maxEnd, end)
	if !seq {
		h.hinted = 0
	}
	return seq
}

// extentAt returns the index of the extent holding byte off of a file whose
// extents start at starts (off must be inside the file).
func extentAt(starts []uint64, off uint64) int {
	return sort.Search(len(starts), func(k int) bool { return starts[k] > off }) - 1
}

// blockResult is the outcome of one block lookup.
type blockResult struct {
	data []byte
	err  error
}

// maxVecs bounds the slices of one vectored reply: the whole reply must go
// to the kernel in one writev, which takes at most IOV_MAX (1024) of them. A
// read made of more, tinier extents is copied into one buffer instead.
const maxVecs = 128

// read serves a READ of len(dest) bytes at off of regular file i: it maps
// the range to extents, looks up all their blocks at once (a read spanning
// several missing blocks waits for the slowest, not for their sum), and
// answers with slices of the blocks.
func (m *FS) read(i int32, h *handle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	e := &m.x.Entries[i]
	size := int64(e.Size)
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= size || len(dest) == 0 {
		return fuse.ReadResultData(nil), 0
	}
	end := min(off+int64(len(dest)), size)
	var arrived time.Time
	if m.cfg.observer != nil {
		arrived = time.Now()
	}
	starts := m.t.extentStarts(i)
	first := extentAt(starts, uint64(off))
	last := extentAt(starts, uint64(end-1))
	exts := e.Extents[first : last+1]

	// Look every block up; start fetches for the missing ones.
	datas := make([][]byte, len(exts))
	var pending []int // indexes into exts waiting for a fetch
	var waits []<-chan blockResult
	for k, ex := range exts {
		if k > 0 && ex.Block == exts[k-1].Block {
			continue // filled from the previous extent below
		}
		if d, ok := m.cache.get(ex.Block); ok {
			m.stats.hits.Add(1)
			datas[k] = d
			continue
		}
		m.stats.misses.Add(1)
		pending = append(pending, k)
		waits = append(waits, m.fetchAsync(ex.Block))
	}
	if h != nil && m.cfg.readahead > 0 {
		h.mu.Lock()
		seq := h.sequential(off, end)
		var ahead []uint32
		if seq {
			ahead = m.aheadBlocks(i, h, end)
		}
		h.mu.Unlock()
		m.readahead(ahead)
	}
	if len(waits) > 0 {
		m.stats.waiting.Add(1)
		for n, k := range pending {
			var r blockResult
			select {
			case r = <-waits[n]:
			case <-m.ctx.Done():
				r.err = ErrClosed
			}
			if r.err != nil {
				m.stats.waiting.Add(-1)
				m.stats.readErrors.Add(1)
				// The fetch itself logged the cause once for all its readers.
				return nil, syscall.EIO
			}
			datas[k] = r.data
		}
		m.stats.waiting.Add(-1)
	}
	if o := m.cfg.observer; o != nil {
		m.observe(o, exts, pending, arrived)
	}
	for k := 1; k < len(exts); k++ {
		if datas[k] == nil {
			datas[k] = datas[k-1]
		}
	}

	// Hand the kernel slices of the cached blocks: writev copies them
	// straight into the reply, and the blocks are immutable, so no copy
	// is made here.
	vecs := make([][]byte, len(exts))
	pos := off
	for k, ex := range exts {
		start := int64(starts[first+k])
		lo := uint64(ex.Offset) + uint64(pos-start)
		hi := uint64(ex.Offset) + uint64(min(end-start, int64(ex.Length)))
		vecs[k] = datas[k][lo:hi]
		pos = start + int64(ex.Length)
	}
	m.stats.readBytes.Add(end - off)
	if len(vecs) > maxVecs {
		n := 0
		for _, v := range vecs {
			n += copy(dest[n:], v)
		}
		return fuse.ReadResultData(dest[:n]), 0
	}
	return fuse.ReadResultVector(vecs), 0
}

// observe reports the blocks of one read to o: those in pending waited from
// arrived until now, the others not at all.
func (m *FS) observe(o AccessObserver, exts []flat.Extent, pending []int, arrived time.Time) {
	wait := time.Since(arrived)
	p := 0
	for k, ex := range exts {
		if k > 0 && ex.Block == exts[k-1].Block {
			continue
		}
		w := time.Duration(0)
		if p < len(pending) && pending[p] == k {
			w = wait
			p++
		}
		o.Touch(ex.Block, arrived, w)
	}
}

// aheadBlocks returns the blocks a sequential reader of file i that has
// reached end will need next: those of the extents after the current one, up
// to cfg.readahead distinct blocks, minus what was hinted already and what
// is cached. Called with h.mu held.
func (m *FS) aheadBlocks(i int32, h *handle, end int64) []uint32 {
	e := &m.x.Entries[i]
	if end >= int64(e.Size) {
		return nil
	}
	starts := m.t.extentStarts(i)
	cur := extentAt(starts, uint64(end-1))
	curBlock := e.Extents[cur].Block
	var out []uint32
	distinct := 0
	prev := curBlock
	// A file may name the same block over and over (runs of zeros); bound
	// the scan rather than walk a huge file's extents looking for new ones.
	limit := min(len(e.Extents), cur+1+64*m.cfg.readahead)
	k := cur + 1
	for ; k < limit && distinct < m.cfg.readahead; k++ {
		b := e.Extents[k].Block
		if b == prev || b == curBlock {
			continue
		}
		prev = b
		distinct++
		if k >= h.hinted && !m.cache.contains(b) {
			out = append(out, b)
		}
	}
	h.hinted = max(h.hinted, k)
	return out
}

// readahead hints blocks to the Prefetcher, or fetches them in the
// background into the cache. Background fetches are bounded; a hint that
// finds no free slot is dropped, since the read that needs the block will
// fetch it anyway.
func (m *FS) readahead(blocks []uint32) {
	if len(blocks) == 0 || (m.pf == nil && m.cfg.cacheBytes == 0) {
		return // nothing to do, or nowhere to keep what would be fetched
	}
	m.stats.readahead.Add(int64(len(blocks)))
	if m.pf != nil {
		// Blocks that must come from far away go out as one batch the
		// Fetcher can merge into few requests.
		bs := make([]flat.Block, len(blocks))
		for k, b := range blocks {
			bs[k] = m.x.Blocks[b]
		}
		m.pf.Prefetch(m.ctx, bs)
	}
	if m.cfg.cacheBytes == 0 {
		return
	}
	// And they are loaded into memory ahead of the reader: a Prefetcher
	// skips blocks its own cache holds, and reading those (a disk read and
	// a hash each) in the reader's path is what limits sequential reads of
	// cached images. Fetches of blocks in the batch above join it.
	for _, b := range blocks {
		if m.cache.contains(b) {
			continue
		}
		select {
		case m.sem <- struct{}{}:
		default:
			return
		}
		if !m.track() {
			<-m.sem
			return
		}
		go func() {
			defer m.bg.Done()
			defer func() { <-m.sem }()
			m.sf.Do(flightKey(b), func() (any, error) { return m.fetch(b, true) })
		}()
	}
}

type readaheadKey struct{}

// IsReadahead reports whether a Fetch is lazyfs loading a block ahead of a
// sequential reader rather than for a read that is waiting: the Fetcher may
// give it a lower priority and should not count it as a demand miss.
func IsReadahead(ctx context.Context) bool {
	v, _ := ctx.Value(readaheadKey{}).(bool)
	return v
}

func flightKey(b uint32) string { return strconv.FormatUint(uint64(b), 10) }

// fetchAsync starts a lookup of block b that joins any fetch of b already in
// flight. The goroutine belongs to the mount, so Unmount waits for it.
func (m *FS) fetchAsync(b uint32) <-chan blockResult {
	ch := make(chan blockResult, 1)
	if !m.track() {
		ch <- blockResult{err: ErrClosed}
		return ch
	}
	go func() {
		defer m.bg.Done()
		v, err, _ := m.sf.Do(flightKey(b), func() (any, error) { return m.fetch(b, false) })
		d, _ := v.([]byte)
		ch <- blockResult{data: d, err: err}
	}()
	return ch
}

// fetch gets block b through the Fetcher, checks it and caches it. It runs
// once per flight, whoever is waiting: the fetch is bound to the mount and
// the fetch timeout, never to the read that happened to start it, so an
// interrupted reader does not fail the others.
func (m *FS) fetch(b uint32, ahead bool) ([]byte, error) {
	if d, ok := m.cache.get(b); ok {
		return d, nil // a flight that ended just before this one began
	}
	blk := m.x.Blocks[b]
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.fetchTimeout)
	defer cancel()
	if ahead {
		ctx = context.WithValue(ctx, readaheadKey{}, true)
	}
	start := time.Now()
	m.stats.fetches.Add(1)
	data, err := m.f.Fetch(ctx, blk)
	if err == nil {
		if len(data) != int(blk.ULen) {
			err = fmt.Errorf("%d bytes, want %d: %w", len(data), blk.ULen, ErrCorrupt)
		} else if m.cfg.verify && !blk.ID.Verify(data) {
			err = ErrCorrupt
		}
	}
	if err != nil {
		m.stats.fetchErrors.Add(1)
		err = fmt.Errorf("fetch block %s: %w", blk.ID, err)
		if m.ctx.Err() != nil && errors.Is(err, context.Canceled) {
			m.log.Debug("fetch cancelled by unmount", "block", blk.ID.String())
		} else {
			m.log.Error("fetch failed; reads of it get EIO", "block", blk.ID.String(), "elapsed", time.Since(start), "err", err)
		}
		return nil, err
	}
	m.stats.fetchedBytes.Add(int64(len(data)))
	m.cache.add(b, data)
	return data, nil
}
