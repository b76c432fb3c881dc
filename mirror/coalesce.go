package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// RangePeers is what Peers also offers when the swarm coalesces the
// upstream reads of blobs that no peer holds yet, for the nodes pulling
// them at the same moment (p2p's blob ranges; SwarmPeers has it). The
// blob is cut into ChunkSize ranges, each with a designated fetcher among
// the nodes pulling it.
type RangePeers interface {
	// JoinPull makes this node a member of the blob's pull under key (a
	// public blob's digest, a private blob's swarm name) and refreshes its
	// view of the other members; it returns how many members it knows,
	// itself included. An error means the swarm cannot be used.
	JoinPull(ctx context.Context, key string) (int, error)
	// Designated reports whether this node is range i's designated
	// fetcher, as it sees the pull now.
	Designated(key string, i int) bool
	// Range gets range i (n bytes) from the nodes pulling the blob,
	// unverified, and names the peer it came from; any error means: read
	// it upstream. Called for a range this node is designated for, it
	// asks the other members once whether one reads it already, and
	// waits for that one.
	Range(ctx context.Context, key string, i int, n int64) ([]byte, string, error)
	// Elsewhere asks the other members once, without waiting, about a
	// range this node is designated for: one holds it (data, from), or
	// one reads it (reading: Range would wait for it), or none (read it
	// upstream).
	Elsewhere(ctx context.Context, key string, i int, n int64) (data []byte, from string, reading bool)
}

// Bounds of a pull: ranges read upstream and asked of peers at once.
const (
	pullUpstream = 4
	pullPeers    = 8
	// recentPulls is how many finished pulls the status page lists.
	recentPulls = 16
)

// State of a range in a pull.
const (
	rangeNone     int32 = iota // not here, nor planned here
	rangeQueued                // planned here: to be read upstream (COMING 0)
	rangeReading               // being read upstream (COMING: landed so far)
	rangeUpstream              // read upstream here: servable to peers
	rangePeer                  // from a peer: unverified until the whole blob is
)

// pull is one blob being assembled from ranges, for the status page and
// for peers (BlobRange).
type pull struct {
	key, digest string
	private     bool
	f           *flight
	size        int64
	started     time.Time

	mu       sync.Mutex
	live     bool // the flight's file may be read (the fetch holds it)
	planning bool // joining the pull: every range is COMING
	state    []int32
	landed   []int64  // bytes of each range in the file (reading, upstream, peer)
	from     []string // the peer each rangePeer range came from
	ended    time.Time
	err      error

	fromPeers, fromUpstream atomic.Int64
}

func (p *pull) bounds(i int) (off, n int64) {
	off = int64(i) * ChunkSize
	return off, min(ChunkSize, p.size-off)
}

// PullStatus is one blob pull, in progress or recently ended, for the
// status page.
type PullStatus struct {
	Digest                  string // "" for a private or shared blob
	Size                    int64
	Ranges, Done            int
	FromPeers, FromUpstream int64 // bytes, so far
	Started                 time.Time
	Ended                   time.Time // zero while in progress
	Err                     string
}

// Pulls lists the blob pulls in progress, then the last few that ended.
func (m *Mirror) Pulls() []PullStatus {
	m.pullMu.Lock()
	ps := make([]*pull, 0, len(m.pulls)+len(m.recent))
	for _, p := range m.pulls {
		ps = append(ps, p)
	}
	ps = append(ps, m.recent...)
	m.pullMu.Unlock()
	out := make([]PullStatus, 0, len(ps))
	for _, p := range ps {
		p.mu.Lock()
		s := PullStatus{Size: p.size, Ranges: len(p.state), FromPeers: p.fromPeers.Load(), FromUpstream: p.fromUpstream.Load(), Started: p.started, Ended: p.ended}
		if !p.private {
			s.Digest = p.digest
		}
		for _, st := range p.state {
			if st == rangeUpstream || st == rangePeer {
				s.Done++
			}
		}
		if p.err != nil {
			s.Err = p.err.Error()
		}
		p.mu.Unlock()
		out = append(out, s)
	}
	return out
}

