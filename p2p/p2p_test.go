package p2p

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// A holds an image's blocks; B finds A through the DHT, learns its bitmap
// and reads every block through the fetch chain with no registry at all;
// B's announcements reach A; C, bootstrapped from B alone, finds both.
func TestFetchFromPeers(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("fetch-from-peers", 40, 64<<10)

	a := startNode(t, Config{Blocks: openStore(t, im, nil), Zone: "z1"})
	if err := a.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatalf("A join: %v", err)
	}

	bStore := openStore(t, nil, nil)
	b := startNode(t, Config{Blocks: bStore, Zone: "z2", Rack: "r9", BootstrapPeers: a.Addrs()})
	start := time.Now()
	if err := b.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatalf("B join: %v", err)
	}
	t.Logf("B joined in %v", time.Since(start))
	if !allHeld(b, im, a.ID()) {
		t.Fatalf("after JoinImage, B does not know that A holds every block (peers %v)", b.ImagePeers(im.digest))
	}
	if pi, _ := b.PeerInfo(a.ID()); pi.Zone != "z1" {
		t.Errorf("B's view of A's zone = %q, want z1", pi.Zone)
	}

	chain, err := fetch.NewChain(bStore, []fetch.Source{b.Source(im.digest)})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	got, err := chain.FetchMany(ctx, im.index.Blocks)
	if err != nil {
		t.Fatalf("FetchMany: %v", err)
	}
	t.Logf("fetched %d blocks (%d KiB) from A in %v", len(got), len(im.index.Blocks)*64, time.Since(start))
	if len(got) != len(im.index.Blocks) {
		t.Fatalf("got %d blocks, want %d", len(got), len(im.index.Blocks))
	}
	checkBlocks(t, im, got)
	if st := chain.Stats(); st.BytesFromRegistry != 0 || st.BlocksFetched != int64(len(im.index.Blocks)) {
		t.Errorf("chain stats %+v: want every block from peers", st)
	}
	if st := b.Stats(); st.BlocksFetched != int64(len(im.index.Blocks)) || st.BadBlocks != 0 {
		t.Errorf("B stats %+v", st)
	}
	if st := a.Stats(); st.BlocksServed != int64(len(im.index.Blocks)) || st.BytesUploaded != int64(len(im.index.Blocks))*64<<10 {
		t.Errorf("A stats %+v", st)
	}

	// B stored what it fetched and announces it; A learns it within a few
	// announce intervals, and B's labels came with the hello.
	b.Announce(im.ids()...)
	eventually(t, 5*time.Second, "A to learn B's blocks", func() bool { return allHeld(a, im, b.ID()) })
	if pi, _ := a.PeerInfo(b.ID()); pi.Zone != "z2" || pi.Rack != "r9" {
		t.Errorf("A's view of B's labels = %q/%q, want z2/r9", pi.Zone, pi.Rack)
	}
	b.Withdraw(im.index.Blocks[3].ID)
	eventually(t, 5*time.Second, "A to learn B dropped block 3", func() bool { return !holds(a, im.digest, 3, b.ID()) })
	if !holds(a, im.digest, 4, b.ID()) {
		t.Errorf("withdrawing block 3 dropped block 4 too")
	}

	// C knows only B; the DHT leads it to A as well.
	c := startNode(t, Config{BootstrapPeers: b.Addrs()})
	if err := c.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatalf("C join: %v", err)
	}
	eventually(t, 10*time.Second, "C to see A and B", func() bool {
		return allHeld(c, im, a.ID()) && holds(c, im.digest, 0, b.ID()) && !holds(c, im.digest, 3, b.ID())
	})
	got, err = c.Source(im.digest).FetchMany(ctx, im.index.Blocks[:10])
	if err != nil || len(got) != 10 {
		t.Fatalf("C FetchMany: %d blocks, %v", len(got), err)
	}
	checkBlocks(t, im, got)
	if st := c.Stats(); st.ImagePeers != 2 || st.Images != 1 {
		t.Errorf("C stats %+v: want 2 image peers", st)
	}
}

