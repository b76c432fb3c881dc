package p2p

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// startMesh starts one node per config, each after the first bootstrapped
// from the first, joins im on each in that order, and waits until every
// node has a have session with every other.
func startMesh(t *testing.T, im *testImage, cfgs ...Config) []*Node {
	t.Helper()
	nodes := make([]*Node, len(cfgs))
	for i, cfg := range cfgs {
		if i > 0 {
			cfg.BootstrapPeers = nodes[0].Addrs()
		}
		nodes[i] = startNode(t, cfg)
	}
	for i, n := range nodes {
		if err := n.JoinImage(t.Context(), im.digest, im.index); err != nil {
			t.Fatalf("node %d join: %v", i, err)
		}
	}
	for i, n := range nodes {
		eventually(t, 15*time.Second, fmt.Sprintf("node %d to see %d image peers", i, len(nodes)-1), func() bool {
			return len(n.ImagePeers(im.digest)) == len(nodes)-1
		})
	}
	return nodes
}

// newGate returns a channel for gatedGetter or gatedOrigin and a function
// that opens it (once); the gate is opened when the test ends.
func newGate(t *testing.T) (chan struct{}, func()) {
	gate := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	return gate, open
}

// holdSlot has asker send p a plain request for block b, which p must
// serve from a gated store, and waits until p is serving it: p's upload
// slot stays taken until the gate opens (or the test ends).
func holdSlot(t *testing.T, asker, p *Node, im *testImage, b flat.Block) {
	t.Helper()
	if err := asker.Connect(t.Context(), p.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	before := p.Stats().ActiveUploads
	go asker.request(t.Context(), p.ID(), im.digest, []flat.Block{b}, reqOpts{firstByte: 30 * time.Second})
	eventually(t, 10*time.Second, "the slot holder's request to be served", func() bool {
		return p.Stats().ActiveUploads == before+1
	})
}

// designatedTo returns the blocks of im, other than those in except, that
// n designates to p over its current origin view.
func designatedTo(n *Node, im *testImage, p peer.ID, except ...flat.BlockID) []flat.Block {
	view := n.originView(im.digest)
	var out []flat.Block
	for _, b := range im.index.Blocks {
		if !slices.Contains(except, b.ID) && Designate(b.ID, view, n.ID()) == p {
			out = append(out, b)
		}
	}
	return out
}

// A designated fetcher whose only upload slot is taken keeps an ORIGIN
// request for a block it holds ("held") or has just fetched through its
// origin ("fetched") in its queue for a slot: it is one of the block's
// first copies. The asker does not fall through to the registry: it
// awaits the block meanwhile, takes it from the node that announces it
// next, and drops the ORIGIN request.
func TestComingAwait(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"held", "fetched"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			// 64 blocks: one of them is designated to D for certain
			// (each is with probability 1/3).
			im := newTestImage("coming-await-"+mode, 64, 4<<10)
			const y = 0 // D holds block 0 from the start and serves it to hold its slot
			gate, _ := newGate(t)
			dStore := openStore(t, im, []int{y})
			origin := &gatedOrigin{im: im, open: make(chan struct{})}
			close(origin.open)
			dCfg := Config{Blocks: gatedGetter{dStore, gate}, MaxUploadStreams: 1}
			if mode == "fetched" {
				dCfg.Origin = origin
			}
			hStore := openStore(t, nil, nil)
			aClock := &pollClock{}
			nodes := startMesh(t, im, dCfg, Config{Blocks: hStore}, Config{Blocks: openStore(t, nil, nil), Clock: aClock})
			d, h, a := nodes[0], nodes[1], nodes[2]

			if view := a.originView(im.digest); len(view) != 3 {
				t.Fatalf("A's origin view %v: want all three nodes", view)
			}
			cands := designatedTo(a, im, d.ID(), im.index.Blocks[y].ID)
			if len(cands) == 0 {
				t.Fatal("no block designated to D")
			}
			x := cands[0]
			if mode == "held" {
				// D holds x, and has not announced it yet.
				if err := dStore.Put(ctx, x.ID, im.data[x.ID]); err != nil {
					t.Fatal(err)
				}
			}
			holdSlot(t, h, d, im, im.index.Blocks[y])

			reg := newSlowRegistry(im, 0)
			chain, err := fetch.NewChain(nil, []fetch.Source{a.Source(im.digest), reg})
			if err != nil {
				t.Fatal(err)
			}
			type result struct {
				got  map[flat.BlockID][]byte
				err  error
				took time.Duration
			}
			done := make(chan result, 1)
			start := time.Now()
			go func() {
				got, err := chain.FetchMany(ctx, []flat.Block{x})
				done <- result{got, err, time.Since(start)}
			}()
			eventually(t, 5*time.Second, "A to ask D with the ORIGIN flag", func() bool { return a.Stats().OriginRequests >= 1 })
			comingAfter := time.Since(start)
			// Still waiting, and not at the registry: A has gone to sleep
			// in await twice since, with x still wanted.
			awaitPolls(t, aClock, 2)
			select {
			case r := <-done:
				t.Fatalf("FetchMany returned before anybody announced the block: %d blocks, %v", len(r.got), r.err)
			default:
			}
			if c := reg.count(x.ID); c != 0 {
				t.Fatalf("the block was read from the registry %d times while awaited", c)
			}
			// H gets the block (from elsewhere) and announces it.
			if err := hStore.Put(ctx, x.ID, im.data[x.ID]); err != nil {
				t.Fatal(err)
			}
			h.Announce(x.ID)
			var r result
			select {
			case r = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("FetchMany did not return after H announced the block")
			}
			if r.err != nil || len(r.got) != 1 {
				t.Fatalf("FetchMany: %d blocks, %v", len(r.got), r.err)
			}
			checkBlocks(t, im, r.got)
			ast, dst, hst := a.Stats(), d.Stats(), h.Stats()
			t.Logf("ORIGIN request after %v, block from H after %v; A: coming %d, await rounds %d, busy received %d; D: origin fetches %d",
				comingAfter, r.took, ast.ComingReceived, ast.AwaitRounds, ast.BusyReceived, dst.OriginFetches)
			if r.took >= 3*time.Second {
				t.Errorf("the read took %v: it waited out OriginWait instead of taking the announced block", r.took)
			}
			if c := reg.count(x.ID); c != 0 {
				t.Errorf("the block was read from the registry %d times", c)
			}
			if cs := chain.Stats(); cs.BytesFromRegistry != 0 || cs.BytesFromPeers != int64(x.ULen) {
				t.Errorf("chain stats %+v: want the block from peers only", cs)
			}
			if ast.AwaitRounds < 1 || ast.OriginRequests < 1 || ast.OriginBlocks != 0 {
				t.Errorf("A stats %+v: want an ORIGIN request to D, an await round, nothing delivered by the ORIGIN request", ast)
			}
			if hst.BlocksServed != 1 {
				t.Errorf("H served %d blocks, want the awaited one", hst.BlocksServed)
			}
			wantFetches := int64(0)
			if mode == "fetched" {
				wantFetches = 1
			}
			if dst.OriginFetches != wantFetches || origin.calls.Load() != wantFetches {
				t.Errorf("D ran %d origin fetches (origin called %d times), want %d", dst.OriginFetches, origin.calls.Load(), wantFetches)
			}
		})
	}
}

