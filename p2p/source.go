package p2p

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"

	"github.com/shoal-project/shoal/flat"
)

// SourceName is the name PeerSource reports to the fetch chain.
const SourceName = "peers"

const (
	// maxRounds bounds how often one FetchMany re-plans the blocks still
	// missing over the peers not yet tried for them.
	maxRounds = 4
	// parallelPeers bounds the peers one FetchMany asks at once.
	parallelPeers = 8
)

// PeerSource fetches an image's blocks from the peers whose have bitmaps
// say they hold them, and the blocks nobody holds from their designated
// fetchers (origin coalescing). It goes in the chain after the cache and
// before the registry source, which should be the image's origin (see
// OriginFetcher): what it cannot get quickly falls through.
// (*PeerSource) satisfies fetch.Source; the tests assert it, so that this
// package does not import the chain.
type PeerSource struct {
	n     *Node
	image string
}

// Source returns the peer source for an image. Blocks are looked up in the
// have bitmaps of every joined image (a block shared between two versions of
// an image can come from peers of either), so the image need not be joined
// first, but without joining it the node knows no holders of its own blocks.
func (n *Node) Source(image string) *PeerSource { return &PeerSource{n: n, image: image} }

// Name implements fetch.Source.
func (ps *PeerSource) Name() string { return SourceName }

// FetchMany implements fetch.Source. Blocks some peer holds are assigned
// to holders by ChoosePeers and Assign (same zone and rack first, then
// lowest latency, then least loaded, at random among equals), asked in
// batched requests, hedged to each block's second-choice holder when the
// first is slow to answer, and verified. A peer that sends a wrong block is
// penalised and not asked again in this call; one that is busy, slow
// (FirstByteTimeout) or gone is skipped the same way, and its blocks are
// asked of the next holder. Blocks nobody holds are asked, at the same
// time, of their designated fetchers (origin coalescing; see origin), for
// at most OriginWait. What is not delivered is left out, with an error
// saying why, for the next source.
func (ps *PeerSource) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	f := &fetchState{
		out:        make(map[flat.BlockID][]byte, len(blocks)),
		tried:      map[flat.BlockID]map[peer.ID]bool{},
		excluded:   map[peer.ID]bool{},
		own:        map[flat.BlockID]bool{},
		coming:     map[flat.BlockID]bool{},
		comingFrom: map[flat.BlockID]peer.ID{},
		comingAt:   map[flat.BlockID]time.Time{},
		asked:      map[flat.BlockID]bool{},
		pending:    map[flat.BlockID]int{},
		spread:     map[flat.BlockID]map[peer.ID]bool{},
		spreadAt:   map[flat.BlockID]time.Time{},
		hints:      map[flat.BlockID][]peer.ID{},
		news:       make(chan struct{}),
	}
	deadline := ps.n.cfg.Clock.Now().Add(ps.n.cfg.OriginWait)
	all := make([]flat.Block, 0, len(blocks))
	seen := make(map[flat.BlockID]bool, len(blocks))
	for _, b := range blocks {
		if !seen[b.ID] {
			seen[b.ID] = true
			all = append(all, b)
		}
	}
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	// ORIGIN requests run beside the rounds and the await; they end with
	// the call (a designated fetcher may hold one in its queue for a slot
	// while the block arrives from a holder).
	octx, cancelOrigin := context.WithCancel(ctx)
	defer cancelOrigin()
	var origin sync.WaitGroup
	want := all
	for round := 0; round < maxRounds && len(want) > 0 && ctx.Err() == nil; round++ {
		a := ps.plan(want, f, rng)
		if round == 0 && len(a.unheld) > 0 {
			ask := ps.planOrigin(a.unheld, f)
			origin.Go(func() { ps.origin(octx, ask, f) })
		}
		if len(a.byPeer) == 0 {
			break
		}
		ps.round(ctx, a, f)
		// Blocks with no usable holder drop out: exclusions only grow, so
		// a later round would find none either.
		var still []flat.Block
		f.mu.Lock()
		for _, b := range want {
			if _, got := f.out[b.ID]; !got && a.planned[b.ID] {
				still = append(still, b)
			}
		}
		f.mu.Unlock()
		want = still
	}
	ps.await(ctx, all, f, rng, deadline, func(late []flat.Block) {
		ask := ps.planOrigin(late, f)
		origin.Go(func() { ps.origin(octx, ask, f) })
	})
	cancelOrigin()
	origin.Wait()

	missing := 0
	for _, b := range all {
		if _, ok := f.out[b.ID]; !ok {
			missing++
		}
	}
	if missing == 0 {
		return f.out, nil
	}
	if err := ctx.Err(); err != nil {
		return f.out, err
	}
	reason := errors.Join(f.errBad, f.errBusy, f.errFail, f.errOrigin)
	if reason == nil {
		reason = ErrNoHolder
	}
	if n := ps.n; n.log.Enabled(ctx, slog.LevelDebug) {
		f.mu.Lock()
		own, coming := 0, 0
		for _, b := range all {
			if _, ok := f.out[b.ID]; !ok {
				own += btoi(f.own[b.ID])
				coming += btoi(f.coming[b.ID])
			}
		}
		f.mu.Unlock()
		n.log.Debug("blocks left to the next source", "image", ps.image, "missing", missing, "of", len(all),
			"designated_here", own, "coming", coming, "reason", reason)
	}
	return f.out, fmt.Errorf("%d of %d blocks not fetched from peers: %w", missing, len(all), reason)
}