// BlobRange gives peers (p2p.RangeGetter) range i of a blob: of a pull in
// progress, only a range this node read upstream itself (or any, once the
// whole blob is verified), else how far its own read of the range is; of
// a kept blob, its block i. A private blob's ranges are asked for under
// its name, which p2p serves only to peers that proved access for it.
func (m *Mirror) BlobRange(ctx context.Context, key string, i int) ([]byte, int64, bool) {
	if i < 0 {
		return nil, -1, false
	}
	m.pullMu.Lock()
	p := m.pulls[key]
	m.pullMu.Unlock()
	if p != nil {
		return p.serve(i)
	}
	d, ok := m.keyDigest(key)
	if !ok {
		return nil, -1, false
	}
	r, _, ok := m.keep.recipeOnDisk(d, m.cfg.MaxBlobSize)
	if !ok || r.chunk != ChunkSize || i >= len(r.ids) {
		return nil, -1, false
	}
	id, _, n := r.block(i)
	data, err := m.cfg.Blocks.Get(ctx, id)
	if err != nil || int64(len(data)) != n {
		return nil, -1, false
	}
	return data, 0, true
}

func (p *pull) serve(i int) ([]byte, int64, bool) {
	p.mu.Lock()
	if !p.live || i >= len(p.state) {
		p.mu.Unlock()
		return nil, -1, false
	}
	if p.planning {
		p.mu.Unlock()
		return nil, 0, false
	}
	st, landed := p.state[i], p.landed[i]
	p.f.mu.Lock()
	verified := p.f.verified
	p.f.mu.Unlock()
	switch {
	case st == rangeQueued:
		p.mu.Unlock()
		return nil, 0, false
	case st == rangeReading:
		p.mu.Unlock()
		return nil, 1 + landed, false
	case st == rangeUpstream || (st == rangePeer && verified):
	default:
		p.mu.Unlock()
		return nil, -1, false
	}
	p.f.attach() // the file stays open while it is read
	p.mu.Unlock()
	defer p.f.release()
	off, n := p.bounds(i)
	buf := make([]byte, n)
	if _, err := p.f.file.ReadAt(buf, off); err != nil {
		return nil, -1, false
	}
	return buf, 0, true
}

// fromSwarm assembles a blob of known size that no peer holds whole from
// ranges: those this node is designated for read upstream as a's client,
// the others from the nodes pulling it at the same time (RangePeers), and
// upstream any that the swarm did not deliver in time. The assembled file
// is verified against the digest before a client may read a byte of it:
// a range from a peer has no digest of its own (see docs/mirror.md,
// Pulling at the same moment). On a mismatch the ranges from peers are
// read upstream again and compared, the peers whose bytes differed are
// struck, and the blob is verified once more. ErrNoPeers means the swarm
// cannot coalesce this blob: the caller streams it from upstream.
func (m *Mirror) fromSwarm(ctx context.Context, f *flight, a *access, key string, size int64) (*recipe, error) {
	rp, ok := m.cfg.Peers.(RangePeers)
	if !ok || size < m.cfg.CoalesceMin || m.cfg.CoalesceMin < 0 {
		return nil, ErrNoPeers
	}
	if err := f.sp.truncate(size); err != nil {
		return nil, err
	}
	n := int((size + ChunkSize - 1) / ChunkSize)
	p := &pull{key: key, digest: f.digest, private: key != f.digest, f: f, size: size, started: time.Now(),
		live: true, planning: true, state: make([]int32, n), landed: make([]int64, n), from: make([]string, n)}
	// Registered before it joins: a member that found this node in the
	// pull and asks it meanwhile hears that its ranges are being planned
	// (COMING), not that it has none.
	m.pullMu.Lock()
	m.pulls[key] = p
	m.pullMu.Unlock()
	members, err := rp.JoinPull(ctx, key)
	var mine, theirs []int
	p.mu.Lock()
	for i := range n {
		if err == nil && !rp.Designated(key, i) {
			theirs = append(theirs, i)
		} else {
			p.state[i] = rangeQueued
			mine = append(mine, i)
		}
	}
	p.planning = false
	p.mu.Unlock()
	if err != nil {
		m.endPull(p, nil, false)
		return nil, fmt.Errorf("%w: %w", ErrNoPeers, err)
	}
	m.st.pulls.Add(1)
	err = m.pullRanges(ctx, rp, a, p, mine, theirs, members > 1)
	if err == nil {
		err = verifyFile(f, f.digest, size)
		if errors.Is(err, ErrDigestMismatch) {
			err = m.blame(ctx, a, p)
		}
	}
	m.endPull(p, err, true)
	m.log.Info("blob pulled in ranges", "blob", f.digest, "bytes", size, "ranges", n,
		"from_peers", p.fromPeers.Load(), "from_upstream", p.fromUpstream.Load(), "took", time.Since(p.started).Round(time.Millisecond), "err", err)
	if err != nil {
		return nil, err
	}
	r, err := recipeOfFile(f, size)
	if err != nil {
		return nil, err
	}
	f.verify(size, SourcePeers)
	return r, nil
}

