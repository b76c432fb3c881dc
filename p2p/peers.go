package p2p

import (
	"math/bits"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// PeerInfo is what this node knows about one peer.
type PeerInfo struct {
	ID         peer.ID
	Zone, Rack string
	// Latency is the moving average (EWMA, α = 0.3) of the time from sending
	// a block request to the first byte of the answer; 0 until measured.
	Latency time.Duration
	// Strikes counts wrong blocks since the last cool-down ended.
	Strikes int
	// AvoidedUntil is when the peer may be asked again after BadBlockStrikes
	// strikes (zero if it is not avoided).
	AvoidedUntil time.Time
	// BusyUntil is when a peer that answered BUSY may be asked again.
	BusyUntil  time.Time
	BadBlocks  int64 // wrong blocks received from it, ever
	Failures   int   // consecutive failed requests (timeouts, resets)
	BlocksRecv int64
}

// peerTable keeps per-peer labels and scores. Peers are never removed: the
// table holds a few hundred bytes per peer ever met, and a penalty must
// outlive a reconnect.
type peerTable struct {
	mu sync.Mutex
	m  map[peer.ID]*PeerInfo
}

func newPeerTable() *peerTable { return &peerTable{m: map[peer.ID]*PeerInfo{}} }

// get returns p's entry, creating it; t.mu must be held.
func (t *peerTable) get(p peer.ID) *PeerInfo {
	pi := t.m[p]
	if pi == nil {
		pi = &PeerInfo{ID: p}
		t.m[p] = pi
	}
	return pi
}

func (t *peerTable) info(p peer.ID) (PeerInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi, ok := t.m[p]
	if !ok {
		return PeerInfo{ID: p}, false
	}
	return *pi, true
}

func (t *peerTable) setLabels(p peer.ID, zone, rack string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.get(p)
	pi.Zone, pi.Rack = zone, rack
}

const ewmaAlpha = 0.3

// success records a request that answered, with its time to first byte.
func (t *peerTable) success(p peer.ID, firstByte time.Duration, blocks int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.get(p)
	pi.Failures = 0
	pi.BlocksRecv += int64(blocks)
	if pi.Latency == 0 {
		pi.Latency = firstByte
	} else {
		pi.Latency = time.Duration(ewmaAlpha*float64(firstByte) + (1-ewmaAlpha)*float64(pi.Latency))
	}
}

// failure records a request that timed out or broke. The latency estimate
// takes the timeout as a sample, so a peer that keeps failing sinks in the
// order; three failures in a row also earn a short rest.
func (t *peerTable) failure(p peer.ID, timeout time.Duration, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.get(p)
	pi.Failures++
	pi.Latency = time.Duration(ewmaAlpha*float64(timeout) + (1-ewmaAlpha)*float64(pi.Latency))
	if pi.Failures >= 3 {
		pi.BusyUntil = now.Add(10 * time.Second)
	}
}

func (t *peerTable) busy(p peer.ID, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.get(p).BusyUntil = until
}

// strike records a wrong block from p and reports whether p is now avoided.
func (t *peerTable) strike(p peer.ID, limit int, coolDown time.Duration, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.get(p)
	pi.BadBlocks++
	if !pi.AvoidedUntil.IsZero() && now.After(pi.AvoidedUntil) {
		pi.Strikes, pi.AvoidedUntil = 0, time.Time{} // served its time
	}
	pi.Strikes++
	if pi.Strikes >= limit {
		pi.AvoidedUntil = now.Add(coolDown)
		return true
	}
	return false
}

// rank is a peer's place in the order of preference for one request.
// Lower is better; peers of equal rank are chosen at random.
type rank struct {
	locality int // 0 same zone and rack, 1 same zone, 2 elsewhere or unknown
	latency  int // log2 of the latency EWMA in µs: peers within 2x are equals
}

func (r rank) less(o rank) bool {
	if r.locality != o.locality {
		return r.locality < o.locality
	}
	return r.latency < o.latency
}

// unmeasuredLatency ranks a peer never asked: about a LAN round trip, so
// that a new peer is tried before a known slow one but after a known fast
// one.
const unmeasuredLatency = 2 * time.Millisecond

// usable reports whether p may be asked now, and its rank. t.mu must be held.
func (t *peerTable) usable(p peer.ID, zone, rack string, now time.Time) (rank, bool) {
	pi := t.m[p]
	if pi == nil {
		pi = &PeerInfo{}
	}
	if now.Before(pi.AvoidedUntil) || now.Before(pi.BusyUntil) {
		return rank{}, false
	}
	r := rank{locality: 2}
	if zone != "" && pi.Zone == zone {
		r.locality = 1
		if rack != "" && pi.Rack == rack {
			r.locality = 0
		}
	}
	lat := pi.Latency
	if lat <= 0 {
		lat = unmeasuredLatency
	}
	r.latency = bits.Len64(uint64(lat / time.Microsecond))
	return r, true
}

func (t *peerTable) avoided(now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, pi := range t.m {
		if now.Before(pi.AvoidedUntil) {
			n++
		}
	}
	return n
}