// A designated fetcher sends a block in ORIGIN answers at most
// MaxUploadStreams times; the next ORIGIN request for it gets COMING even
// with every slot free. Plain requests, and ORIGIN requests for another
// block, are still served.
func TestOriginCopies(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const slots = 2
	im := newTestImage("origin-copies", 2, 8<<10)
	x, z := im.index.Blocks[0], im.index.Blocks[1]
	d := startNode(t, Config{Blocks: openStore(t, im, nil), MaxUploadStreams: slots})
	if err := d.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	askers := make([]*Node, slots+2)
	for i := range askers {
		askers[i] = startNode(t, Config{})
		if err := askers[i].Connect(ctx, d.Addrs()[0]); err != nil {
			t.Fatal(err)
		}
	}
	ask := func(n *Node, flags uint64, b flat.Block) outcome {
		return n.request(ctx, d.ID(), im.digest, []flat.Block{b}, reqOpts{flags: flags, firstByte: 5 * time.Second})
	}
	for i, n := range askers {
		if active := d.Stats().ActiveUploads; active != 0 {
			t.Fatalf("D has %d uploads running; want every slot free", active)
		}
		o := ask(n, flagOrigin, x)
		if i < slots {
			if o.err != nil || o.coming || o.busy || len(o.got) != 1 {
				t.Errorf("ORIGIN request %d: %d blocks, coming %v, %v; want the block", i+1, len(o.got), o.coming, o.err)
			}
			checkBlocks(t, im, o.got)
			continue
		}
		if !o.coming || !errors.Is(o.err, ErrComing) || len(o.got) != 0 {
			t.Errorf("ORIGIN request %d, after %d copies sent: %d blocks, coming %v, %v; want COMING", i+1, slots, len(o.got), o.coming, o.err)
		}
	}
	// A plain request for the same block is answered COMING for it: the
	// ORIGIN copies count towards SpreadCopies (2 by default). With FORCE
	// it is served.
	if o := ask(askers[0], 0, x); o.err != nil || len(o.got) != 0 || len(o.spread) != 1 {
		t.Errorf("plain request after the ORIGIN copies: %d blocks, %d COMING, %v; want COMING for the block", len(o.got), len(o.spread), o.err)
	}
	if o := ask(askers[0], flagForce, x); o.err != nil || len(o.got) != 1 {
		t.Errorf("FORCE request after the ORIGIN copies: %d blocks, %v", len(o.got), o.err)
	}
	// Another block has its own count.
	if o := ask(askers[slots], flagOrigin, z); o.err != nil || o.coming || len(o.got) != 1 {
		t.Errorf("ORIGIN request for another block: %d blocks, coming %v, %v", len(o.got), o.coming, o.err)
	}
	st := d.Stats()
	t.Logf("D stats: served %d, busy/coming answers %d", st.BlocksServed, st.BusyAnswers)
	if st.BlocksServed != slots+2 || st.BusyAnswers != 2 || st.SpreadSent != 1 {
		t.Errorf("D stats %+v: want %d blocks served, 2 COMING answers and 1 block answered COMING", st, slots+2)
	}
}

