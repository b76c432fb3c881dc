package p2p

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// slowRegistry is a stand-in registry that takes delay per request and
// counts what it serves, by block.
type slowRegistry struct {
	data  map[flat.BlockID][]byte
	delay time.Duration

	mu      sync.Mutex
	fetched map[flat.BlockID]int
}

func newSlowRegistry(im *testImage, delay time.Duration) *slowRegistry {
	return &slowRegistry{data: im.data, delay: delay, fetched: map[flat.BlockID]int{}}
}

func (r *slowRegistry) Name() string { return fetch.RegistryName }

func (r *slowRegistry) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	select {
	case <-time.After(r.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	out := map[flat.BlockID][]byte{}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range blocks {
		if d, ok := r.data[b.ID]; ok {
			out[b.ID] = slices.Clone(d)
			r.fetched[b.ID]++
		}
	}
	return out, nil
}

func (r *slowRegistry) count(id flat.BlockID) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fetched[id]
}

// chainSource puts a chain where the registry goes in another chain, as
// the daemon does with its cache-backed registry chain.
type chainSource struct{ c *fetch.Chain }

func (s chainSource) Name() string { return fetch.RegistryName }
func (s chainSource) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	return s.c.FetchMany(ctx, blocks)
}

// testOrigin is a node's OriginFetcher: its cache-backed registry chain,
// set once the node exists. With hang set it never delivers.
type testOrigin struct {
	c     atomic.Pointer[fetch.Chain]
	calls atomic.Int64
	hang  bool
}

func (o *testOrigin) FetchOrigin(ctx context.Context, _ string, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	o.calls.Add(1)
	if o.hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return o.c.Load().FetchMany(ctx, blocks)
}

// FetchMany makes it an ImageFetcher, for ServeOrigin.
func (o *testOrigin) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	return o.FetchOrigin(ctx, "", blocks)
}

// swarmNode is one node wired as the daemon wires it: the chain reads the
// cache, then peers, then the registry through the cache-backed registry
// chain that is also the node's origin (as Config.Origin on even nodes,
// through ServeOrigin on odd ones).
type swarmNode struct {
	n      *Node
	reg    *slowRegistry
	origin *testOrigin
	chain  *fetch.Chain
}

// startSwarm starts k nodes joined to im, holding nothing, and waits until
// each sees every other as an image peer.
func startSwarm(t *testing.T, im *testImage, k int, delay time.Duration, tweak func(i int, c *Config)) []*swarmNode {
	t.Helper()
	ctx := t.Context()
	nodes := make([]*swarmNode, k)
	for i := range nodes {
		store := openStore(t, nil, nil)
		sn := &swarmNode{reg: newSlowRegistry(im, delay), origin: &testOrigin{}}
		cfg := Config{Blocks: store}
		if i%2 == 0 {
			cfg.Origin = sn.origin // odd nodes use ServeOrigin
		}
		if i > 0 {
			cfg.BootstrapPeers = nodes[0].n.Addrs()
		}
		if tweak != nil {
			tweak(i, &cfg)
		}
		sn.n = startNode(t, cfg)
		originChain, err := fetch.NewChain(announcing{store, sn.n}, []fetch.Source{sn.reg})
		if err != nil {
			t.Fatal(err)
		}
		sn.origin.c.Store(originChain)
		if i%2 == 1 {
			sn.n.ServeOrigin(im.digest, sn.origin)
		}
		if sn.chain, err = fetch.NewChain(announcing{store, sn.n}, []fetch.Source{sn.n.Source(im.digest), chainSource{originChain}}); err != nil {
			t.Fatal(err)
		}
		nodes[i] = sn
	}
	for _, sn := range nodes {
		if err := sn.n.JoinImage(ctx, im.digest, im.index); err != nil {
			t.Fatal(err)
		}
	}
	for i, sn := range nodes {
		eventually(t, 15*time.Second, fmt.Sprintf("node %d to see %d image peers", i, k-1), func() bool {
			return len(sn.n.ImagePeers(im.digest)) == k-1
		})
	}
	return nodes
}

// announcing announces what the cache stores, as the daemon's cache does.
type announcing struct {
	*blockstore.Store
	n *Node
}

func (a announcing) Put(ctx context.Context, id flat.BlockID, data []byte) error {
	if err := a.Store.Put(ctx, id, data); err != nil {
		return err
	}
	a.n.Announce(id)
	return nil
}