// endPull takes p out of the pulls in progress, into the recent ones if
// it ran (record).
func (m *Mirror) endPull(p *pull, err error, record bool) {
	p.mu.Lock()
	p.live, p.ended, p.err = false, time.Now(), err
	p.mu.Unlock()
	m.pullMu.Lock()
	delete(m.pulls, p.key)
	if record {
		m.recent = append(m.recent, p)
	}
	if len(m.recent) > recentPulls {
		m.recent = m.recent[1:]
	}
	m.pullMu.Unlock()
}

// pullRanges fills p's ranges. Two pools of workers: pullUpstream read
// this node's ranges upstream, in order; pullPeers get the others from the
// nodes that read them, waiting for them as long as the swarm's bounds
// allow, then read upstream what did not come. An upstream worker never
// waits on a peer — a range that another member reads after all (its view
// of the pull changed, or it started first) goes to the peer workers —
// since other members wait for this node's queued ranges: an upstream
// worker held up by a wait would hold them all up. A node that found no
// other member (!others) reads its ranges one at a time and looks the pull
// up again before each: nodes that start a moment later are found after a
// range, not after the whole blob.
func (m *Mirror) pullRanges(ctx context.Context, rp RangePeers, a *access, p *pull, mine, theirs []int, others bool) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	fail := func(err error) {
		if err != nil {
			cancel(err)
		}
	}
	// toPeers never blocks: it holds every range of the blob.
	toPeers := make(chan int, len(p.state))
	for _, i := range theirs {
		toPeers <- i
	}
	var ups, peers sync.WaitGroup
	upWorkers := pullUpstream
	if !others {
		upWorkers = 1
	}
	mineQ := make(chan int, len(mine))
	for _, i := range mine {
		mineQ <- i
	}
	close(mineQ)
	for range upWorkers {
		ups.Go(func() {
			for i := range mineQ {
				if ctx.Err() != nil {
					return
				}
				_, _ = rp.JoinPull(ctx, p.key) // a fresher view, at most every few hundred ms
				if !rp.Designated(p.key, i) {
					p.set(i, rangeNone, 0)
					toPeers <- i
					continue
				}
				off, n := p.bounds(i)
				data, from, reading := rp.Elsewhere(ctx, p.key, i, n)
				switch {
				case data != nil:
					fail(m.wroteFromPeer(p, i, off, data, from))
				case reading:
					p.set(i, rangeNone, 0) // another member's now
					toPeers <- i
				default:
					fail(m.rangeUpstream(ctx, a, p, i))
				}
			}
		})
	}
	go func() {
		ups.Wait()
		close(toPeers)
	}()
	for range pullPeers {
		peers.Go(func() {
			for i := range toPeers {
				if ctx.Err() != nil {
					continue // drain
				}
				if !m.rangeFromPeers(ctx, rp, p, i) {
					fail(m.rangeUpstream(ctx, a, p, i))
				}
			}
		})
	}
	peers.Wait()
	return context.Cause(ctx)
}

func (p *pull) set(i int, st int32, landed int64) {
	p.mu.Lock()
	p.state[i], p.landed[i] = st, landed
	p.mu.Unlock()
}

// rangeFromPeers asks the swarm for range i and writes what it gets;
// false means: read it upstream.
func (m *Mirror) rangeFromPeers(ctx context.Context, rp RangePeers, p *pull, i int) bool {
	off, n := p.bounds(i)
	data, from, err := rp.Range(ctx, p.key, i, n)
	if err != nil || int64(len(data)) != n {
		m.log.Debug("range not from the swarm", "blob", p.digest, "range", i, "err", err)
		return false
	}
	return m.wroteFromPeer(p, i, off, data, from) == nil
}

// wroteFromPeer writes range i, from a peer, into the file.
func (m *Mirror) wroteFromPeer(p *pull, i int, off int64, data []byte, from string) error {
	if _, err := p.f.sp.WriteAt(data, off); err != nil {
		return err
	}
	n := int64(len(data))
	p.mu.Lock()
	p.state[i], p.landed[i], p.from[i] = rangePeer, n, from
	p.mu.Unlock()
	p.fromPeers.Add(n)
	m.st.fetchedPeers.Add(n)
	m.st.rangesPeers.Add(1)
	return nil
}