// putBlocks stores every block of im in s.
func putBlocks(t *testing.T, s *blockstore.Store, im *testImage) {
	t.Helper()
	var bs []blockstore.Block
	for _, b := range im.index.Blocks {
		bs = append(bs, blockstore.Block{ID: b.ID, Data: im.data[b.ID]})
	}
	if err := s.PutMany(t.Context(), bs); err != nil {
		t.Fatal(err)
	}
}

// A node that has uploaded more than UploadShare × max(held, ShareFloor)
// bytes of an image answers further plain requests for it BUSY, and still
// serves requests for another image and ORIGIN requests.
func TestUploadShare(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const size = 16 << 10
	im := newTestImage("upload-share", 4, size)
	other := newTestImage("upload-share-other", 2, size)
	store := openStore(t, im, nil)
	putBlocks(t, store, other)
	// The node holds 64 KiB, under ShareFloor: its allowance is
	// share × ShareFloor = 24 KiB, one and a half blocks.
	share := float64(24<<10) / ShareFloor
	u := startNode(t, Config{Blocks: store, UploadShare: share})
	for _, x := range []*testImage{im, other} {
		if err := u.JoinImage(ctx, x.digest, x.index); err != nil {
			t.Fatal(err)
		}
	}
	b := startNode(t, Config{})
	if err := b.Connect(ctx, u.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	ask := func(x *testImage, i int, flags uint64) outcome {
		o := b.request(ctx, u.ID(), x.digest, x.index.Blocks[i:i+1], reqOpts{flags: flags})
		checkBlocks(t, x, o.got)
		return o
	}
	served := func(o outcome) bool { return o.err == nil && !o.busy && len(o.got) == 1 }

	// 0 then 16 KiB uploaded, both within 24 KiB: served.
	for i := range 2 {
		if o := ask(im, i, 0); !served(o) {
			t.Fatalf("request %d, within the share: %d blocks, busy %v, %v", i+1, len(o.got), o.busy, o.err)
		}
	}
	// 32 KiB uploaded: over the share.
	if o := ask(im, 2, 0); !o.busy || len(o.got) != 0 {
		t.Errorf("request over the share: %d blocks, busy %v, %v; want BUSY", len(o.got), o.busy, o.err)
	}
	if st := u.Stats(); st.ShareBusy != 1 {
		t.Errorf("ShareBusy %d, want 1", st.ShareBusy)
	}
	// Another image has its own share.
	if o := ask(other, 0, 0); !served(o) {
		t.Errorf("request for another image: %d blocks, busy %v, %v", len(o.got), o.busy, o.err)
	}
	// An ORIGIN request is not capped.
	if o := ask(im, 2, flagOrigin); !served(o) {
		t.Errorf("ORIGIN request over the share: %d blocks, busy %v, coming %v, %v", len(o.got), o.busy, o.coming, o.err)
	}
	// Still over the share for plain requests.
	if o := ask(im, 3, 0); !o.busy {
		t.Errorf("second request over the share: %d blocks, busy %v, %v; want BUSY", len(o.got), o.busy, o.err)
	}
	st := u.Stats()
	t.Logf("U stats: served %d blocks, %d bytes; share busy %d", st.BlocksServed, st.BytesUploaded, st.ShareBusy)
	if st.ShareBusy != 2 || st.BlocksServed != 4 || st.BytesUploaded != 4*size {
		t.Errorf("U stats %+v: want 2 share BUSY answers and 4 blocks served", st)
	}
}

// With the only holder BUSY all along (its one slot taken), a read asks it
// again after each rest (BusyBackoff); after OriginWait/lateOrigin the
// blocks go to their designated fetcher (this node: then they are left to
// the registry at once; the holder: it queues the ORIGIN request for its
// slot), and the read gives up by OriginWait, with an error wrapping
// ErrBusy.
func TestAwaitEndsAtOriginWait(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const wait, backoff = 400 * time.Millisecond, 30 * time.Millisecond
	im := newTestImage("await-ends", 3, 16<<10)
	gate, _ := newGate(t)
	g := startNode(t, Config{Blocks: gatedGetter{openStore(t, im, nil), gate}, MaxUploadStreams: 1})
	if err := g.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	a := startNode(t, Config{BootstrapPeers: g.Addrs(), OriginWait: wait, BusyBackoff: backoff})
	if err := a.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "A to learn G's blocks", func() bool { return allHeld(a, im, g.ID()) })
	holdSlot(t, startNode(t, Config{}), g, im, im.index.Blocks[0])

	start := time.Now()
	got, err := a.Source(im.digest).FetchMany(ctx, im.index.Blocks)
	took := time.Since(start)
	st := a.Stats()
	t.Logf("gave up after %v with %d blocks: %v; busy received %d, await rounds %d", took, len(got), err, st.BusyReceived, st.AwaitRounds)
	if len(got) != 0 || !errors.Is(err, ErrBusy) {
		t.Errorf("FetchMany: %d blocks, %v; want none, and an error wrapping ErrBusy", len(got), err)
	}
	if took < wait/lateOrigin-20*time.Millisecond || took > wait+time.Second {
		t.Errorf("FetchMany returned after %v, want between OriginWait/%d and about OriginWait (%v)", took, lateOrigin, wait)
	}
	// Asked again after each rest, and no more often than that.
	if most := int64(took/backoff) + 1; st.BusyReceived < 2 || st.BusyReceived > most {
		t.Errorf("A received %d BUSY answers in %v; want at least 2 and at most %d (one per %v rest)", st.BusyReceived, took, most, backoff)
	}
	if st.AwaitRounds < 1 {
		t.Errorf("A stats %+v: want an await round", st)
	}
	if gs := g.Stats(); gs.BusyAnswers < st.BusyReceived {
		t.Errorf("G sent %d BUSY answers, A received %d", gs.BusyAnswers, st.BusyReceived)
	}
}