func ids(nodes []*swarmNode) []peer.ID {
	out := make([]peer.ID, len(nodes))
	for i, sn := range nodes {
		out[i] = sn.n.ID()
	}
	return out
}

// checkMovedOnce checks that each block designated to nodes[gone] (which
// did not fetch it: gone, left, lying) came from the registry once, at the
// member of live next in the block's rendezvous order, and returns how
// many blocks that was.
func checkMovedOnce(t *testing.T, im *testImage, nodes []*swarmNode, gone int, live []int, what string) int {
	t.Helper()
	all := ids(nodes)
	var rest []peer.ID
	for _, i := range live {
		rest = append(rest, all[i])
	}
	moved := 0
	for _, b := range im.index.Blocks {
		if Designated(b.ID, all, all[0]) != all[gone] {
			continue
		}
		moved++
		next := slices.Index(all, Designated(b.ID, rest, rest[0]))
		for _, i := range live {
			want := 0
			if i == next {
				want = 1
			}
			if c := nodes[i].reg.count(b.ID); c != want {
				t.Errorf("node %d fetched block %s of %s from the registry %d times, want %d (next: node %d)", i, b.ID, what, c, want, next)
			}
		}
	}
	return moved
}

// fetchAll has every node in which read all of im's blocks at once and
// returns how long each took.
func fetchAll(t *testing.T, im *testImage, nodes []*swarmNode, which []int) []time.Duration {
	t.Helper()
	took := make([]time.Duration, len(nodes))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, i := range which {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			got, err := nodes[i].chain.FetchMany(t.Context(), im.index.Blocks)
			took[i] = time.Since(t0)
			if err != nil || len(got) != len(im.index.Blocks) {
				t.Errorf("node %d: %d of %d blocks, %v", i, len(got), len(im.index.Blocks), err)
			}
			checkBlocks(t, im, got)
		})
	}
	close(start)
	wg.Wait()
	return took
}

// Four nodes, none holding any block, read the whole image at once: every
// block is fetched from the registry exactly once, by its designated node,
// and the others get it from that node — with no wait on the origin
// budget. OriginWait is 10 s here: the reads take 0.3–1 s, and up
// to 3.2 s were seen with the machine's load at 10; a node that waited it
// out would take longer, and would then read the block from the registry
// itself (the counts below).
func TestOriginCoalescing(t *testing.T) {
	t.Parallel()
	const k, delay = 4, 200 * time.Millisecond
	im := newTestImage("origin-coalescing", 24, 64<<10)
	nodes := startSwarm(t, im, k, delay, func(_ int, c *Config) { c.OriginWait = 10 * time.Second })
	all := ids(nodes)

	took := fetchAll(t, im, nodes, []int{0, 1, 2, 3})
	t.Logf("read times: %v", took)

	var ownBytes [k]int64
	for _, b := range im.index.Blocks {
		d := Designated(b.ID, all, all[0])
		di := slices.Index(all, d)
		ownBytes[di] += int64(b.ULen)
		for i, sn := range nodes {
			want := 0
			if i == di {
				want = 1
			}
			if got := sn.reg.count(b.ID); got != want {
				t.Errorf("block %s: node %d fetched it from the registry %d times, want %d (designated: node %d)", b.ID, i, got, want, di)
			}
		}
	}
	var served, originCalls int64
	for i, sn := range nodes {
		st := sn.chain.Stats()
		if st.BytesFromRegistry != ownBytes[i] || st.BytesFromRegistry+st.BytesFromPeers != int64(len(im.index.Blocks))*64<<10 {
			t.Errorf("node %d: %d bytes from the registry (designated for %d), %d from peers", i, st.BytesFromRegistry, ownBytes[i], st.BytesFromPeers)
		}
		ns := sn.n.Stats()
		served += ns.OriginServed
		originCalls += sn.origin.calls.Load()
		if c := sn.origin.calls.Load(); ownBytes[i] == 0 && c != 0 {
			t.Errorf("node %d, designated for nothing, ran %d origin fetches", i, c)
		}
		t.Logf("node %d: designated for %d KiB, %d origin fetches, %d blocks served from them, %d ORIGIN requests sent", i, ownBytes[i]>>10, sn.origin.calls.Load(), ns.OriginServed, ns.OriginRequests)
		// The origin budget is a bound, not a cost: nobody waited it out.
		if wait := sn.n.cfg.OriginWait; took[i] >= wait {
			t.Errorf("node %d took %v: OriginWait (%v) or more", i, took[i], wait)
		}
	}
	if served == 0 || originCalls == 0 {
		t.Errorf("no block was served through origin coalescing (served %d, origin fetches %d)", served, originCalls)
	}
}

