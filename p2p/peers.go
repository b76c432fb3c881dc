package p2p

import (
	"cmp"
	"slices"
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
	BusyUntil time.Time
	// UnreachableUntil is when a peer that could not be reached at all (no
	// connection to it could be made) may be designated again (see
	// designatable); zero if it never failed so.
	UnreachableUntil time.Time
	BadBlocks        int64 // wrong blocks received from it, ever
	Failures         int   // consecutive failed requests (timeouts, resets)
	BlocksRecv       int64
	// InFlight is the number of block requests this node has outstanding
	// to the peer; peer choice prefers the least loaded among equals.
	InFlight int
	// BytesSent counts the block stream bytes this node wrote to the peer
	// (blocks and their frames).
	BytesSent int64
}

// maxPeerEntries bounds the peer table. A few hundred bytes a peer: 16,384
// entries are a few MiB, and hold every peer a node of a 10,000-node swarm
// meets; anyone can connect with new peer IDs, and a COMING answer's hints
// or a provider record can name any, so the table must not grow with them.
const maxPeerEntries = 1 << 14

// peerTable keeps per-peer labels and scores, for at most max peers. Past
// that, an eighth of the table goes at once, the peers that matter least
// first: never one with a request in flight or a connection up (pinned),
// and those whose scores carry a penalty (wrong blocks, unreachable) after
// those that carry none; the least recently updated first within each.
// A penalty so outlives a reconnect, except when the table is flooded
// with penalised peers, which then go oldest first.
type peerTable struct {
	mu  sync.Mutex
	m   map[peer.ID]*peerEntry
	seq uint64 // update counter: recency
	max int
	// pinned, if set, lists the peers whose entries must stay (the
	// connected ones); it is called without mu held.
	pinned   func() []peer.ID
	trimming bool
}

type peerEntry struct {
	PeerInfo
	used uint64 // seq at the last update
}

func newPeerTable() *peerTable {
	return &peerTable{m: map[peer.ID]*peerEntry{}, max: maxPeerEntries}
}

// get returns p's entry, creating it, and marks it used; t.mu must be
// held, and released with unlock.
func (t *peerTable) get(p peer.ID) *PeerInfo {
	e := t.m[p]
	if e == nil {
		e = &peerEntry{PeerInfo: PeerInfo{ID: p}}
		t.m[p] = e
	}
	t.seq++
	e.used = t.seq
	return &e.PeerInfo
}

// unlock releases t.mu, and trims the table if it has grown past max.
func (t *peerTable) unlock() {
	over := len(t.m) > t.max && !t.trimming
	if over {
		t.trimming = true
	}
	t.mu.Unlock()
	if over {
		t.trim(time.Now())
	}
}

