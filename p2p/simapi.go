package p2p

import (
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// This file exposes to the simulator (package simulation) the parts of the
// swarm's behaviour that are not pure functions of policy.go but that a
// faithful replay must take from here rather than copy: the configuration
// defaults the daemon runs with, the limits of one FetchMany, how a peer's
// blocks are cut into requests, the per-peer scores peer choice reads
// (latency EWMA, load, rests), and the upload-slot admission. Each is a
// thin view of the code the daemon runs; nothing here changes it.

// Defaults returns the configuration a Node runs with when every field is
// left zero: the daemon's defaults (upload slots, announce interval,
// origin wait, hedge delay, busy back-off, ...).
func Defaults() Config {
	c, err := Config{}.withDefaults()
	if err != nil {
		panic("p2p: the zero Config is invalid: " + err.Error())
	}
	return c
}

// Limits of one PeerSource.FetchMany call.
const (
	// MaxRounds is how often one call re-plans the blocks still missing.
	MaxRounds = maxRounds
	// ParallelPeers bounds the peers one call asks at once.
	ParallelPeers = parallelPeers
	// HintLimit bounds the peers one call keeps as hinted holders of one
	// block (COMING answers naming its recipients).
	HintLimit = hintLimit
)

// Batches splits one peer's blocks into requests as FetchMany does: at most
// MaxRequestBlocks blocks and MaxRequestBytes bytes each (at least one
// block).
func Batches(bs []flat.Block) [][]flat.Block { return batches(bs) }

// ForceBatches splits one peer's blocks into requests as a FetchMany round
// does when some of them are asked with FORCE (ForceSpread): those apart,
// first. forced[i] says whether batch i is sent with FORCE.
func ForceBatches(bs []flat.Block, force map[flat.BlockID]bool) (batches [][]flat.Block, forced []bool) {
	batches, flags := forceBatches(bs, force)
	forced = make([]bool, len(flags))
	for i, f := range flags {
		forced[i] = f&flagForce != 0
	}
	return batches, forced
}

// PeerScores is the table a node keeps about its peers — labels, latency
// EWMA, requests in flight, rests after BUSY or failures — and the view of
// it that ChoosePeers ranks. It is not safe for concurrent use beyond what
// the node's own table allows (it is that table).
type PeerScores struct{ t *peerTable }

// NewPeerScores returns an empty table.
func NewPeerScores() *PeerScores { return &PeerScores{t: newPeerTable()} }

// SetLabels records p's zone and rack, as a have hello does.
func (s *PeerScores) SetLabels(p peer.ID, zone, rack string) { s.t.setLabels(p, zone, rack) }

// Begin and End bracket a request to p, for its in-flight count.
func (s *PeerScores) Begin(p peer.ID) { s.t.begin(p) }

// End ends a request Begin started.
func (s *PeerScores) End(p peer.ID) { s.t.end(p) }

// Success records a request p answered, with its time to first byte.
func (s *PeerScores) Success(p peer.ID, firstByte time.Duration, blocks int) {
	s.t.success(p, firstByte, blocks)
}

// Failure records a request to p that timed out or broke.
func (s *PeerScores) Failure(p peer.ID, timeout time.Duration, now time.Time) {
	s.t.failure(p, timeout, now)
}

// Busy records a BUSY answer: p is not asked again until until.
func (s *PeerScores) Busy(p peer.ID, until time.Time) { s.t.busy(p, until) }

// Unreachable records that no connection to p could be made: p is not
// designated again until until.
func (s *PeerScores) Unreachable(p peer.ID, until time.Time) { s.t.unreachable(p, until) }

// Usable reports whether p may be asked at now.
func (s *PeerScores) Usable(p peer.ID, now time.Time) bool { return s.t.usable(p, now) }

// Designatable reports whether p may be asked as a designated fetcher at
// now (rests after BUSY do not count).
func (s *PeerScores) Designatable(p peer.ID, now time.Time) bool { return s.t.designatable(p, now) }

// View returns what peer choice knows about p, and whether p may be asked
// at now.
func (s *PeerScores) View(p peer.ID, now time.Time) (PeerView, bool) { return s.t.view(p, now) }

// Latency returns p's latency EWMA (0 if never measured).
func (s *PeerScores) Latency(p peer.ID) time.Duration {
	pi, _ := s.t.info(p)
	return pi.Latency
}

// UploadSlots is a node's upload-slot admission: a block request from p
// is served only if one of the slots is free and p holds fewer than its
// share of them, else it is answered BUSY. (Preempting stalled responses
// does not arise: simulated readers never stall.)
type UploadSlots struct{ u *uploader }

// PerPeerSlots is Config.UploadStreamsPerPeer with its default applied,
// for a node with streams slots (Config.MaxUploadStreams).
func PerPeerSlots(streams, perPeer int) int { return perPeerSlots(streams, perPeer) }

// NewUploadSlots returns the admission of a node with streams slots
// (Config.MaxUploadStreams), perPeer of them at most for one peer
// (Config.UploadStreamsPerPeer).
func NewUploadSlots(streams, perPeer int) *UploadSlots {
	return &UploadSlots{u: newUploader(streams, perPeer, 0)}
}

// TryAcquire takes a slot for a response to p without waiting, as a plain
// request does; ok is false when none may be had (the request is answered
// BUSY).
func (s *UploadSlots) TryAcquire(p peer.ID) (release func(), ok bool) {
	up, _, _ := s.u.acquire(p, nil)
	if up == nil {
		return nil, false
	}
	return up.release, true
}

// Full reports whether every slot is taken.
func (s *UploadSlots) Full() bool { return s.u.active() >= s.u.total }
