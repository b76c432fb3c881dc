package p2p

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// TestOriginComingLiar: a member of the origin group that answers every
// ORIGIN request COMING and never sends a block costs each reader
// ComingGrace, not OriginWait: the readers take it for unreachable and
// put its blocks to the next member, and each comes from the registry
// once, there — not once per reader.
func TestOriginComingLiar(t *testing.T) {
	t.Parallel()
	// A reader that gave up on the liar after ComingGrace (half of
	// OriginWait) has its blocks from the next member soon after; one
	// that waited out OriginWait takes more than all of it. 4 s leaves a
	// loaded machine 2 s between the two (1.53 s was seen against a
	// limit of 1.5 s with OriginWait 2 s).
	const k, wait = 4, 4 * time.Second
	im := newTestImage("origin-coming-liar", 16, 32<<10)
	nodes := startSwarm(t, im, k, 0, func(i int, c *Config) { c.OriginWait = wait })
	all := ids(nodes)
	liar := slices.Index(all, Designated(im.index.Blocks[0].ID, all, all[0]))
	if err := nodes[liar].n.setHostile(hostileComingLiar); err != nil {
		t.Fatal(err)
	}
	var live []int
	for i := range nodes {
		if i != liar {
			live = append(live, i)
		}
	}
	took := fetchAll(t, im, nodes, live)
	t.Logf("node %d lies; read times %v", liar, took)
	moved := checkMovedOnce(t, im, nodes, liar, live, "the liar")
	if moved == 0 {
		t.Fatal("the liar was designated for no block")
	}
	var undelivered int64
	for _, i := range live {
		undelivered += nodes[i].n.Stats().ComingUndelivered
		if limit := wait; took[i] >= limit {
			t.Errorf("node %d took %v (limit %v)", i, took[i], limit)
		}
	}
	if undelivered == 0 {
		t.Error("no reader took the liar for one that does not deliver")
	}
	t.Logf("%d of the liar's blocks moved to the next member; %d readers gave up on it", moved, undelivered)
}

// TestHostileModes: every mode of the adversarial harness installs, and an
// unknown one is refused; a ground identity ranks first in the origin
// group of the image it was ground for, among honest peers.
func TestHostileModes(t *testing.T) {
	t.Parallel()
	n := startNode(t, Config{})
	for _, m := range hostilities {
		if err := n.setHostile(m); err != nil {
			t.Errorf("%s: %v", m, err)
		}
	}
	if err := n.setHostile("friendly"); err == nil {
		t.Error("an unknown mode was accepted")
	}
	im := newTestImage("grind", 1, 1024)
	key, err := grindIdentity(t.Context(), im.digest, 1000)
	if err != nil {
		t.Fatal(err)
	}
	ground, _ := peer.IDFromPrivateKey(key)
	var honest []peer.ID
	for i := range 200 {
		honest = append(honest, peer.ID(fmt.Sprintf("honest-%d", i)))
	}
	id, _ := imageID(im.digest)
	if g := OriginGroup(id, append(honest, ground), "", OriginGroupSize); !slices.Contains(g, ground) {
		t.Errorf("the ground identity is not in the origin group of 201 peers")
	}
}