// A node whose lookup ran while it was alone (its origin group is itself)
// but that has have sessions with the others since designates the same
// fetchers as they do: its origin view adds the peers it met.
func TestOriginViewConverges(t *testing.T) {
	t.Parallel()
	const k = 4
	im := newTestImage("origin-view", 64, 1<<10)
	id, err := imageID(im.digest)
	if err != nil {
		t.Fatal(err)
	}
	// The first node joins alone and never looks the image up again.
	cfgs := make([]Config, k)
	cfgs[0].RefreshInterval = time.Hour
	nodes := startMesh(t, im, cfgs...)
	first := nodes[0]
	if g := first.imageGroup(im.digest); len(g) != 1 || g[0] != first.ID() {
		t.Fatalf("the first node's lookup group %v: want itself alone (the test relies on it)", g)
	}
	all := make([]peer.ID, k)
	for i, n := range nodes {
		all[i] = n.ID()
	}
	want := OriginGroup(id, all, "", OriginGroupSize)
	for i, n := range nodes {
		if v := n.originView(im.digest); !slices.Equal(v, want) {
			t.Errorf("node %d: origin view %v, want %v", i, v, want)
		}
	}
	stale := 0
	for _, b := range im.index.Blocks {
		d := Designate(b.ID, want, "")
		if Designate(b.ID, first.imageGroup(im.digest), first.ID()) != d {
			stale++
		}
		for i, n := range nodes {
			if got := Designate(b.ID, n.originView(im.digest), n.ID()); got != d {
				t.Errorf("block %s: node %d designates %s, want %s", b.ID, i, got, d)
			}
		}
	}
	t.Logf("%d of %d blocks would have been designated differently over the first node's lookup group alone", stale, len(im.index.Blocks))
	if stale == 0 {
		t.Error("the lookup group alone designates like the others: the test shows nothing")
	}
}

