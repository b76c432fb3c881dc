package p2p

import (
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// The peer table stays bounded however many peer IDs pass through it —
// askers, hinted holders, providers — and what it drops first are the
// peers that matter least: a peer with a request in flight, a connected
// one and a penalised one outlive 100,000 strangers.
func TestPeerTableBounded(t *testing.T) {
	t.Parallel()
	now := time.Now()
	tab := newPeerTable()
	const inFlight, connected, liar, labelled = peer.ID("in flight"), peer.ID("connected"), peer.ID("liar"), peer.ID("labelled")
	tab.pinned = func() []peer.ID { return []peer.ID{connected} }
	tab.begin(inFlight)
	tab.setLabels(connected, "z1", "r1")
	for range 3 {
		tab.strike(liar, 3, time.Hour, now)
	}
	tab.setLabels(labelled, "z2", "r2")
	largest := 0
	for i := range 100_000 {
		p := peer.ID(fmt.Sprintf("stranger %d", i))
		switch i % 4 {
		case 0:
			tab.sent(p, 3) // a BUSY answer to an asker
		case 1:
			tab.success(p, time.Millisecond, 1)
		case 2:
			tab.failure(p, time.Second, now)
		case 3:
			tab.unreachable(p, now.Add(-time.Second)) // a hinted peer, rest over
		}
		if i == 50 {
			tab.setLabels(labelled, "z2", "r2") // used early, then never again
		}
		tab.mu.Lock()
		largest = max(largest, len(tab.m))
		tab.mu.Unlock()
	}
	t.Logf("100,000 peers passed through; the table held %d at most (bound %d), %d now", largest, maxPeerEntries, len(tab.m))
	if largest > maxPeerEntries+1 {
		t.Errorf("the table held %d entries, bound %d", largest, maxPeerEntries)
	}
	if pi, ok := tab.info(inFlight); !ok || pi.InFlight != 1 {
		t.Errorf("the peer with a request in flight: %+v, %v", pi, ok)
	}
	tab.end(inFlight)
	if pi, _ := tab.info(inFlight); pi.InFlight != 0 {
		t.Errorf("in flight %d after end, want 0", pi.InFlight)
	}
	if pi, ok := tab.info(connected); !ok || pi.Zone != "z1" {
		t.Errorf("the connected peer lost its entry: %+v, %v", pi, ok)
	}
	if !tab.isAvoided(liar, now) {
		t.Error("the penalised peer is no longer avoided")
	}
	if _, ok := tab.info(labelled); ok {
		t.Error("a peer unused since 100,000 others passed is still in the table")
	}
}

// The access table stays bounded and never locks newcomers out: peers
// that each prove access (anyone who can read a private image can, under
// as many peer IDs as it likes) fill it, and a new peer still gets an
// entry; what goes first are the oldest verifications, while a peer in
// the middle of a handshake and a penalised one stay.
func TestAccessTableFull(t *testing.T) {
	t.Parallel()
	a := newAccess()
	now := time.Now()
	const image = "sha256:private"
	a.mu.Lock()
	pending := a.peerLocked("pending", now)
	pending.pending[image] = make(chan struct{})
	penalised := a.peerLocked("penalised", now)
	penalised.blocked = now.Add(time.Hour)
	a.mu.Unlock()
	for i := range 3 * maxAccessPeers {
		a.verify(peer.ID(fmt.Sprintf("sybil %d", i)), image, now.Add(time.Duration(i)*time.Millisecond))
	}
	a.verify("newcomer", image, now.Add(time.Hour))
	a.mu.Lock()
	size := len(a.peers)
	_, okPending := a.peers["pending"]
	_, okPenalised := a.peers["penalised"]
	a.mu.Unlock()
	t.Logf("%d peers verified; the table holds %d (bound %d)", 3*maxAccessPeers+1, size, maxAccessPeers)
	if size > maxAccessPeers {
		t.Errorf("the access table holds %d peers, bound %d", size, maxAccessPeers)
	}
	if !a.verified("newcomer", image, now.Add(time.Hour)) {
		t.Error("a newcomer could not be verified with the table full")
	}
	if a.verified("sybil 0", image, now) {
		t.Error("the oldest verification outlived 3 tables' worth of newer ones")
	}
	if !okPending || !okPenalised {
		t.Errorf("kept: the peer with a handshake in flight %v, the penalised peer %v; want both", okPending, okPenalised)
	}
}