// A designated node that is gone (no connection to it can be made) is
// left out of the designation at once: its blocks go to the next member
// of the group, which fetches each from the registry once for everybody,
// and nobody waits. So is one whose address is silent (a dial hangs): each
// node waits DesignatedHedge for it, not its whole dial (DesignatedDial,
// which is the wait here). So is one that is up but left the image (its
// record still names it): it answers NOT_MEMBER. One that hangs makes the
// others wait no longer than OriginWait, then read its blocks from the
// registry themselves.
func TestOriginDesignatedDead(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"gone", "silent", "left", "hung"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			const k, delay = 4, 100 * time.Millisecond
			// Gone, left or silent, nobody waits out OriginWait: 3 s
			// sets it well apart from a loaded machine's read (150 ms
			// here, 560 ms seen). A hung node is waited for exactly
			// OriginWait: 1 s keeps that case short.
			wait := 3 * time.Second
			if mode == "hung" {
				wait = time.Second
			}
			im := newTestImage("origin-dead-"+mode, 16, 32<<10)
			hung := 0 // the node that hangs, in mode "hung"
			nodes := startSwarm(t, im, k, delay, func(i int, c *Config) { c.OriginWait = wait })
			nodes[hung].origin.hang = mode == "hung"
			all := ids(nodes)
			// The node designated for the first block is the one that dies.
			dead := slices.Index(all, Designated(im.index.Blocks[0].ID, all, all[0]))
			switch mode {
			case "hung":
				dead = hung
			case "left":
				nodes[dead].n.LeaveImage(im.digest)
			case "silent":
				// The others' origin groups name it from their lookups,
				// not only from their sessions with it, which close.
				key, err := ImageKey(im.digest)
				if err != nil {
					t.Fatal(err)
				}
				var others []*Node
				for i, sn := range nodes {
					if i == dead {
						continue
					}
					eventually(t, 10*time.Second, fmt.Sprintf("node %d to find every provider", i), func() bool {
						provs, err := sn.n.providers(t.Context(), key, k-1)
						return err == nil && len(provs) == k-1
					})
					others = append(others, sn.n)
				}
				silence(t, nodes[dead].n, others)
			default:
				if err := nodes[dead].n.Close(); err != nil {
					t.Logf("close: %v", err)
				}
			}
			var live []int
			for i := range nodes {
				if i != dead {
					live = append(live, i)
				}
			}
			if mode == "gone" {
				// Gone, not going: the others have seen its connections
				// close. (One that dies in the middle of a request is
				// found gone by request's lost, when it can.)
				eventually(t, 10*time.Second, "the others to see the dead node's connections close", func() bool {
					for _, i := range live {
						if nodes[i].n.host.Network().Connectedness(all[dead]) == network.Connected {
							return false
						}
					}
					return true
				})
			}
			took := fetchAll(t, im, nodes, live)
			t.Logf("node %d %s; read times %v", dead, mode, took)
			for _, i := range live {
				// Gone or left: no waiting, where a node that waited out
				// OriginWait would take more than wait. Silent:
				// DesignatedHedge more, where one that waited out its
				// dial would take DesignatedDial, and then the registry
				// read of the next member (delay), more. Hung: one
				// OriginWait and the registry read, not two.
				limit := wait / 2
				switch mode {
				case "silent":
					limit = DesignatedDial + delay
				case "hung":
					limit = 2 * wait
				}
				if took[i] > limit {
					t.Errorf("node %d took %v with the designated node %s (limit %v)", i, took[i], mode, limit)
				}
			}
			if mode != "hung" {
				moved := checkMovedOnce(t, im, nodes, dead, live, "the "+mode+" node")
				var unreachable, replanned int64
				for _, i := range live {
					st := nodes[i].n.Stats()
					unreachable += st.Unreachable
					replanned += st.OriginReplanned
				}
				var slow int64
				for _, i := range live {
					slow += nodes[i].n.Stats().DesignatedSlow
				}
				t.Logf("%d blocks of the %s node; %d unreachable requests, %d blocks planned again, %d slow dials", moved, mode, unreachable, replanned, slow)
				// A dial to the silent node is taken for slow at
				// DesignatedHedge, or fails: one another component (the
				// DHT) started to it, and that a read's dial joined, can
				// time out at any moment.
				if mode == "silent" && slow+unreachable == 0 {
					t.Error("no dial to the silent node was taken for slow, and none failed")
				}
				// A node whose view of the group lost the gone node
				// (its session closed, and its lookup missed it) never
				// asks it; the counts are not asserted.
				if moved == 0 {
					t.Errorf("the %s node was designated for no block: the fixture tests nothing", mode)
				}
			}
			if mode == "left" {
				left := nodes[dead].n.Stats()
				t.Logf("the left node answered NOT_MEMBER %d times, ran %d origin fetches", left.NotMemberSent, nodes[dead].origin.calls.Load())
				if c := nodes[dead].origin.calls.Load(); c != 0 {
					t.Errorf("the node that left the image ran %d origin fetches for it", c)
				}
			}
			if mode == "hung" {
				// Its blocks came from the registry, after the wait.
				for _, b := range im.index.Blocks {
					if Designated(b.ID, all, all[0]) != all[dead] {
						continue
					}
					for _, i := range live {
						if c := nodes[i].reg.count(b.ID); c != 1 {
							t.Errorf("node %d fetched block %s of the hung node from the registry %d times, want once", i, b.ID, c)
						}
					}
				}
				if c := nodes[dead].origin.calls.Load(); c == 0 {
					t.Error("the hung node was never asked")
				}
			}
		})
	}
}