// After ImageBlob (which provides the image's record early), JoinImage
// does not provide it again.
func TestJoinAfterEarlyProvide(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("early-provide", 2, 4<<10)
	key, err := ImageKey(im.digest)
	if err != nil {
		t.Fatal(err)
	}
	p := startNode(t, Config{})
	n := startNode(t, Config{BootstrapPeers: p.Addrs()})
	eventually(t, 10*time.Second, "N's routing table", func() bool { return n.dht.RoutingTable().Size() > 0 })
	blob := []byte("an index, as far as this test is concerned")
	// Nobody else provides the image: N is the blob's designated fetcher.
	if _, err := n.ImageIndex(ctx, im.digest, flat.Sum(blob), int64(len(blob))); !errors.Is(err, ErrNoIndex) {
		t.Fatalf("ImageIndex: %v, want ErrNoIndex", err)
	}
	eventually(t, 10*time.Second, "the early provide to succeed", func() bool { return n.recentlyProvided(ctx, key) })
	if st := n.Stats(); st.DHTProvides != 1 {
		t.Fatalf("%d provides after ImageIndex, want 1", st.DHTProvides)
	}
	if err := n.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	s := n.swarm(im.digest)
	eventually(t, 10*time.Second, "JoinImage's provide step to end", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return !s.lastProvide.IsZero()
	})
	s.mu.Lock()
	ok := s.provideOK
	s.mu.Unlock()
	if st := n.Stats(); st.DHTProvides != 1 || !ok {
		t.Errorf("after JoinImage: %d provides (want 1), record provided %v (want true)", st.DHTProvides, ok)
	}
	// P found N through the early record.
	provs, err := p.FindProviders(ctx, key, 4)
	if err != nil || !slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == n.ID() }) {
		t.Errorf("P's lookup: %v, %v; want N", provs, err)
	}
}

// failingOrigin is an origin whose every fetch fails, as a registry that
// is down.
type failingOrigin struct{}

func (failingOrigin) FetchOrigin(context.Context, string, []flat.Block) (map[flat.BlockID][]byte, error) {
	return nil, errors.New("registry down")
}