// fetchState is one FetchMany call's state, shared by its requests.
type fetchState struct {
	mu                                  sync.Mutex
	out                                 map[flat.BlockID][]byte
	tried                               map[flat.BlockID]map[peer.ID]bool // NOT_FOUND answers
	excluded                            map[peer.ID]bool                  // failed, or lost a hedge race without a byte, in this call
	own                                 map[flat.BlockID]bool             // designated to this node: left to the registry source
	coming                              map[flat.BlockID]bool             // a designated fetcher answered COMING
	comingFrom                          map[flat.BlockID]peer.ID          // which one, for the first COMING of the block
	comingAt                            map[flat.BlockID]time.Time        // and when (ComingGrace)
	asked                               map[flat.BlockID]bool             // planned for origin coalescing in this call
	pending                             map[flat.BlockID]int              // ORIGIN requests for the block not answered yet
	spread                              map[flat.BlockID]map[peer.ID]bool // holders that answered the block COMING (Spread)
	spreadAt                            map[flat.BlockID]time.Time        // when the block's first COMING answer came
	hints                               map[flat.BlockID][]peer.ID        // peers a COMING answer named as the block's recipients
	news                                chan struct{}                     // closed (and replaced) when a block arrives or an ORIGIN request ends
	errBusy, errBad, errFail, errOrigin error
}

// round asks each peer of a round's plan for its blocks, up to
// parallelPeers peers at once, each in batches, hedged.
func (ps *PeerSource) round(ctx context.Context, a assignment, f *fetchState) {
	var wg sync.WaitGroup
	slots := make(chan struct{}, parallelPeers)
	for p, bs := range a.byPeer {
		wg.Go(func() {
			slots <- struct{}{}
			defer func() { <-slots }()
			bs, flags := forceBatches(bs, a.force)
			for i, batch := range bs {
				if flags[i]&flagForce != 0 {
					ps.n.st.forced.Add(1)
				}
				if !ps.runBatch(ctx, p, batch, a.backup, flags[i], f) {
					return
				}
			}
		})
	}
	wg.Wait()
}

// lateOrigin: await puts blocks it cannot ask anybody for to their
// designated fetcher after OriginWait/lateOrigin.
const lateOrigin = 3

// awaitPoll is how often await plans again without news from the image's
// sessions (a holder may show up in another joined image's bitmaps).
const awaitPoll = 50 * time.Millisecond

