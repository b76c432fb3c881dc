package p2p

import (
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// A provider whose address is silent (it takes the TCP connection and then
// says nothing, as a drained node's reassigned or firewalled address may)
// does not hold JoinImage for its dial bound (dialBound, 5 s), nor for FirstByteTimeout
// (8 s here, so that either wait stands well apart from a loaded machine's
// join): once DesignatedHedge has passed, JoinImage waits only until half
// of its dials have ended, and the sessions to the live providers are
// open when it returns.
func TestJoinImageSilentProvider(t *testing.T) {
	t.Parallel()
	im := newTestImage("silent-provider", 4, 16<<10)
	a := startNode(t, Config{Blocks: openStore(t, im, nil)})
	x := startNode(t, Config{Blocks: openStore(t, im, nil), BootstrapPeers: a.Addrs()})
	for _, n := range []*Node{a, x} {
		if err := n.JoinImage(t.Context(), im.digest, im.index); err != nil {
			t.Fatal(err)
		}
	}
	key, err := ImageKey(im.digest)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "A to find X's record", func() bool {
		provs, err := a.FindProviders(t.Context(), key, 10)
		return err == nil && slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == x.ID() })
	})
	// J looks the image up while X is still there (a lookup's answer is
	// reused by JoinImage; with X silent, the DHT lookup itself would
	// stall on it, which is kad-dht's business, not discover's).
	j := startNode(t, Config{BootstrapPeers: a.Addrs(), MaxImagePeers: 2, FirstByteTimeout: 8 * time.Second})
	eventually(t, 10*time.Second, "J to find A and X", func() bool {
		provs, err := j.providers(t.Context(), key, 2)
		return err == nil && len(provs) == 2
	})
	// X goes; its address now takes connections and answers nothing.
	silence(t, x, []*Node{j})

	start := time.Now()
	if err := j.JoinImage(t.Context(), im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("JoinImage with a silent provider took %v", took)
	if limit := min(j.cfg.FirstByteTimeout, dialBound) / 2; took > limit {
		t.Errorf("JoinImage took %v (limit %v): it waited for the silent provider's dial", took, limit)
	}
	if !slices.Contains(j.ImagePeers(im.digest), a.ID()) {
		t.Errorf("no session with the live provider A: %v", j.ImagePeers(im.digest))
	}
}