// A peer that serves corrupt bytes is caught, penalised and avoided; the
// blocks come from an honest peer and no wrong byte is returned.
func TestCorruptPeer(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("corrupt-peer", 12, 32<<10)

	honest := startNode(t, Config{Blocks: openStore(t, im, nil), Zone: "far"})
	// The liar shares B's zone, so B asks it first.
	liar := startNode(t, Config{Blocks: corruptGetter{openStore(t, im, nil)}, Zone: "near", BootstrapPeers: honest.Addrs()})
	for _, n := range []*Node{honest, liar} {
		if err := n.JoinImage(ctx, im.digest, im.index); err != nil {
			t.Fatal(err)
		}
	}
	key, _ := ImageKey(im.digest)
	eventually(t, 10*time.Second, "the liar's record to reach the honest node", func() bool {
		provs, _ := honest.FindProviders(ctx, key, 5)
		return slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == liar.ID() })
	})

	b := startNode(t, Config{Zone: "near", BadBlockStrikes: 1, BootstrapPeers: honest.Addrs()})
	if err := b.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "B to see both holders", func() bool {
		return allHeld(b, im, honest.ID()) && allHeld(b, im, liar.ID())
	})

	got, err := b.Source(im.digest).FetchMany(ctx, im.index.Blocks)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("FetchMany: %d of %d blocks, %v", len(got), len(im.index.Blocks), err)
	}
	checkBlocks(t, im, got)
	st := b.Stats()
	if st.BadBlocks != 1 || st.AvoidedPeers != 1 {
		t.Errorf("B stats %+v: want one bad block and one avoided peer", st)
	}
	pi, _ := b.PeerInfo(liar.ID())
	if pi.BadBlocks != 1 || !pi.AvoidedUntil.After(time.Now()) {
		t.Errorf("liar's record %+v: want a strike and a cool-down", pi)
	}
	if pi, _ := b.PeerInfo(honest.ID()); pi.BadBlocks != 0 || pi.BlocksRecv != int64(len(im.index.Blocks)) {
		t.Errorf("honest peer's record %+v", pi)
	}

	// Avoided: the next read does not ask the liar at all.
	served := liar.Stats().BlocksServed
	got, err = b.Source(im.digest).FetchMany(ctx, im.index.Blocks[:4])
	if err != nil || len(got) != 4 {
		t.Fatalf("second FetchMany: %d blocks, %v", len(got), err)
	}
	checkBlocks(t, im, got)
	if liar.Stats().BlocksServed != served {
		t.Errorf("the avoided peer was asked again")
	}
}

// The only holder dies in the middle of a large batch: the fetch returns
// the blocks that arrived and an error for the rest, promptly.
func TestPeerKilledMidTransfer(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const nblocks, size = 48, 256 << 10
	im := newTestImage("killed-mid-transfer", nblocks, size)

	// 4 MiB/s: the 12 MiB batch would take three seconds.
	a := startNode(t, Config{Blocks: openStore(t, im, nil), UploadBytesPerSec: 4 << 20})
	if err := a.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	b := startNode(t, Config{BootstrapPeers: a.Addrs()})
	if err := b.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	if !allHeld(b, im, a.ID()) {
		t.Fatal("B does not know A's blocks")
	}

	type result struct {
		got map[flat.BlockID][]byte
		err error
		at  time.Time
	}
	done := make(chan result, 1)
	go func() {
		got, err := b.Source(im.digest).FetchMany(ctx, im.index.Blocks)
		done <- result{got, err, time.Now()}
	}()
	eventually(t, 10*time.Second, "A to serve some blocks", func() bool { return a.Stats().BlocksServed >= 4 })
	killed := time.Now()
	if err := a.Close(); err != nil {
		t.Logf("close A: %v", err)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("FetchMany hangs after its peer died")
	}
	t.Logf("FetchMany returned %v after the peer died: %d of %d blocks, err %v", r.at.Sub(killed), len(r.got), nblocks, r.err)
	if r.at.Sub(killed) > 3*time.Second {
		t.Errorf("FetchMany took %v after the peer died", r.at.Sub(killed))
	}
	if len(r.got) == 0 || len(r.got) == nblocks {
		t.Errorf("got %d blocks: want some but not all", len(r.got))
	}
	if r.err == nil {
		t.Error("no error for the missing blocks")
	}
	checkBlocks(t, im, r.got)
	eventually(t, 5*time.Second, "B to drop the dead peer's bitmap", func() bool { return len(b.ImagePeers(im.digest)) == 0 })
}