// delayedGetter answers every Get after delay.
type delayedGetter struct {
	*blockstore.Store
	delay time.Duration
}

func (g delayedGetter) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	select {
	case <-time.After(g.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.Store.Get(ctx, id)
}

// The preferred holder is slow to answer: after the hedge delay the next
// holder is asked too, and the read finishes long before the slow one
// would have answered.
func TestHedging(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// Without hedging the read takes slowBy at least; with it, a hedge
	// delay (2× the holder's latency) and a fast read: 4 s sets the two
	// well apart on a loaded machine.
	const slowBy = 4 * time.Second
	im := newTestImage("hedging", 8, 64<<10)
	slow := startNode(t, Config{Blocks: delayedGetter{openStore(t, im, nil), slowBy}, Zone: "near"})
	fast := startNode(t, Config{Blocks: openStore(t, im, nil), Zone: "far", BootstrapPeers: slow.Addrs()})
	for _, n := range []*Node{slow, fast} {
		if err := n.JoinImage(ctx, im.digest, im.index); err != nil {
			t.Fatal(err)
		}
	}
	// The asker shares the slow node's zone, so it asks it first; its
	// dead-peer budget is longer than the delay, so only hedging helps.
	b := startNode(t, Config{Zone: "near", FirstByteTimeout: 2 * slowBy, BootstrapPeers: slow.Addrs()})
	if err := b.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "B to see both holders", func() bool {
		return allHeld(b, im, slow.ID()) && allHeld(b, im, fast.ID())
	})
	reg := newSlowRegistry(im, 0)
	chain, err := fetch.NewChain(nil, []fetch.Source{b.Source(im.digest), reg})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := chain.FetchMany(ctx, im.index.Blocks)
	took := time.Since(start)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("FetchMany: %d blocks, %v", len(got), err)
	}
	checkBlocks(t, im, got)
	st := b.Stats()
	t.Logf("read in %v (the slow holder answers after %v); hedged requests %d, won %d", took, slowBy, st.HedgedRequests, st.HedgeWins)
	if took > slowBy/2 {
		t.Errorf("read took %v: hedging did not help", took)
	}
	if cs := chain.Stats(); cs.BytesFromRegistry != 0 {
		t.Errorf("%d bytes from the registry, want all from peers", cs.BytesFromRegistry)
	}
	if st.HedgedRequests == 0 || st.HedgeWins == 0 {
		t.Errorf("stats %+v: want a hedged request that won", st)
	}
	if fast.Stats().BlocksServed != int64(len(im.index.Blocks)) {
		t.Errorf("the fast holder served %d blocks", fast.Stats().BlocksServed)
	}
	pi, _ := b.PeerInfo(slow.ID())
	if pi.Latency < 200*time.Millisecond || pi.Failures != 0 {
		t.Errorf("slow holder's record %+v: want a latency raised by the lost race, and no failure", pi)
	}
	if pi.InFlight != 0 {
		t.Errorf("slow holder still has %d requests in flight", pi.InFlight)
	}
}