// await waits, until deadline (OriginWait after the call began), for the
// blocks still missing that the swarm is about to have: those a
// designated fetcher answered COMING for (it holds them and passes them
// on), and those held by a peer not excluded from this call — one that
// answered BUSY (it rests for BusyBackoff, then may be asked again), or
// one that announced the block since. Each time a session's bitmap gains
// a block, or every awaitPoll, it plans again over the holders that may
// be asked, and asks them. A block whose only holders failed or answered
// NOT_FOUND in this call is not waited for. A holder that stays BUSY (its
// slots taken by slow transfers, or over its share of uploads) costs the
// read at most the rest of OriginWait before the registry. The blocks this node is designated for are not waited for: the
// registry source has them. Without it, a swarm of thousands starting at
// once sent to the registry every reader that a block's first holders
// turned away (the simulator measured 59 copies of each block at 1,000
// nodes): holders double every round trip or two, so waiting is short.
func (ps *PeerSource) await(ctx context.Context, all []flat.Block, f *fetchState, rng Rand, deadline time.Time, toOrigin func([]flat.Block)) {
	n := ps.n
	s := n.swarm(ps.image)
	for ctx.Err() == nil {
		var want []flat.Block
		now := n.cfg.Clock.Now()
		f.mu.Lock()
		news := f.news
		for _, b := range all {
			if _, got := f.out[b.ID]; got || f.own[b.ID] {
				continue
			}
			if f.coming[b.ID] || f.pending[b.ID] > 0 || slices.ContainsFunc(f.holdersLocked(n, b.ID), func(p peer.ID) bool { return f.mayDeliverLocked(n, b.ID, p, now) }) {
				want = append(want, b)
			}
		}
		f.mu.Unlock()
		left := deadline.Sub(n.cfg.Clock.Now())
		if len(want) == 0 || left <= 0 {
			return
		}
		var gained <-chan struct{}
		if s != nil {
			s.mu.Lock()
			gained = s.changed
			s.mu.Unlock()
		}
		if a := ps.plan(want, f, rng); len(a.byPeer) > 0 {
			n.st.awaitRounds.Add(1)
			ps.round(ctx, a, f)
			continue
		}
		// Nobody may be asked now. Once a third of OriginWait has passed
		// that way, blocks not yet put to their designated fetcher go to
		// it: their holders may all be over their share of uploads, and
		// the designated fetcher sends its first copies whatever its
		// share. (Sooner, a holder that is merely busy would cost a
		// registry copy: the designated fetcher may not hold the block.)
		// A designated fetcher that answered COMING and whose blocks
		// showed up nowhere within ComingGrace did not deliver: it is
		// taken for unreachable, and its blocks go to the next member.
		f.mu.Lock()
		undelivered, fetchers := f.undeliveredLocked(n, want, n.cfg.Clock.Now())
		f.mu.Unlock()
		for _, p := range fetchers {
			n.st.comingUndelivered.Add(1)
			n.markUnreachable(p)
			n.log.Warn("designated fetcher answered COMING and did not deliver; asking the next member", "peer", p.String(), "image", ps.image)
		}
		if len(undelivered) > 0 {
			n.st.originReplanned.Add(int64(len(undelivered)))
			toOrigin(undelivered)
		}
		var late []flat.Block
		f.mu.Lock()
		if left <= n.cfg.OriginWait-n.cfg.OriginWait/lateOrigin {
			for _, b := range want {
				if !f.coming[b.ID] && !f.asked[b.ID] {
					late = append(late, b)
				}
			}
		}
		f.mu.Unlock()
		if len(late) > 0 {
			toOrigin(late)
		}
		select {
		case <-gained:
		case <-news:
		case <-n.cfg.Clock.After(min(left, awaitPoll)):
		case <-ctx.Done():
		}
	}
}

// deliver keeps the first copy of a block to arrive.
func (f *fetchState) deliver(id flat.BlockID, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.out[id]; !ok {
		f.out[id] = data
		f.notifyLocked()
	}
}

// notifyLocked wakes await; f.mu must be held.
func (f *fetchState) notifyLocked() {
	close(f.news)
	f.news = make(chan struct{})
}

// holdersLocked returns the peers that hold block id: those whose have
// bitmaps show it, and those a COMING answer named as its recipients
// (hints), which need not be among this node's have sessions — without
// them a reader whose sessions hold the block only at holders that have
// sent it often enough forces one of them (ForceSpread), while the peers
// those copies went to pass it on idle. f.mu must be held.
func (f *fetchState) holdersLocked(n *Node, id flat.BlockID) []peer.ID {
	hs := n.holders(id)
	for _, p := range f.hints[id] {
		if !slices.Contains(hs, p) {
			hs = append(hs, p)
		}
	}
	return hs
}

// hintLimit bounds the peers one call keeps as hints for one block.
const hintLimit = 2 * MaxHints

// assignment is one round's plan.
type assignment struct {
	byPeer  map[peer.ID][]flat.Block // by first choice
	backup  map[flat.BlockID]peer.ID // second choice, for hedging
	planned map[flat.BlockID]bool
	force   map[flat.BlockID]bool // asked of holders that answered COMING (ForceSpread)
	none    []flat.Block          // no usable holder
	// unheld are the blocks of none that no peer holds at all (not just
	// none that may be asked now: a holder resting after BUSY will serve
	// them in a moment, and await asks it then). They go to origin
	// coalescing.
	unheld []flat.Block
}