// With one upload slot, a second concurrent request gets BUSY and its
// blocks fall through to the next source of the chain.
//
// 16 blocks, not a few: the second fetcher does not wait for the blocks it
// is itself the designated fetcher of (the registry source has them). Its
// origin group holds A and itself at least, so with 4 blocks it was
// designated for all of them in about one run in 16, and the read ended a
// third of OriginWait in (found under load, when the DHT lookup returns
// fewer members).
func TestBusy(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("busy", 16, 16<<10)
	gate := make(chan struct{})
	var once sync.Once
	openGate := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(openGate)

	a := startNode(t, Config{Blocks: gatedGetter{openStore(t, im, nil), gate}, MaxUploadStreams: 1})
	if err := a.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	var fetchers []*Node
	for range 2 {
		// OriginWait bounds the read; 3 s leaves room for several BUSY
		// answers BusyBackoff (30 ms) apart on a loaded machine (at 500
		// ms and a load of 20, the first answer took all of it).
		n := startNode(t, Config{BootstrapPeers: a.Addrs(), FirstByteTimeout: 10 * time.Second, OriginWait: 3 * time.Second})
		if err := n.JoinImage(ctx, im.digest, im.index); err != nil {
			t.Fatal(err)
		}
		if !allHeld(n, im, a.ID()) {
			t.Fatal("fetcher does not know A's blocks")
		}
		fetchers = append(fetchers, n)
	}

	first := make(chan error, 1)
	go func() {
		got, err := fetchers[0].Source(im.digest).FetchMany(ctx, im.index.Blocks)
		if err == nil && len(got) != len(im.index.Blocks) {
			err = errors.New("short")
		}
		first <- err
	}()
	eventually(t, 10*time.Second, "A to be serving the first fetcher", func() bool { return a.Stats().ActiveUploads == 1 })

	chain, err := fetch.NewChain(nil, []fetch.Source{fetchers[1].Source(im.digest), mapSource{im.data}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := chain.FetchMany(ctx, im.index.Blocks)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("second fetcher through the chain: %d blocks, %v", len(got), err)
	}
	checkBlocks(t, im, got)
	// A busy holder is asked again after its rest (BusyBackoff), until
	// OriginWait after the read began; then the registry.
	if d, wait := time.Since(start), fetchers[1].cfg.OriginWait; d < wait || d >= 2*wait {
		t.Errorf("the read took %v with the only holder BUSY; want OriginWait (%v) and a registry read", d, wait)
	}
	if st := chain.Stats(); st.BytesFromRegistry != int64(len(im.index.Blocks))*16<<10 {
		t.Errorf("chain stats %+v: want every block from the stand-in registry", st)
	}
	if st := fetchers[1].Stats(); st.BusyReceived < 2 || st.AwaitRounds < 1 {
		t.Errorf("second fetcher stats %+v: want the busy holder asked again", st)
	}
	if st := a.Stats(); st.BusyAnswers < 2 {
		t.Errorf("A stats %+v: want BUSY sent each time", st)
	}

	openGate()
	if err := <-first; err != nil {
		t.Fatalf("first fetcher: %v", err)
	}
}

// Nodes with the same pre-shared key connect; a node with another key, or
// none, cannot.
func TestPrivateNetwork(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	v1 := filepath.Join(dir, "swarm.key")
	raw := filepath.Join(dir, "psk.hex")
	const keyHex = "3a8f41b2c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f70"
	if err := os.WriteFile(v1, []byte("/key/swarm/psk/1.0.0/\n/base16/\n"+keyHex+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(raw, []byte(keyHex+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a := startNode(t, Config{PSKFile: v1})
	b := startNode(t, Config{PSKFile: raw})
	other := startNode(t, Config{PSK: []byte("0123456789abcdef0123456789abcdef")})
	open := startNode(t, Config{})

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := b.Connect(ctx, a.Addrs()[0]); err != nil {
		t.Fatalf("same key: %v", err)
	}
	for name, n := range map[string]*Node{"other key": other, "no key": open} {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := n.Connect(cctx, a.Addrs()[0])
		cancel()
		if err == nil {
			t.Errorf("%s: connected to a private network", name)
		}
	}
}

// Provider records published by one node of a 30-node DHT are found by
// every other node. It also measures what a provide costs once the network
// has settled, which is why blocks get no records of their own (see the
// package doc). Not parallel: 30 hosts starting at once saturate two cores,
// and the other tests' two-second deadlines should not pay for that.
func TestDHTConverges(t *testing.T) {
	if testing.Short() {
		t.Skip("30 hosts")
	}
	const size = 30
	start := time.Now()
	nodes := make([]*Node, size)
	nodes[0] = startNode(t, Config{})
	for i := 1; i < size; i++ {
		// Each node knows the first one and its predecessor.
		boot := nodes[0].Addrs()
		if i > 1 {
			boot = append(boot, nodes[i-1].Addrs()...)
		}
		nodes[i] = startNode(t, Config{BootstrapPeers: boot})
	}
	for i, n := range nodes {
		eventually(t, 20*time.Second, fmt.Sprintf("node %d's routing table", i), func() bool { return n.dht.RoutingTable().Size() > 0 })
	}
	t.Logf("%d nodes up, each with a routing table, in %v", size, time.Since(start))

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	im := newTestImage("dht-30", 0, 0)
	key, _ := ImageKey(im.digest)
	provider := nodes[size-1]
	start = time.Now()
	if err := provider.Provide(ctx, key); err != nil {
		t.Fatalf("Provide: %v", err)
	}
	t.Logf("the first provide took %v (while every node still refreshes its routing table)", time.Since(start))

	start = time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var missed []int
	var slowest time.Duration
	for i, n := range nodes[:size-1] {
		wg.Go(func() {
			t0 := time.Now()
			provs, err := n.FindProviders(ctx, key, 1)
			d := time.Since(t0)
			mu.Lock()
			defer mu.Unlock()
			slowest = max(slowest, d)
			if err != nil || len(provs) != 1 || provs[0].ID != provider.ID() {
				missed = append(missed, i)
			}
		})
	}
	wg.Wait()
	if len(missed) > 0 {
		t.Fatalf("nodes %v did not find the provider", missed)
	}
	t.Logf("%d concurrent lookups all found it in %v (slowest %v)", size-1, time.Since(start), slowest)

	// What per-block records would cost: more provides, one after another,
	// once the routing tables have settled.
	eventually(t, 20*time.Second, "routing tables to fill", func() bool {
		for _, n := range nodes {
			if n.dht.RoutingTable().Size() < size/2 {
				return false
			}
		}
		return true
	})
	start = time.Now()
	const records = 20
	for i := range records {
		if err := provider.Provide(ctx, flat.Sum([]byte{byte(i)}).CID()); err != nil {
			t.Fatalf("Provide block %d: %v", i, err)
		}
	}
	t.Logf("%d block records took %v (%v each)", records, time.Since(start), time.Since(start)/records)
}

// A holder that does not answer within FirstByteTimeout is skipped: its
// blocks fall through to the next source promptly.
func TestSlowPeerFallsThrough(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("slow-peer", 3, 8<<10)
	gate := make(chan struct{}) // never opened: A hangs in Get
	a := startNode(t, Config{Blocks: gatedGetter{openStore(t, im, nil), gate}})
	if err := a.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	b := startNode(t, Config{BootstrapPeers: a.Addrs(), FirstByteTimeout: 300 * time.Millisecond})
	if err := b.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	if !allHeld(b, im, a.ID()) {
		t.Fatal("B does not know A's blocks")
	}
	chain, err := fetch.NewChain(nil, []fetch.Source{b.Source(im.digest), mapSource{im.data}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := chain.FetchMany(ctx, im.index.Blocks)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("FetchMany: %d blocks, %v", len(got), err)
	}
	checkBlocks(t, im, got)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a silent peer held the read for %v", d)
	}
	if pi, _ := b.PeerInfo(a.ID()); pi.Failures != 1 {
		t.Errorf("A's record %+v: want one failure", pi)
	}
	if st := b.Stats(); st.FailedRequests != 1 {
		t.Errorf("B stats %+v: want one failed request", st)
	}
}