// gatedOrigin serves im's blocks once open is closed, counting calls.
type gatedOrigin struct {
	im    *testImage
	open  chan struct{}
	calls atomic.Int64
}

func (g *gatedOrigin) FetchOrigin(ctx context.Context, _ string, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	g.calls.Add(1)
	select {
	case <-g.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	out := map[flat.BlockID][]byte{}
	for _, b := range blocks {
		out[b.ID] = slices.Clone(g.im.data[b.ID])
	}
	return out, nil
}

// The serving side of ORIGIN: one fetch per block however many ask, a cap
// on fetches started for peers (BUSY beyond it, unless the request can
// join a running fetch), and blocks outside the image NOT_FOUND.
func TestOriginServer(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("origin-server", 3, 16<<10)
	other := newTestImage("origin-server-other", 1, 16<<10)
	g := &gatedOrigin{im: im, open: make(chan struct{})}
	var once sync.Once
	openGate := func() { once.Do(func() { close(g.open) }) }
	t.Cleanup(openGate)
	p := startNode(t, Config{Blocks: openStore(t, nil, nil), Origin: g, MaxOriginFetches: 1})
	if err := p.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	q := startNode(t, Config{BootstrapPeers: p.Addrs()})
	eventually(t, 10*time.Second, "Q to connect to P", func() bool { return p.Stats().Peers > 0 && q.Stats().Peers > 0 })
	b0, b1, b2 := im.index.Blocks[0], im.index.Blocks[1], im.index.Blocks[2]
	const firstByte = 10 * time.Second
	ask := func(blocks ...flat.Block) outcome {
		return q.request(ctx, p.ID(), im.digest, blocks, reqOpts{flags: flagOrigin, firstByte: firstByte})
	}

	var wg sync.WaitGroup
	var first, joined outcome
	wg.Go(func() { first = ask(b0) })
	eventually(t, 10*time.Second, "P to start fetching b0", func() bool { return g.calls.Load() == 1 })
	// b1 needs a new fetch and the only slot is taken: BUSY, at once.
	// The gate stays closed, so a request that queued for the slot
	// would get no answer before its first-byte deadline; BUSY well
	// inside it is an answer that did not queue.
	start := time.Now()
	if o := ask(b1); !o.busy {
		t.Errorf("second fetch beyond the cap: %+v, want BUSY", o)
	}
	if d := time.Since(start); d > firstByte/2 {
		t.Errorf("BUSY took %v", d)
	}
	if st := p.Stats(); st.OriginFetches > 1 || g.calls.Load() != 1 {
		t.Errorf("P started a fetch beyond the cap: %+v, %d origin calls", st, g.calls.Load())
	}
	// b0 and b2: b0 joins the running fetch, b2 is left out.
	wg.Go(func() { joined = ask(b0, b2) })
	eventually(t, 10*time.Second, "the third request to join the fetch", func() bool { return p.Stats().OriginWaiting == 2 })
	openGate()
	wg.Wait()
	if first.err != nil || len(first.got) != 1 {
		t.Errorf("first: %d blocks, %v", len(first.got), first.err)
	}
	if joined.err != nil || len(joined.got) != 1 || len(joined.notFound) != 1 || joined.notFound[0].ID != b2.ID {
		t.Errorf("joined: %d blocks, not found %v, %v", len(joined.got), joined.notFound, joined.err)
	}
	checkBlocks(t, im, first.got)
	checkBlocks(t, im, joined.got)
	if c := g.calls.Load(); c != 1 {
		t.Errorf("%d origin fetches, want 1", c)
	}
	if st := p.Stats(); st.OriginBusy != 1 || st.OriginServed != 2 || st.OriginFetches != 1 {
		t.Errorf("P stats %+v", st)
	}
	// A block of an image P has not joined: NOT_FOUND, no fetch.
	o := q.request(ctx, p.ID(), other.digest, other.index.Blocks, reqOpts{flags: flagOrigin})
	if o.err != nil || len(o.notFound) != 1 || g.calls.Load() != 1 {
		t.Errorf("image not joined: %+v, %d origin fetches", o, g.calls.Load())
	}
}