// plan assigns each wanted block to its best holders that may be asked:
// not excluded in this call, not known to lack it, not avoided or resting.
func (ps *PeerSource) plan(want []flat.Block, f *fetchState, rng Rand) assignment {
	n := ps.n
	now := n.cfg.Clock.Now()
	holders := make([][]peer.ID, len(want))
	var views []PeerView
	seen := map[peer.ID]bool{}
	held := make([]bool, len(want))
	force := map[flat.BlockID]bool{}
	f.mu.Lock()
	for i, b := range want {
		hs := f.holdersLocked(n, b.ID)
		// Holders that answered the block COMING are asked again (FORCE)
		// only when no other holder may be asked and SpreadWait has
		// passed; until then await waits for the block to show up at
		// holders that have not sent it yet.
		sp := f.spread[b.ID]
		if len(sp) > 0 {
			others := slices.ContainsFunc(hs, func(p peer.ID) bool {
				return !sp[p] && !f.tried[b.ID][p] && !f.excluded[p] && n.peers.designatable(p, now)
			})
			force[b.ID] = ForceSpread(now.Sub(f.spreadAt[b.ID]), n.cfg.SpreadWait, others)
		}
		for _, p := range hs {
			if f.tried[b.ID][p] || n.peers.isAvoided(p, now) {
				continue
			}
			held[i] = true
			if sp[p] && !force[b.ID] {
				continue
			}
			holders[i] = append(holders[i], p)
			if seen[p] {
				continue
			}
			seen[p] = true
			if f.excluded[p] {
				continue
			}
			if v, ok := n.peers.view(p, now); ok {
				views = append(views, v)
			}
		}
	}
	f.mu.Unlock()
	first, second := Assign(ChoosePeers(views, Labels{Zone: n.cfg.Zone, Rack: n.cfg.Rack}, rng), holders)
	a := assignment{byPeer: map[peer.ID][]flat.Block{}, backup: map[flat.BlockID]peer.ID{}, planned: map[flat.BlockID]bool{}, force: map[flat.BlockID]bool{}}
	for i, b := range want {
		if first[i] == "" {
			a.none = append(a.none, b)
			if !held[i] {
				a.unheld = append(a.unheld, b)
			}
			continue
		}
		a.byPeer[first[i]] = append(a.byPeer[first[i]], b)
		a.planned[b.ID] = true
		if force[b.ID] {
			a.force[b.ID] = true
		}
		if second[i] != "" {
			a.backup[b.ID] = second[i]
		}
	}
	return a
}

// result is what one request of a batch produced.
type result struct {
	p     peer.ID
	o     outcome
	hedge bool          // a hedged request to a second choice
	took  time.Duration // until it returned
}

// runBatch asks p for a batch of blocks. If p has not answered within its
// hedge delay (HedgeDelay of its latency EWMA), the blocks still missing
// are asked of their second-choice holders too; each block is taken from
// whichever request delivers it first, and the other requests are
// cancelled once the batch is complete. It reports whether p may be asked
// for more in this round.
func (ps *PeerSource) runBatch(ctx context.Context, p peer.ID, batch []flat.Block, backup map[flat.BlockID]peer.ID, flags uint64, f *fetchState) bool {
	n := ps.n
	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	missing := make(map[flat.BlockID]bool, len(batch))
	for _, b := range batch {
		missing[b.ID] = true
	}
	deliver := func(id flat.BlockID, data []byte) {
		mu.Lock()
		defer mu.Unlock()
		if !missing[id] {
			return
		}
		delete(missing, id)
		f.deliver(id, data)
		if len(missing) == 0 {
			cancel() // complete: end the requests that lost
		}
	}
	results := make(chan result, 1+len(batch))
	launch := func(q peer.ID, bs []flat.Block, hedge bool, onAnswer func()) {
		go func() {
			start := time.Now()
			o := n.request(bctx, q, ps.nameFor(q), bs, reqOpts{flags: flags | flagHints | flagMember, onAnswer: onAnswer, deliver: deliver})
			results <- result{p: q, o: o, hedge: hedge, took: time.Since(start)}
		}()
	}
	answered := make(chan struct{})
	launch(p, batch, false, func() { close(answered) })

	var hedgeC <-chan time.Time
	if d := HedgeDelay(n.latency(p), n.cfg.HedgeDelay); d > 0 && slices.ContainsFunc(batch, func(b flat.Block) bool { return backup[b.ID] != "" }) {
		hedgeC = n.cfg.Clock.After(d)
	}
	var outs []result
	for pending := 1; pending > 0; {
		select {
		case <-answered:
			answered, hedgeC = nil, nil // p is serving: no hedge
		case <-hedgeC:
			hedgeC = nil
			groups := map[peer.ID][]flat.Block{}
			mu.Lock()
			for _, b := range batch {
				if q := backup[b.ID]; missing[b.ID] && q != "" {
					groups[q] = append(groups[q], b)
				}
			}
			mu.Unlock()
			for q, bs := range groups {
				pending++
				n.st.hedged.Add(1)
				launch(q, bs, true, nil)
			}
		case r := <-results:
			pending--
			if !r.hedge {
				hedgeC = nil // p is done; what it missed goes to the next round
			}
			outs = append(outs, r)
		}
	}
	mu.Lock()
	complete := len(missing) == 0
	mu.Unlock()
	more := true
	for _, r := range outs {
		if !ps.record(ctx, r, complete, f) && !r.hedge {
			more = false
		}
	}
	return more
}

