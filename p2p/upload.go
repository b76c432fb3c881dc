package p2p

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/time/rate"
)

const (
	// uploadGrace is how far a response may fall behind
	// Config.UploadMinBytesPerSec: the stream's window and the socket
	// buffers take the first few hundred KiB at once, and a reader may
	// pause a moment.
	uploadGrace = 2 * time.Second
	// stallPreempt is how long a write of a response may have been
	// blocked on its reader before the response gives its slot up to a
	// request from another peer that finds none free: the reader has
	// taken less than paceChunk in that time (under 32 KiB/s), or is gone.
	stallPreempt = time.Second
	// slotPoll is how often a request queued for a slot (acquireWait)
	// looks again for a response to preempt: responses stall without a
	// slot being released.
	slotPoll = 50 * time.Millisecond
)

// busyReason says why a request got no upload slot.
type busyReason int

const (
	slotOK   busyReason = iota
	nodeBusy            // every slot taken, none preemptible
	peerBusy            // the asker holds its share (UploadStreamsPerPeer)
)

// uploader enforces the upload limits: a slot per response served, at
// most perPeer of them for one peer, BUSY when none may be had, and a
// token bucket shared by all responses for bytes/s. A response whose
// reader has stalled (stallPreempt) gives its slot up to a request from
// another peer that finds none free.
type uploader struct {
	total, perPeer int
	lim            *rate.Limiter // nil: unlimited

	mu    sync.Mutex
	held  []*upload     // responses holding a slot; at most total
	freed chan struct{} // closed (and replaced) when a slot frees
}

// upload is one response holding an upload slot.
type upload struct {
	u *uploader
	p peer.ID
	// stop ends the response at once (resets its stream); nil for none.
	stop func()
	// stalledSince is when the write in progress began, in Unix ns; 0
	// when no write is in progress.
	stalledSince atomic.Int64
	preempted    atomic.Bool
}

func newUploader(streams, perPeer int, bytesPerSec int64) *uploader {
	u := &uploader{total: streams, perPeer: max(1, min(perPeer, streams)), freed: make(chan struct{})}
	if bytesPerSec > 0 {
		u.lim = rate.NewLimiter(rate.Limit(bytesPerSec), max(paceChunk, int(bytesPerSec/8)))
	}
	return u
}

// acquire takes an upload slot for a response to p without waiting. If
// every slot is taken it preempts the response stalled longest, of
// another peer, if one has stalled stallPreempt; preempted tells of it
// (and its stop has been called). stop ends the new response, should it
// be preempted in turn.
func (u *uploader) acquire(p peer.ID, stop func()) (up *upload, why busyReason, preempted *upload) {
	now := time.Now().UnixNano()
	u.mu.Lock()
	defer func() {
		u.mu.Unlock()
		if preempted != nil && preempted.stop != nil {
			preempted.stop()
		}
	}()
	mine := 0
	for _, h := range u.held {
		if h.p == p {
			mine++
		}
	}
	if mine >= u.perPeer {
		return nil, peerBusy, nil
	}
	if len(u.held) >= u.total {
		victim := -1
		var since int64
		for i, h := range u.held {
			s := h.stalledSince.Load()
			if h.p != p && s != 0 && now-s >= int64(stallPreempt) && (victim < 0 || s < since) {
				victim, since = i, s
			}
		}
		if victim < 0 {
			return nil, nodeBusy, nil
		}
		preempted = u.held[victim]
		preempted.preempted.Store(true)
		u.held = append(u.held[:victim], u.held[victim+1:]...)
	}
	up = &upload{u: u, p: p, stop: stop}
	u.held = append(u.held, up)
	return up, slotOK, preempted
}

// acquireWait takes an upload slot for a response to p, waiting for one
// (or for a response to preempt) until ctx ends.
func (u *uploader) acquireWait(ctx context.Context, p peer.ID, stop func()) (up *upload, preempted *upload, err error) {
	t := time.NewTicker(slotPoll)
	defer t.Stop()
	for {
		u.mu.Lock()
		freed := u.freed
		u.mu.Unlock()
		if up, _, preempted := u.acquire(p, stop); up != nil {
			return up, preempted, nil
		}
		select {
		case <-freed:
		case <-t.C:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}

// release gives the slot back, unless the response was preempted (its
// slot went to another). It may be called more than once.
func (up *upload) release() {
	u := up.u
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, h := range u.held {
		if h == up {
			u.held = append(u.held[:i], u.held[i+1:]...)
			close(u.freed)
			u.freed = make(chan struct{})
			return
		}
	}
}

// active returns the number of slots taken.
func (u *uploader) active() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.held)
}

// pace waits until n more bytes may be sent.
func (u *uploader) pace(ctx context.Context, n int) error {
	if u.lim == nil {
		return nil
	}
	return u.lim.WaitN(ctx, n)
}

// stallWriter is a response's stream as its slot sees it: once the
// response holds a slot (up), each write marks it stalled until the write
// returns, so that a reader that stops taking bytes can be found
// (acquire).
type stallWriter struct {
	w  io.Writer
	up *upload
}

func (s *stallWriter) Write(b []byte) (int, error) {
	if s.up == nil {
		return s.w.Write(b)
	}
	s.up.stalledSince.Store(time.Now().UnixNano())
	defer s.up.stalledSince.Store(0)
	return s.w.Write(b)
}

// responseClock sets a response's write deadlines once it holds a slot:
// the whole response ends by the total deadline (Config.UploadTimeout),
// and the time spent writing may run at most uploadGrace ahead of
// written/minRate (Config.UploadMinBytesPerSec), time waiting for the
// token bucket or the block store not counted. A reader that drains
// slowly so cannot hold a slot for long; one that has taken bytes fast
// banks time, up to writeTimeout per write.
type responseClock struct {
	start, end time.Time
	minRate    int64         // bytes/s; 0: no minimum
	excluded   time.Duration // pacing and store reads
	written    int64
}

func newResponseClock(start time.Time, timeout time.Duration, minRate int64) *responseClock {
	return &responseClock{start: start, end: start.Add(timeout), minRate: max(minRate, 0)}
}

// deadline is the write deadline for n more bytes.
func (c *responseClock) deadline(n int) time.Time {
	d := time.Now().Add(writeTimeout)
	if d.After(c.end) {
		d = c.end
	}
	if c.minRate > 0 {
		owed := time.Duration(float64(c.written+int64(n)) / float64(c.minRate) * float64(time.Second))
		if r := c.start.Add(c.excluded + uploadGrace + owed); r.Before(d) {
			d = r
		}
	}
	return d
}

// exclude runs fn (pacing, a store read) without counting its time
// against the minimum rate. A nil clock (no slot held) just runs fn.
func (c *responseClock) exclude(fn func()) {
	if c == nil {
		fn()
		return
	}
	t := time.Now()
	fn()
	c.excluded += time.Since(t)
}