// rangeUpstream reads range i upstream as a's client into the file,
// telling peers how far it is as it goes.
func (m *Mirror) rangeUpstream(ctx context.Context, a *access, p *pull, i int) error {
	off, n := p.bounds(i)
	p.set(i, rangeReading, 0)
	err := m.readUpstreamRange(ctx, a, p.digest, off, n, p.size, func(b []byte, at int64) error {
		if _, err := p.f.sp.WriteAt(b, off+at); err != nil {
			return err
		}
		p.mu.Lock()
		p.landed[i] = at + int64(len(b))
		p.mu.Unlock()
		p.fromUpstream.Add(int64(len(b)))
		m.st.fetchedUpstream.Add(int64(len(b)))
		return nil
	})
	if err != nil {
		p.set(i, rangeNone, 0)
		return fmt.Errorf("range %d of %s: %w", i, p.digest, err)
	}
	p.set(i, rangeUpstream, n)
	m.st.rangesUpstream.Add(1)
	return nil
}

// readUpstreamRange GETs bytes off..off+n-1 of a blob of size bytes
// upstream as a's client, and hands them to put as they arrive (at is
// relative to off). The answer must be 206 with exactly that range.
func (m *Mirror) readUpstreamRange(ctx context.Context, a *access, digest string, off, n, size int64, put func(b []byte, at int64) error) error {
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	stall := time.AfterFunc(m.cfg.StallTimeout, func() {
		stop(fmt.Errorf("upstream sent nothing for %v", m.cfg.StallTimeout))
	})
	defer stall.Stop()
	end := off + n - 1
	resp, err := m.send(ctx, http.MethodGet, a, "blobs", digest, "", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(end, 10))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	want := fmt.Sprintf("bytes %d-%d/%d", off, end, size)
	if got := resp.Header.Get("Content-Range"); resp.StatusCode != http.StatusPartialContent || got != want {
		return fmt.Errorf("upstream %s: %s: %s, Content-Range %q, want 206 and %q", a.repo.RegistryStr(), digest, resp.Status, got, want)
	}
	buf := make([]byte, 64<<10)
	var at int64
	for at < n {
		k, rerr := resp.Body.Read(buf[:min(int64(len(buf)), n-at)])
		if k > 0 {
			stall.Reset(m.cfg.StallTimeout)
			if err := put(buf[:k], at); err != nil {
				return err
			}
			at += int64(k)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if c := context.Cause(ctx); c != nil {
				rerr = c
			}
			return &upstreamError{err: fmt.Errorf("upstream %s: reading %s: %w", a.repo.RegistryStr(), digest, rerr)}
		}
	}
	if at != n {
		return &upstreamError{err: fmt.Errorf("upstream %s: range of %s ended after %d of %d bytes", a.repo.RegistryStr(), digest, at, n)}
	}
	return nil
}

// blame runs after a pulled blob failed its digest: it reads every range
// that came from a peer upstream again, strikes each peer whose bytes
// differ (it sent them as read upstream itself: BlobRange serves nothing
// else), puts the upstream bytes in their place, and verifies again.
func (m *Mirror) blame(ctx context.Context, a *access, p *pull) error {
	m.st.badPeer.Add(1)
	for i := range p.state {
		p.mu.Lock()
		st, from := p.state[i], p.from[i]
		p.mu.Unlock()
		if st != rangePeer {
			continue
		}
		off, n := p.bounds(i)
		good := make([]byte, n)
		err := m.readUpstreamRange(ctx, a, p.digest, off, n, p.size, func(b []byte, at int64) error {
			copy(good[at:], b)
			p.fromUpstream.Add(int64(len(b)))
			m.st.fetchedUpstream.Add(int64(len(b)))
			return nil
		})
		if err != nil {
			return fmt.Errorf("re-reading range %d of %s upstream: %w", i, p.digest, err)
		}
		got := make([]byte, n)
		if _, err := p.f.file.ReadAt(got, off); err != nil {
			return err
		}
		if bytes.Equal(got, good) {
			continue
		}
		m.st.rangesBad.Add(1)
		m.log.Warn("peer sent a wrong blob range", "blob", p.digest, "range", i, "peer", from)
		m.cfg.Peers.Strike(from)
		if _, err := p.f.sp.WriteAt(good, off); err != nil {
			return err
		}
	}
	return verifyFile(p.f, p.digest, p.size)
}

// recipeOfFile cuts a verified file of size bytes into ChunkSize blocks.
func recipeOfFile(f *flight, size int64) (*recipe, error) {
	d, _ := parseDigest(f.digest)
	r := &recipe{digest: d, size: size, chunk: ChunkSize}
	buf := make([]byte, ChunkSize)
	for off := int64(0); off < size; off += ChunkSize {
		n := min(ChunkSize, size-off)
		if _, err := f.file.ReadAt(buf[:n], off); err != nil {
			return nil, err
		}
		r.ids = append(r.ids, flat.BlockID(sha256.Sum256(buf[:n])))
	}
	return r, nil
}