// nameFor is the image a request to holder q names: the call's image,
// unless that is private here and q is a peer of another joined image's
// swarm but not of its own (the blocks are shared with that image): that
// image, then, for which q and this node are verified to each other
// already. Naming the call's image would make q, which does not serve it,
// answer as a stranger.
func (ps *PeerSource) nameFor(q peer.ID) string {
	n := ps.n
	if !n.Private(ps.image) {
		return ps.image
	}
	if s := n.swarm(ps.image); s == nil || s.hasRemote(q) {
		return ps.image
	}
	for _, s := range n.swarmList() {
		if s.digest != ps.image && s.hasRemote(q) {
			return s.digest
		}
	}
	return ps.image
}

// record books a request's outcome: NOT_FOUND answers, penalties, latency.
// It reports false if the peer should not be asked again in this call.
func (ps *PeerSource) record(ctx context.Context, r result, complete bool, f *fetchState) bool {
	n, p, o := ps.n, r.p, r.o
	f.mu.Lock()
	for _, b := range o.notFound {
		if f.tried[b.ID] == nil {
			f.tried[b.ID] = map[peer.ID]bool{}
		}
		f.tried[b.ID][p] = true
	}
	f.mu.Unlock()
	for _, b := range o.notFound {
		n.forget(p, b.ID)
	}
	if r.hedge && len(o.got) > 0 {
		n.st.hedgeWins.Add(1)
	}
	now := n.cfg.Clock.Now()
	// Ended by our cancel once another request completed the batch.
	lost := complete && ctx.Err() == nil && o.err != nil && !o.bad && !o.busy
	f.mu.Lock()
	defer f.mu.Unlock()
	n.st.spreadRecv.Add(int64(len(o.spread)))
	for _, b := range o.spread {
		if f.spread[b.ID] == nil {
			f.spread[b.ID] = map[peer.ID]bool{}
			f.spreadAt[b.ID] = now
		}
		f.spread[b.ID][p] = true
	}
	if !o.bad {
		for id, hs := range o.hints {
			for _, h := range hs {
				if len(f.hints[id]) >= hintLimit || slices.Contains(f.hints[id], h.ID) {
					continue
				}
				f.hints[id] = append(f.hints[id], h.ID)
				n.st.hintsRecv.Add(1)
				if len(h.Addrs) > 0 {
					// Dialable if this node has never met it; a wrong
					// address costs a failed dial (the peer ID is
					// verified by the handshake).
					n.host.Peerstore().AddAddrs(h.ID, h.Addrs, peerstore.TempAddrTTL)
				}
			}
		}
	}
	switch {
	case o.notMember:
		// It left the image: not a holder of any of its blocks.
		f.excluded[p] = true
		n.markNotMember(ps.image, p)
		return false
	case o.bad:
		f.excluded[p] = true
		n.st.badBlocks.Add(1)
		avoided := n.peers.strike(p, n.cfg.BadBlockStrikes, n.cfg.PenaltyCoolDown, now)
		n.log.Warn("peer sent a wrong block; asking elsewhere", "peer", p.String(), "image", ps.image, "avoided", avoided, "err", o.err)
		f.errBad = cmp.Or(f.errBad, fmt.Errorf("peer %s: %w", p, o.err))
		return false
	case o.busy:
		// Not excluded from the call: it rests for BusyBackoff and may be
		// asked again by await, when its slots have freed.
		n.st.busyRecv.Add(1)
		n.peers.busy(p, now.Add(n.cfg.BusyBackoff))
		f.errBusy = cmp.Or(f.errBusy, fmt.Errorf("peer %s: %w", p, ErrBusy))
		return false
	case lost && o.firstByte > 0:
		n.peers.success(p, o.firstByte, len(o.got))
		return true
	case lost:
		n.peers.slow(p, r.took)
		if !r.hedge {
			f.excluded[p] = true // slower than its hedge: ask others first for the rest
			return false
		}
		return true
	case o.err != nil:
		f.excluded[p] = true
		n.st.failedReqs.Add(1)
		if ctx.Err() == nil {
			n.peers.failure(p, n.cfg.FirstByteTimeout, now)
		}
		n.log.Debug("peer request failed; asking elsewhere", "peer", p.String(), "image", ps.image, "err", o.err)
		f.errFail = cmp.Or(f.errFail, fmt.Errorf("peer %s: %w", p, o.err))
		return false
	default:
		n.peers.success(p, o.firstByte, len(o.got))
		return true
	}
}