// TestCorruptHolderNoStall: a member that holds every block and serves
// each one corrupted is struck, then avoided; from then on the reads do not
// wait for it as a holder, call after call (each FUSE read is a call).
func TestCorruptHolderNoStall(t *testing.T) {
	t.Parallel()
	const wait = 2 * time.Second
	im := newTestImage("corrupt-holder", 16, 16<<10)
	nodes := startSwarm(t, im, 2, 0, func(i int, c *Config) { c.OriginWait = wait })
	bad := startNode(t, Config{Blocks: openStore(t, im, nil), BootstrapPeers: nodes[0].n.Addrs()})
	if err := bad.JoinImage(t.Context(), im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	if err := bad.setHostile(hostileCorrupt); err != nil {
		t.Fatal(err)
	}
	r := nodes[0]
	eventually(t, 10*time.Second, "the reader to see the corrupt node hold every block", func() bool { return allHeld(r.n, im, bad.ID()) })
	start := time.Now()
	var slowest time.Duration
	for _, b := range im.index.Blocks {
		t0 := time.Now()
		got, err := r.chain.FetchMany(t.Context(), []flat.Block{b})
		if err != nil || len(got) != 1 {
			t.Fatalf("block %s: %d, %v", b.ID, len(got), err)
		}
		checkBlocks(t, im, got)
		slowest = max(slowest, time.Since(t0))
	}
	took := time.Since(start)
	info, _ := r.n.PeerInfo(bad.ID())
	t.Logf("16 reads one after another in %v (slowest %v); the corrupt node: %d strikes", took, slowest, info.BadBlocks)
	if info.BadBlocks < 1 {
		t.Error("the corrupt node was never struck")
	}
	// Three reads may each meet it (the strikes); the rest go straight to
	// the block's designated fetcher. Waiting for it as a holder costs a
	// read a third of OriginWait or more.
	if limit := 3*wait/3 + 13*wait/10; took > limit {
		t.Errorf("16 reads took %v (limit %v): reads waited for an avoided holder", took, limit)
	}
}

// TestImageBlobDesignatedLiar: the index's designated fetcher is a member
// that never fetches it and answers NOT_FOUND — and, in the second case,
// so is the member next in line. Every node gives up on each after
// BlobGrace (until it finds the index), the first honest member in line
// reads the index from the registry, and the others have it from that
// member: not each from the registry after OriginWait.
func TestImageBlobDesignatedLiar(t *testing.T) {
	t.Parallel()
	for _, liars := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d liars", liars), func(t *testing.T) {
			t.Parallel()
			const wait = 3 * time.Second
			bs := startBlobSwarm(t, fmt.Sprintf("designated-liar-%d", liars), 5, func(c *Config) { c.OriginWait = wait })
			id := flat.Sum(bs.index)
			honest := slices.Clone(bs.ids)
			lying := map[int]bool{}
			for range liars {
				d := slices.Index(bs.ids, Designate(id, OriginGroup(bs.image, honest, "", OriginGroupSize), ""))
				if err := bs.nodes[d].setHostile(hostileComingLiar); err != nil {
					t.Fatal(err)
				}
				lying[d] = true
				honest = slices.DeleteFunc(honest, func(p peer.ID) bool { return p == bs.ids[d] })
			}
			next := slices.Index(bs.ids, Designate(id, OriginGroup(bs.image, honest, "", OriginGroupSize), ""))
			var live []int
			for i := range bs.nodes {
				if !lying[i] {
					live = append(live, i)
					bs.lookUp(t, i)
				}
			}
			type res struct {
				got  []byte
				err  error
				took time.Duration
			}
			out := make([]res, len(bs.nodes))
			var wg sync.WaitGroup
			for _, i := range live {
				wg.Go(func() {
					start := time.Now()
					x, err := bs.nodes[i].ImageIndex(t.Context(), bs.digest, id, int64(len(bs.index)))
					if errors.Is(err, ErrNoIndex) {
						bs.put(t, i, bs.index) // it reads the registry, and keeps the blob
					}
					out[i] = res{x, err, time.Since(start)}
				})
			}
			wg.Wait()
			for _, i := range live {
				r := out[i]
				t.Logf("node %d: %d bytes, %v after %v", i, len(r.got), r.err, r.took)
				if i == next {
					if !errors.Is(r.err, ErrNoIndex) {
						t.Errorf("first honest member, node %d: %v; want ErrNoIndex (designated once the liars are given up on)", i, r.err)
					}
				} else if r.err != nil || !bytes.Equal(r.got, bs.index) {
					t.Errorf("node %d: %d bytes, %v; want the index from node %d", i, len(r.got), r.err, next)
				}
				if r.took >= wait {
					t.Errorf("node %d took %v: OriginWait or more", i, r.took)
				}
				// The first honest member is designated only once it has
				// given up on every liar. Another node gives up on the
				// liars it is still waiting for, and stops once it finds
				// the index at that member: a node whose read started
				// later than that member's (a loaded machine) finds it
				// there before its own grace for the second liar ends.
				st := bs.nodes[i].Stats()
				if i == next && st.ComingUndelivered != int64(liars) || st.ComingUndelivered > int64(liars) {
					t.Errorf("node %d (first honest member: %v) gave up on %d designated fetchers, want %d", i, i == next, st.ComingUndelivered, liars)
				}
			}
		})
	}
}