// trim drops entries, the least valuable first (see peerTable), until
// the table holds 7/8 of max.
func (t *peerTable) trim(now time.Time) {
	keep := map[peer.ID]bool{}
	if t.pinned != nil {
		for _, p := range t.pinned() {
			keep[p] = true
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.trimming = false
	excess := len(t.m) - t.max*7/8
	if excess <= 0 {
		return
	}
	type cand struct {
		p         peer.ID
		penalised bool
		used      uint64
	}
	var cands []cand
	for p, e := range t.m {
		if e.InFlight > 0 || keep[p] {
			continue
		}
		penalised := e.Strikes > 0 || now.Before(e.AvoidedUntil) || now.Before(e.UnreachableUntil)
		cands = append(cands, cand{p, penalised, e.used})
	}
	slices.SortFunc(cands, func(a, b cand) int {
		if a.penalised != b.penalised {
			if a.penalised {
				return 1
			}
			return -1
		}
		return cmp.Compare(a.used, b.used)
	})
	for _, c := range cands[:min(excess, len(cands))] {
		delete(t.m, c.p)
	}
}

func (t *peerTable) info(p peer.ID) (PeerInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.m[p]
	if !ok {
		return PeerInfo{ID: p}, false
	}
	return e.PeerInfo, true
}

func (t *peerTable) setLabels(p peer.ID, zone, rack string) {
	t.mu.Lock()
	defer t.unlock()
	pi := t.get(p)
	pi.Zone, pi.Rack = zone, rack
}

// sent records n bytes uploaded to p.
func (t *peerTable) sent(p peer.ID, n int64) {
	if n == 0 {
		return
	}
	t.mu.Lock()
	defer t.unlock()
	t.get(p).BytesSent += n
}

const ewmaAlpha = 0.3

// success records a request that answered, with its time to first byte.
func (t *peerTable) success(p peer.ID, firstByte time.Duration, blocks int) {
	t.mu.Lock()
	defer t.unlock()
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
	defer t.unlock()
	pi := t.get(p)
	pi.Failures++
	pi.Latency = time.Duration(ewmaAlpha*float64(timeout) + (1-ewmaAlpha)*float64(pi.Latency))
	if pi.Failures >= 3 {
		pi.BusyUntil = now.Add(10 * time.Second)
	}
}

func (t *peerTable) busy(p peer.ID, until time.Time) {
	t.mu.Lock()
	defer t.unlock()
	t.get(p).BusyUntil = until
}

// strike records a wrong block from p and reports whether p is now avoided.
func (t *peerTable) strike(p peer.ID, limit int, coolDown time.Duration, now time.Time) bool {
	t.mu.Lock()
	defer t.unlock()
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

// usableLocked reports whether p may be asked now: it is not avoided after
// wrong blocks and not resting after BUSY or failures. t.mu must be held.
func (t *peerTable) usableLocked(p peer.ID, now time.Time) bool {
	pi := t.m[p]
	return pi == nil || (!now.Before(pi.AvoidedUntil) && !now.Before(pi.BusyUntil))
}

// designatable reports whether p may be asked as a designated fetcher now:
// not avoided after wrong blocks, not unreachable lately, and not resting
// after failures. A rest after BUSY does not count: a designated fetcher
// answers an ORIGIN request without an upload slot (COMING, or BUSY when
// it cannot fetch), and one that turned this node away as a holder a
// moment ago is the very peer whose fetch everybody shares; skipping it
// sent those blocks to the registry (the simulator measured 2.5 extra
// copies of each block at 1,000 nodes).
func (t *peerTable) designatable(p peer.ID, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.m[p]
	return pi == nil || (!now.Before(pi.AvoidedUntil) && !now.Before(pi.UnreachableUntil) && pi.Failures < 3)
}

// unreachable records that no connection to p could be made: p is not
// designated again until until.
func (t *peerTable) unreachable(p peer.ID, until time.Time) {
	t.mu.Lock()
	defer t.unlock()
	t.get(p).UnreachableUntil = until
}

// isAvoided reports whether p is avoided after wrong blocks.
func (t *peerTable) isAvoided(p peer.ID, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	pi := t.m[p]
	return pi != nil && now.Before(pi.AvoidedUntil)
}

// usable is usableLocked for callers that do not hold t.mu.
func (t *peerTable) usable(p peer.ID, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.usableLocked(p, now)
}

// view returns what peer choice needs to know about p, and whether p may be
// asked now.
func (t *peerTable) view(p peer.ID, now time.Time) (PeerView, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	v := PeerView{ID: p}
	if pi := t.m[p]; pi != nil {
		v.Labels = Labels{Zone: pi.Zone, Rack: pi.Rack}
		v.Latency = pi.Latency
		v.InFlight = pi.InFlight
	}
	return v, t.usableLocked(p, now)
}

// begin and end bracket a request to p, for its in-flight count.
func (t *peerTable) begin(p peer.ID) {
	t.mu.Lock()
	defer t.unlock()
	t.get(p).InFlight++
}

func (t *peerTable) end(p peer.ID) {
	t.mu.Lock()
	defer t.unlock()
	t.get(p).InFlight--
}

// slow records a request that lost a hedge race without a first byte after
// waited: the wait is a lower bound of its latency, taken as a sample, so
// the peer sinks in the order. It is not a failure: the peer may be loaded,
// not gone.
func (t *peerTable) slow(p peer.ID, waited time.Duration) {
	t.mu.Lock()
	defer t.unlock()
	pi := t.get(p)
	switch {
	case pi.Latency == 0:
		pi.Latency = waited
	case waited > pi.Latency:
		pi.Latency = time.Duration(ewmaAlpha*float64(waited) + (1-ewmaAlpha)*float64(pi.Latency))
	}
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