// origin asks each designated fetcher (planOrigin) for its blocks with
// the ORIGIN flag: it fetches what it does not hold from its origin (once,
// however many ask) and sends the first copies, or answers COMING (then
// await takes the blocks from the swarm). The wait is bounded by
// OriginWait, and ends with the call (ctx): a designated fetcher may hold
// a request in its queue for an upload slot while the block arrives from
// a holder. A fetcher that is unreachable (no connection to it could be
// made: gone) is left out of the designation for a while, and its blocks
// are planned again at once, for the next member of the group. A fetcher
// that fails otherwise, is BUSY or answers NOT_FOUND ends it at once, and
// the blocks fall through to the registry.
func (ps *PeerSource) origin(ctx context.Context, ask map[peer.ID][]flat.Block, f *fetchState) {
	n := ps.n
	if len(ask) == 0 {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, n.cfg.OriginWait)
	defer cancel()
	var wg sync.WaitGroup
	var askPeer func(p peer.ID, bs []flat.Block)
	askPeer = func(p peer.ID, bs []flat.Block) {
		done := 0
		defer func() {
			// Whatever this peer was not asked for is not pending.
			f.mu.Lock()
			for _, b := range bs[done:] {
				f.pending[b.ID]--
			}
			f.notifyLocked()
			f.mu.Unlock()
		}()
		if !n.dialHedged(wctx, peer.AddrInfo{ID: p}) {
			if wctx.Err() != nil || !n.undesignatable(ps.image)(p) {
				return
			}
			// Gone (the dial failed), or slow (not connected within
			// DesignatedHedge): not designated while so. Its blocks
			// (pending still) go to the next member of the group at once.
			n.st.originReplanned.Add(int64(len(bs)))
			for q, qbs := range ps.planOrigin(bs, f) {
				wg.Go(func() { askPeer(q, qbs) })
			}
			return
		}
		for _, batch := range batches(bs) {
			n.st.originAsked.Add(1)
			o := n.request(wctx, p, ps.image, batch, reqOpts{flags: flagOrigin | flagMember, firstByte: n.cfg.OriginWait})
			for id, d := range o.got {
				f.deliver(id, d)
			}
			n.st.originGot.Add(int64(len(o.got)))
			more := ps.recordOrigin(ctx, p, batch, o, f)
			if wctx.Err() == nil && (o.notMember || o.unreachable && !n.peers.designatable(p, n.cfg.Clock.Now())) {
				// Gone (request marked it undesignatable), or not a
				// member of the image: planning again cannot pick it.
				// Its blocks (pending still, so await keeps waiting) go
				// to the next member of the group.
				n.st.originReplanned.Add(int64(len(bs) - done))
				for q, qbs := range ps.planOrigin(bs[done:], f) {
					wg.Go(func() { askPeer(q, qbs) })
				}
			}
			f.mu.Lock()
			for _, b := range batch {
				f.pending[b.ID]--
			}
			f.notifyLocked()
			f.mu.Unlock()
			done += len(batch)
			if !more {
				return
			}
		}
	}
	for p, bs := range ask {
		wg.Go(func() { askPeer(p, bs) })
	}
	wg.Wait()
}