// An ORIGIN request for a block the designated fetcher could not deliver
// (it has no origin for the image, or its origin failed) is answered
// NOT_FOUND, and the asker goes to the registry at once — every time: a
// NOT_FOUND is not a copy sent, and COMING ("I hold it") would be a lie
// that holds the asker for OriginWait.
func TestOriginCopiesNotFound(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"no origin", "origin fails"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			const slots = 2
			im := newTestImage("origin-copies-not-found-"+mode, 1, 8<<10)
			cfg := Config{Blocks: openStore(t, nil, nil), MaxUploadStreams: slots}
			if mode == "origin fails" {
				cfg.Origin = failingOrigin{}
			}
			d := startNode(t, cfg)
			if err := d.JoinImage(ctx, im.digest, im.index); err != nil {
				t.Fatal(err)
			}
			a := startNode(t, Config{})
			if err := a.Connect(ctx, d.Addrs()[0]); err != nil {
				t.Fatal(err)
			}
			for i := range slots + 2 {
				o := a.request(ctx, d.ID(), im.digest, im.index.Blocks, reqOpts{flags: flagOrigin, firstByte: 5 * time.Second})
				if o.err != nil || o.coming || len(o.notFound) != 1 {
					t.Errorf("ORIGIN request %d for a block D does not have: not found %d, coming %v, %v; want NOT_FOUND", i+1, len(o.notFound), o.coming, o.err)
				}
			}
		})
	}
}

// Image blobs (the manifest and the index, asked for under the image's
// digest by ImageBlob) are not limited by UploadShare (Config.UploadShare).
func TestUploadShareImageBlob(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("upload-share-blob", 4, 16<<10)
	store := openStore(t, im, nil)
	index := testData(7, 8<<10) // the image's index blob, kept as a block
	if err := store.Put(ctx, flat.Sum(index), index); err != nil {
		t.Fatal(err)
	}
	u := startNode(t, Config{Blocks: store, UploadShare: float64(24<<10) / ShareFloor})
	u.addImageBlob(im.digest, flat.Sum(index)) // as ImageIndex records it
	if err := u.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	b := startNode(t, Config{})
	if err := b.Connect(ctx, u.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	for i := range 3 { // the third is over the share
		b.request(ctx, u.ID(), im.digest, im.index.Blocks[i:i+1], reqOpts{})
	}
	if st := u.Stats(); st.ShareBusy != 1 {
		t.Fatalf("ShareBusy %d, want 1: the node should be over its share", st.ShareBusy)
	}
	// As ImageBlob asks for it.
	got, err := b.FetchBlobBlocks(ctx, u.ID(), im.digest, []flat.Block{{ID: flat.Sum(index), ULen: uint32(len(index))}})
	if err != nil || len(got) != 1 {
		t.Errorf("index blob from a node over its share of the image: %d blocks, %v; want it served", len(got), err)
	}
}

// JoinImage right after ImageBlob, while the early provide is still
// running, does not provide the record a second time ("one provide per
// start").
func TestJoinDuringEarlyProvide(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	p := startNode(t, Config{})
	n := startNode(t, Config{BootstrapPeers: p.Addrs()})
	eventually(t, 10*time.Second, "N's routing table", func() bool { return n.dht.RoutingTable().Size() > 0 })
	blob := []byte("an index, as far as this test is concerned")
	var provides []int64
	for i := range 5 {
		im := newTestImage(fmt.Sprintf("join-during-early-provide-%d", i), 2, 4<<10)
		before := n.Stats().DHTProvides
		if _, err := n.ImageIndex(ctx, im.digest, flat.Sum(blob), int64(len(blob))); !errors.Is(err, ErrNoIndex) {
			t.Fatalf("ImageIndex: %v, want ErrNoIndex", err)
		}
		if err := n.JoinImage(ctx, im.digest, im.index); err != nil {
			t.Fatal(err)
		}
		key, _ := ImageKey(im.digest)
		s := n.swarm(im.digest)
		eventually(t, 10*time.Second, "both provides to end", func() bool {
			n.mu.Lock()
			running := n.early[key.KeyString()].running
			n.mu.Unlock()
			s.mu.Lock()
			defer s.mu.Unlock()
			return !running && !s.lastProvide.IsZero()
		})
		provides = append(provides, n.Stats().DHTProvides-before)
	}
	if slices.ContainsFunc(provides, func(k int64) bool { return k != 1 }) {
		t.Errorf("provides per ImageIndex + JoinImage: %v, want 1 each", provides)
	}
}