// planOrigin puts blocks nobody holds (or whose holders all turned this
// call away) to origin coalescing: it splits them by designated fetcher
// (PlanOrigin over originView), starts the fetch of those designated to
// this node (left to the registry source, which joins it), and returns
// the others by designated peer, each counted pending until its ORIGIN
// request is answered. Members of the group that are not designatable
// (unreachable lately, failing, avoided, not members of the image, or slow
// to connect: DesignatedHedge) are left out of the designation
// (LiveGroup): their blocks go to the next member in each block's
// rendezvous order. It runs before the requests are sent, so that await
// sees the blocks pending from the start.
func (ps *PeerSource) planOrigin(blocks []flat.Block, f *fetchState) map[peer.ID][]flat.Block {
	n := ps.n
	ask, own := PlanOrigin(blocks, n.originView(ps.image), n.ID(), n.undesignatable(ps.image))
	if n.cfg.OriginWait <= 0 {
		own, ask = blocks, nil
	}
	f.mu.Lock()
	for _, b := range blocks {
		f.asked[b.ID] = true
	}
	for _, b := range own {
		f.own[b.ID] = true
	}
	for _, bs := range ask {
		for _, b := range bs {
			f.pending[b.ID]++
		}
	}
	f.mu.Unlock()
	if fetch := n.originFetch(ps.image); len(own) > 0 && fetch != nil {
		n.startOrigin(ps.image, fetch, own, "") // not waited for: the registry source joins it
	}
	return ask
}

// recordOrigin books an ORIGIN request's outcome. Its latency is not a
// sample of the peer's (it includes a registry fetch). It reports false if
// the peer should not be asked again in this call.
func (ps *PeerSource) recordOrigin(ctx context.Context, p peer.ID, batch []flat.Block, o outcome, f *fetchState) bool {
	asked := len(batch)
	n := ps.n
	now := n.cfg.Clock.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case o.bad:
		n.st.badBlocks.Add(1)
		avoided := n.peers.strike(p, n.cfg.BadBlockStrikes, n.cfg.PenaltyCoolDown, now)
		n.log.Warn("designated fetcher sent a wrong block", "peer", p.String(), "image", ps.image, "avoided", avoided, "err", o.err)
		f.errBad = cmp.Or(f.errBad, fmt.Errorf("designated fetcher %s: %w", p, o.err))
		return false
	case o.coming:
		// It holds them now and passes them on: wait for them to spread
		// (await), and go on asking it for the rest, which it fetches
		// whether or not it has a slot to send them.
		n.st.comingRecv.Add(1)
		for _, b := range batch {
			if _, got := f.out[b.ID]; !got {
				f.setComingLocked(b.ID, p, now)
			}
		}
		f.errOrigin = cmp.Or(f.errOrigin, fmt.Errorf("designated fetcher %s: %w", p, ErrComing))
		return true
	case o.busy:
		n.st.busyRecv.Add(1)
		n.peers.busy(p, now.Add(n.cfg.BusyBackoff))
		f.errBusy = cmp.Or(f.errBusy, fmt.Errorf("designated fetcher %s: %w", p, ErrBusy))
		return false
	case o.err != nil:
		n.log.Debug("ORIGIN request failed", "peer", p.String(), "image", ps.image, "blocks", asked,
			"got", len(o.got), "unreachable", o.unreachable, "err", o.err)
		if o.firstByte == 0 && ctx.Err() == nil {
			// No answer at all within the wait: gone, or hung.
			n.st.failedReqs.Add(1)
			n.peers.failure(p, n.cfg.FirstByteTimeout, now)
		}
		f.errOrigin = cmp.Or(f.errOrigin, fmt.Errorf("designated fetcher %s: %w", p, o.err))
		return false
	case o.notMember:
		// Its blocks are planned again (origin); no use asking it more.
		n.markNotMember(ps.image, p)
		f.errOrigin = cmp.Or(f.errOrigin, fmt.Errorf("designated fetcher %s is not a member of the image", p))
		return false
	case len(o.notFound) > 0:
		f.errOrigin = cmp.Or(f.errOrigin, fmt.Errorf("designated fetcher %s could not fetch %d of %d blocks", p, len(o.notFound), asked))
	}
	for _, b := range o.spread {
		if _, got := f.out[b.ID]; !got {
			f.setComingLocked(b.ID, p, now)
		}
	}
	return true
}

// mayDeliverLocked reports whether p, a holder of block id, may still
// deliver it in this call: not excluded from the call, not known to lack
// it, and not avoided after wrong blocks (it is not asked again before
// the call ends). A block whose holders are all past that is not waited
// for; it goes to its designated fetcher at once. f.mu must be held.
func (f *fetchState) mayDeliverLocked(n *Node, id flat.BlockID, p peer.ID, now time.Time) bool {
	return !f.excluded[p] && !f.tried[id][p] && !n.peers.isAvoided(p, now)
}

// setComingLocked records that designated fetcher p answered block id
// COMING at now (the first such answer counts). f.mu must be held.
func (f *fetchState) setComingLocked(id flat.BlockID, p peer.ID, now time.Time) {
	f.coming[id] = true
	if _, ok := f.comingAt[id]; !ok {
		f.comingFrom[id], f.comingAt[id] = p, now
	}
}

// undeliveredLocked returns the blocks of want a designated fetcher
// answered COMING for at least ComingGrace ago that no other holder this
// call may ask has shown since, and clears their COMING: the fetcher did
// not pass them on. f.mu must be held.
func (f *fetchState) undeliveredLocked(n *Node, want []flat.Block, now time.Time) (blocks []flat.Block, fetchers []peer.ID) {
	grace := ComingGrace(n.cfg.OriginWait)
	for _, b := range want {
		at, ok := f.comingAt[b.ID]
		if !f.coming[b.ID] || !ok || now.Sub(at) < grace {
			continue
		}
		from := f.comingFrom[b.ID]
		if slices.ContainsFunc(f.holdersLocked(n, b.ID), func(p peer.ID) bool { return p != from && f.mayDeliverLocked(n, b.ID, p, now) }) {
			continue
		}
		delete(f.coming, b.ID)
		delete(f.comingAt, b.ID)
		f.asked[b.ID] = false
		blocks = append(blocks, b)
		if !slices.Contains(fetchers, from) {
			fetchers = append(fetchers, from)
		}
	}
	return blocks, fetchers
}

// imageID is an image's manifest digest as a block ID, the key its
// origin group is chosen by.
func imageID(digest string) (flat.BlockID, error) {
	key, err := ImageKey(digest)
	if err != nil {
		return flat.BlockID{}, err
	}
	_, id, ok := imageOfKey(key)
	if !ok {
		return flat.BlockID{}, fmt.Errorf("image %s: not a sha256 digest", digest)
	}
	return id, nil
}

// originView is the origin group origin coalescing designates over, as
// this node sees it now: OriginGroup over the group its last lookup found
// and the peers it has have sessions with. The lowest scores of a union
// are the lowest of (the lowest of one part, plus the other part), so
// this refines the lookup's group with every peer met since: a node whose
// lookup ran before most records were out (the first nodes of a swarm
// starting at once) converges on the group the others agree on.
func (n *Node) originView(image string) []peer.ID {
	id, err := imageID(image)
	if err != nil {
		return nil
	}
	return OriginGroup(id, append(n.imageGroup(image), n.ImagePeers(image)...), n.ID(), OriginGroupSize)
}

// latency is p's latency EWMA (0 if never measured).
func (n *Node) latency(p peer.ID) time.Duration {
	pi, _ := n.peers.info(p)
	return pi.Latency
}

// forceBatches splits one peer's blocks into requests (batches) with
// their flags: the blocks to ask with FORCE first, apart, so that FORCE
// covers only them — a FORCE request for a whole batch would take every
// block of it past its holder's SpreadCopies.
func forceBatches(bs []flat.Block, force map[flat.BlockID]bool) ([][]flat.Block, []uint64) {
	var forced, plain []flat.Block
	for _, b := range bs {
		if force[b.ID] {
			forced = append(forced, b)
		} else {
			plain = append(plain, b)
		}
	}
	out := batches(forced)
	flags := make([]uint64, len(out))
	for i := range flags {
		flags[i] = flagForce
	}
	pb := batches(plain)
	return append(out, pb...), append(flags, make([]uint64, len(pb))...)
}

// batches splits one peer's blocks into requests of at most
// MaxRequestBlocks blocks and maxRequestBytes bytes (at least one block).
func batches(bs []flat.Block) [][]flat.Block {
	var out [][]flat.Block
	for len(bs) > 0 {
		n, size := 0, 0
		for n < len(bs) && n < MaxRequestBlocks && (n == 0 || size+int(bs[n].ULen) <= maxRequestBytes) {
			size += int(bs[n].ULen)
			n++
		}
		out = append(out, bs[:n])
		bs = bs[n:]
	}
	return out
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
