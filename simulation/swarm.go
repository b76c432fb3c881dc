package simulation

import (
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/p2p"
)

// pcall is one PeerSource.FetchMany: rounds of planning (ChoosePeers,
// Assign) over the holders the node sees, batched requests to up to
// p2p.ParallelPeers peers at once, and, in parallel, origin coalescing for
// the blocks nobody holds (PlanOrigin over the origin group); then, until
// OriginWait after the call began, waiting for the blocks the swarm is
// about to have (await). What is still missing goes to the registry
// (then).
type pcall struct {
	w        *world
	n        *simNode
	all      []uint32
	want     []uint32
	round    int
	excluded map[int32]bool
	planned  map[uint32]bool
	// queue holds the peers of the round not started yet; active counts
	// those running.
	queue      []peerWork
	active     int
	roundsDone bool
	then       func(missing []uint32)
	thenCalled bool
	// The await phase: blocks left to the registry source (designated to
	// this node), blocks a designated fetcher answered COMING for, the
	// deadline, whether a round of it runs, and its wake-up generation.
	own    map[uint32]bool
	coming map[uint32]bool
	// The designated fetcher of each block's first COMING answer, and
	// when it came (p2p.ComingGrace).
	comingFrom map[uint32]int32
	comingAt   map[uint32]time.Duration
	asked      map[uint32]bool // put to origin coalescing in this call
	pending    map[uint32]int  // ORIGIN requests not answered yet
	oreqs      []*originReq    // ORIGIN requests, dropped when the call ends
	deadline   time.Duration
	awaiting   bool
	wakeGen    int
	sleeping   *awaiter // while asleep in the await phase
	// Holders that answered a block COMING (p2p.Spread), and when the
	// first did.
	spread   map[uint32]map[int32]bool
	spreadAt map[uint32]time.Duration
	// Peers COMING answers named as the block's recipients (fetchState's
	// hints): holders of it, whether or not they are sessions.
	hints map[uint32][]int32
}

type peerWork struct {
	p      int32
	blocks []uint32
	force  map[uint32]bool // blocks asked with FORCE (p2p.ForceSpread)
}

// fetchPeers runs one FetchMany over blocks.
func (w *world) fetchPeers(n *simNode, blocks []uint32, then func(missing []uint32)) {
	c := &pcall{w: w, n: n, all: blocks, want: blocks, excluded: map[int32]bool{}, then: then,
		spread: map[uint32]map[int32]bool{}, spreadAt: map[uint32]time.Duration{}, hints: map[uint32][]int32{},
		own: map[uint32]bool{}, coming: map[uint32]bool{}, asked: map[uint32]bool{}, pending: map[uint32]int{},
		comingFrom: map[uint32]int32{}, comingAt: map[uint32]time.Duration{},
		deadline: w.e.now + w.cfg.Swarm.OriginWait}
	c.plan()
}

// plan runs one round: the plan of PeerSource.plan, then the requests.
func (c *pcall) plan() {
	w, n := c.w, c.n
	now := w.e.wall()
	holders := make([][]peer.ID, len(c.want))
	var views []p2p.PeerView
	seen := map[int32]bool{}
	held := make([]bool, len(c.want))
	force := map[uint32]bool{}
	for i, b := range c.want {
		sp := c.spread[b]
		hs := c.holders(b)
		if len(sp) > 0 {
			others := false
			for _, p := range hs {
				q := w.nodes[p]
				if !sp[p] && !c.excluded[p] && n.scores.Designatable(q.pid, now) {
					others = true
					break
				}
			}
			force[b] = p2p.ForceSpread(w.e.now-c.spreadAt[b], w.cfg.Swarm.SpreadWait, others)
		}
		for _, p := range hs {
			q := w.nodes[p]
			held[i] = true
			if sp[p] && !force[b] {
				continue
			}
			holders[i] = append(holders[i], q.pid)
			if seen[p] {
				continue
			}
			seen[p] = true
			if c.excluded[p] {
				continue
			}
			if v, ok := n.scores.View(q.pid, now); ok {
				views = append(views, v)
			}
		}
	}
	first, second := p2p.Assign(p2p.ChoosePeers(views, n.labels, n.rng), holders)
	c.planned = map[uint32]bool{}
	var none []uint32         // no holder at all (p2p's unheld)
	byPeer := map[int32]int{} // index into c.queue
	c.queue = c.queue[:0]
	for i, b := range c.want {
		if first[i] == "" {
			if !held[i] {
				none = append(none, b)
			}
			continue
		}
		p := w.byID[first[i]]
		k, ok := byPeer[p]
		if !ok {
			k = len(c.queue)
			byPeer[p] = k
			c.queue = append(c.queue, peerWork{p: p})
		}
		c.queue[k].blocks = append(c.queue[k].blocks, b)
		if force[b] {
			if c.queue[k].force == nil {
				c.queue[k].force = map[uint32]bool{}
			}
			c.queue[k].force[b] = true
		}
		c.planned[b] = true
		_ = second[i] // hedging's second choice: see request
	}
	if c.round == 0 && len(none) > 0 && !c.awaiting {
		c.origin(none)
	}
	if c.thenCalled {
		return
	}
	if len(c.queue) == 0 {
		if c.awaiting {
			// A designated fetcher whose COMING blocks showed up nowhere
			// within ComingGrace is taken for unreachable; its blocks
			// go to the next member (PeerSource.await).
			if undelivered := c.undelivered(); len(undelivered) > 0 {
				w.st.originReplanned += int64(len(undelivered))
				c.origin(undelivered)
			}
			// Nobody may be asked now: blocks not yet put to their
			// designated fetcher go to it (PeerSource.await's late origin).
			var late []uint32
			ow := w.cfg.Swarm.OriginWait
			if c.deadline-w.e.now <= ow-ow/lateOrigin {
				for _, b := range c.want {
					if !c.coming[b] && !c.asked[b] {
						late = append(late, b)
					}
				}
			}
			if len(late) > 0 {
				c.origin(late)
			}
			c.sleep()
			return
		}
		c.roundsDone = true
		c.finish()
		return
	}
	if c.awaiting {
		w.st.awaitRounds++
	}
	for c.active < p2p.ParallelPeers && len(c.queue) > 0 {
		c.startPeer()
	}
}

// startPeer asks the next peer of the round for its blocks, batch after
// batch, until it has served them all or may not be asked again.
func (c *pcall) startPeer() {
	pw := c.queue[0]
	c.queue = c.queue[1:]
	c.active++
	var force map[flat.BlockID]bool
	for b := range pw.force {
		if force == nil {
			force = map[flat.BlockID]bool{}
		}
		force[c.w.im.blocks[b].ID] = true
	}
	batches, forced := p2p.ForceBatches(c.w.blocksOf(pw.blocks), force)
	var next func(k int)
	next = func(k int) {
		if k == len(batches) {
			c.peerDone()
			return
		}
		batch := c.w.positions(batches[k], c.w.im.pos)
		if forced[k] {
			c.w.st.forcedRequests++
		}
		c.w.request(c.n, c.w.nodes[pw.p], batch, forced[k], func(ok bool, spread []uint32, hints [][]int32) {
			for i, b := range spread {
				for _, h := range hints[i] {
					if h != c.n.i && h != pw.p && len(c.hints[b]) < p2p.HintLimit && !slices.Contains(c.hints[b], h) {
						c.hints[b] = append(c.hints[b], h)
						c.w.st.hintsReceived++
					}
				}
				if c.spread[b] == nil {
					c.spread[b] = map[int32]bool{}
					c.spreadAt[b] = c.w.e.now
				}
				c.spread[b][pw.p] = true
			}
			if !ok {
				// BUSY: it rests (BusyBackoff), not excluded from the call.
				c.peerDone()
				return
			}
			next(k + 1)
		})
	}
	next(0)
}

func (c *pcall) peerDone() {
	c.active--
	if len(c.queue) > 0 {
		c.startPeer()
		return
	}
	if c.active > 0 {
		return
	}
	if c.awaiting {
		c.await()
		return
	}
	// The round is over: blocks with no usable holder drop out; the rest
	// are planned again.
	var still []uint32
	for _, b := range c.want {
		if !c.n.have[b] && c.planned[b] {
			still = append(still, b)
		}
	}
	c.want = still
	c.round++
	if c.round < p2p.MaxRounds && len(c.want) > 0 {
		c.plan()
		return
	}
	c.roundsDone = true
	c.finish()
}

// finish hands what is still missing to the registry once the rounds, the
// origin requests and the await phase are done.
func (c *pcall) finish() {
	if !c.roundsDone || c.thenCalled {
		return
	}
	if !c.awaiting {
		c.awaiting = true
		c.await()
		return
	}
	c.thenCalled = true
	for _, r := range c.oreqs {
		r.drop()
	}
	var missing []uint32
	for _, b := range c.all {
		if !c.n.have[b] {
			missing = append(missing, b)
		}
	}
	c.then(missing)
}

// await is PeerSource.await: until the deadline, the blocks still
// missing that a designated fetcher answered COMING for, or that a session
// peer holds, are planned again whenever a session's bitmap gains a block
// or every awaitPoll, and asked of the holders not excluded in this call.
// Blocks designated to this node are left to the registry.
func (c *pcall) await() {
	w, n := c.w, c.n
	var want []uint32
	for _, b := range c.all {
		if n.have[b] || c.own[b] {
			continue
		}
		if c.coming[b] || c.pending[b] > 0 || slices.ContainsFunc(c.holders(b), func(p int32) bool { return !c.excluded[p] }) {
			want = append(want, b)
		}
	}
	if len(want) == 0 || w.e.now >= c.deadline {
		if len(want) > 0 {
			w.st.awaitTimeouts += int64(len(want))
		}
		c.finish()
		return
	}
	c.want = want
	c.plan()
}

// reach is how long n's request takes to reach q, a group member with no
// have session with n: one way, and a new connection (TCP, noise, yamux:
// three round trips) the first time; n and q are connected from then on.
func (w *world) reach(n, q *simNode) time.Duration {
	ow := w.oneWay(n, q)
	if n.conn[q.i] {
		return ow
	}
	n.conn[q.i], q.conn[n.i] = true, true
	return 7 * ow
}

// undelivered is fetchState.undeliveredLocked: of the blocks awaited, those
// a designated fetcher answered COMING for at least p2p.ComingGrace ago
// that no other holder shows, with their COMING cleared; each such
// fetcher is marked unreachable.
func (c *pcall) undelivered() []uint32 {
	w, n := c.w, c.n
	if w.cfg.ComingGraceOff {
		return nil
	}
	grace := p2p.ComingGrace(w.cfg.Swarm.OriginWait)
	var out []uint32
	var fetchers []int32
	for _, b := range c.want {
		at, ok := c.comingAt[b]
		if !c.coming[b] || !ok || w.e.now-at < grace {
			continue
		}
		from := c.comingFrom[b]
		if slices.ContainsFunc(c.holders(b), func(p int32) bool { return p != from && !c.excluded[p] }) {
			continue
		}
		delete(c.coming, b)
		delete(c.comingAt, b)
		c.asked[b] = false
		out = append(out, b)
		if !slices.Contains(fetchers, from) {
			fetchers = append(fetchers, from)
		}
	}
	for _, p := range fetchers {
		w.st.comingUndelivered++
		w.unreachable(n, w.nodes[p])
	}
	return out
}

// lateOrigin is p2p's lateOrigin.
const lateOrigin = 3

// awaitPoll is p2p's awaitPoll.
const awaitPoll = 50 * time.Millisecond

// sleep waits for news: a session's bitmap gaining a block, or awaitPoll,
// or the deadline; then await again.
func (c *pcall) sleep() {
	w, n := c.w, c.n
	c.wakeGen++
	gen := c.wakeGen
	a := &awaiter{}
	c.sleeping = a
	a.wake = func() {
		if c.sleeping == a {
			c.sleeping = nil
		}
		a.done = true
		if c.wakeGen != gen || c.thenCalled {
			return
		}
		c.wakeGen++
		c.await()
	}
	n.awaiters = append(n.awaiters, a)
	w.e.after(min(awaitPoll, c.deadline-w.e.now), a.wake)
}

// news wakes the call if it sleeps in its await phase (a block arrived or
// an ORIGIN request ended: fetchState's news).
func (c *pcall) news() {
	if c.sleeping != nil {
		a := c.sleeping
		c.sleeping = nil
		a.wake()
	}
}

// rare is p2p's swarm.rare: whether one of blocks is held by fewer than
// p2p.RareHolders of q's session peers, as q sees their bitmaps.
func (w *world) rare(q *simNode, blocks []uint32) bool {
	if len(q.sessions) == 0 {
		return false
	}
	for _, b := range blocks {
		holders := 0
		for _, p := range q.sessions {
			h := w.nodes[p]
			if h.have[b] && h.visible[b]+w.oneWay(h, q) <= w.e.now {
				holders++
			}
		}
		if p2p.Rare(holders) {
			return true
		}
	}
	return false
}

// holders is fetchState.holdersLocked: the session peers whose bitmaps,
// as n sees them now, show b, then the peers COMING answers named as b's
// recipients. A hinted peer that does not hold b is dropped, as its
// NOT_FOUND answer would drop it (the round trip is not charged: a
// recipient is named once its copy has landed, so this is rare).
func (c *pcall) holders(b uint32) []int32 {
	w, n := c.w, c.n
	var out []int32
	for _, p := range n.sessions {
		q := w.nodes[p]
		if q.have[b] && q.visible[b]+w.oneWay(n, q) <= w.e.now {
			out = append(out, p)
		}
	}
	hs := c.hints[b][:0]
	for _, p := range c.hints[b] {
		if !w.nodes[p].have[b] {
			continue
		}
		hs = append(hs, p)
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	c.hints[b] = hs
	return out
}

// origin is PeerSource.origin: the blocks nobody holds go to their
// designated fetcher (PlanOrigin over the origin group): its own are
// fetched from the registry at once; the others are asked of their
// designated peer with the ORIGIN flag, for at most OriginWait.
func (c *pcall) origin(none []uint32) {
	w, n := c.w, c.n
	for _, b := range none {
		c.asked[b] = true
	}
	ask, own := p2p.PlanOrigin(w.blocksOf(none), w.originView(n), n.pid, w.down(n))
	if w.cfg.Swarm.OriginWait <= 0 {
		for _, b := range none {
			c.own[b] = true
		}
		w.fetchRegistry(n, none)
		return
	}
	if len(own) > 0 {
		w.st.designatedOwn += int64(len(own))
		for _, b := range w.positions(own, w.im.pos) {
			c.own[b] = true
		}
		w.fetchRegistry(n, w.positions(own, w.im.pos))
	}
	if len(ask) == 0 {
		return
	}
	deadline := w.e.now + w.cfg.Swarm.OriginWait
	// askPeer asks q, the designated fetcher of blocks, for them, one
	// request after another while q answers. A q that cannot be reached
	// (gone) is left out of the designation, and its blocks are planned
	// again at once, for the next member of the group (PeerSource.origin).
	var askPeer func(q *simNode, blocks []flat.Block)
	replan := func(blocks []flat.Block) {
		w.st.originReplanned += int64(len(blocks))
		ask, own := p2p.PlanOrigin(blocks, w.originView(n), n.pid, w.down(n))
		if len(own) > 0 {
			w.st.designatedOwn += int64(len(own))
			for _, b := range w.positions(own, w.im.pos) {
				c.own[b] = true
			}
			w.fetchRegistry(n, w.positions(own, w.im.pos))
		}
		for _, id := range sortedPeers(ask) {
			askPeer(w.nodes[w.byID[id]], ask[id])
		}
	}
	askPeer = func(q *simNode, blocks []flat.Block) {
		batches := p2p.Batches(blocks)
		for _, bt := range batches {
			for _, b := range w.positions(bt, w.im.pos) {
				c.pending[b]++
			}
		}
		var next func(k int)
		next = func(k int) {
			if k == len(batches) || c.thenCalled {
				for _, bt := range batches[min(k, len(batches)):] {
					for _, b := range w.positions(bt, w.im.pos) {
						c.pending[b]--
					}
				}
				return
			}
			w.st.originAsks++
			bs := w.positions(batches[k], w.im.pos)
			r := w.originRequest(n, q, bs, deadline, func(more, coming, lost bool) {
				if lost && w.e.now < deadline && !c.thenCalled && w.down(n)(q.pid) {
					var rest []flat.Block
					for _, bt := range batches[k:] {
						rest = append(rest, bt...)
					}
					replan(rest) // before the blocks stop being pending here
				}
				for _, b := range bs {
					c.pending[b]--
					if coming {
						c.coming[b] = true
						if _, ok := c.comingAt[b]; !ok {
							c.comingFrom[b], c.comingAt[b] = q.i, w.e.now
						}
					}
				}
				c.news()
				if !more {
					next(len(batches))
					return
				}
				next(k + 1)
			})
			c.oreqs = append(c.oreqs, r)
		}
		next(0)
	}
	now := w.e.wall()
	for _, id := range sortedPeers(ask) {
		if w.cfg.DesignateGone && !n.scores.Designatable(id, now) {
			continue // the what-if: left to the registry
		}
		askPeer(w.nodes[w.byID[id]], ask[id])
	}
}

// designatedDial bounds a dial to a designated fetcher: p2p.DesignatedDial,
// or FirstByteTimeout under the what-if DesignateGone (the daemon before).
func (w *world) designatedDial() time.Duration {
	if w.cfg.DesignateGone {
		return w.cfg.Swarm.FirstByteTimeout
	}
	return min(w.cfg.Swarm.FirstByteTimeout, p2p.DesignatedDial)
}

// down is Node.undesignatable, what n's PlanOrigin leaves out of the
// designation: the peers that answered NOT_MEMBER lately, those a dial to
// has gone on longer than DesignatedHedge, and those it may not designate
// now (gone, failing or avoided; not under the what-if DesignateGone).
func (w *world) down(n *simNode) func(peer.ID) bool {
	now := w.e.wall()
	return func(p peer.ID) bool {
		return w.isNotMember(n, p) || n.slowUntil[p] > w.e.now || !w.cfg.DesignateGone && !n.scores.Designatable(p, now)
	}
}

// slowDial is dialHedged giving up on q, at DesignatedHedge: n does
// not designate q until its dial ends, at end (and it is unreachable
// then).
func (w *world) slowDial(n, q *simNode, end time.Duration) {
	w.st.designatedSlow++
	if n.slowUntil == nil {
		n.slowUntil = map[peer.ID]time.Duration{}
	}
	n.slowUntil[q.pid] = max(n.slowUntil[q.pid], end)
}

// hedge reports whether a node takes a designated fetcher it cannot
// connect to within p2p.DesignatedHedge for gone in the call at hand (not
// under the what-ifs of the daemon before).
func (w *world) hedge() bool { return !w.cfg.DesignateGone && !w.cfg.NoDesignatedHedge }

// sortedPeers returns ask's peers in ID order: map order must not decide
// anything.
func sortedPeers(ask map[peer.ID][]flat.Block) []peer.ID {
	ids := make([]peer.ID, 0, len(ask))
	for id := range ask {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// request is one block request from n to q (p2p's request and handleBlock):
// q serves it if one of its upload slots is free, else answers BUSY. cb
// gets whether q may be asked again in this call.
func (w *world) request(n, q *simNode, blocks []uint32, force bool, cb func(ok bool, spread []uint32, hints [][]int32)) {
	w.st.peerRequests++
	n.peerReqs++
	n.scores.Begin(q.pid)
	ow := w.oneWay(n, q)
	// The hedge delay the daemon would wait before asking the second
	// choice too. In this model a served request's first byte comes after
	// one round trip, which is far below the delay's 50 ms floor; a
	// request that would wait longer is counted (hedgesDue) so that a
	// configuration where hedging matters shows up.
	hedge := p2p.HedgeDelay(n.scores.Latency(q.pid), w.cfg.Swarm.HedgeDelay)
	if hedge > 0 && 2*ow > hedge {
		w.st.hedgesDue++
	}
	there := ow
	if !n.conn[q.i] {
		there += 6 * ow // a hinted peer never met: TCP, noise, yamux
		n.conn[q.i], q.conn[n.i] = true, true
	}
	w.e.after(there, func() {
		busy := func() {
			w.st.busyAnswers++
			w.e.after(ow, func() {
				n.scores.End(q.pid)
				n.scores.Busy(q.pid, w.e.wall().Add(w.cfg.Swarm.BusyBackoff))
				cb(false, nil, nil)
			})
		}
		if p2p.OverShare(int64(q.blocksUp), int64(q.held), w.cfg.Swarm.UploadShare) && !w.rare(q, blocks) {
			busy() // over its share of uploads
			return
		}
		// handleBlock's take: each block goes to at most SpreadCopies
		// peers unless forced; the rest are answered COMING.
		var send, spread []uint32
		var hints [][]int32
		for _, b := range blocks {
			if !force && p2p.Spread(q.originCopies[b], w.cfg.Swarm.SpreadCopies) {
				spread = append(spread, b)
				hints = append(hints, slices.Clone(q.copiedTo[b]))
				continue
			}
			q.originCopies[b]++
			send = append(send, b)
		}
		w.st.spreadAnswers += int64(len(spread))
		if len(send) == 0 {
			w.e.after(ow, func() {
				n.scores.End(q.pid)
				n.scores.Success(q.pid, 2*ow, 0)
				cb(true, spread, hints)
			})
			return
		}
		rel, ok := q.slots.TryAcquire(n.pid)
		if !ok {
			for _, b := range send {
				q.originCopies[b]--
			}
			busy()
			return
		}
		blocks = send
		var size float64
		for _, b := range blocks {
			size += float64(w.im.blocks[b].ULen)
		}
		w.serve(q, n, size, nil, func() {
			q.uploaded += size
			q.blocksUp += size
			w.st.peerDelivered += size
			w.release(q, rel)
			w.e.after(ow, func() {
				w.blockWork(n, size, func() {
					n.scores.End(q.pid)
					n.scores.Success(q.pid, 2*ow, len(blocks))
					for _, b := range blocks {
						w.acquire(n, b, true)
						q.copied(b, n.i)
					}
					cb(true, spread, hints)
				})
			})
		})
	})
}

// serve sends size bytes of blocks from q to n: the transfer, and at the
// same time the CPU q spends serving them (Config.ServeCPU); done runs when
// both are over. The transfer is stored in *f, if f is set, so that it can
// be cancelled.
func (w *world) serve(q, n *simNode, size float64, f **flow, done func()) {
	left := 2
	both := func() {
		left--
		if left == 0 {
			done()
		}
	}
	fl := w.net.start(&q.up, &n.down, size, both)
	if f != nil {
		*f = fl
	}
	w.work(q, time.Duration(float64(w.cfg.ServeCPU)*size/float64(w.cfg.BlockCPUBytes)), both)
}

// slotWaiter is an ORIGIN request from p queued for an upload slot; f
// gets the slot, and reports false if the request gave up meanwhile.
type slotWaiter struct {
	p peer.ID
	f func(release func()) bool
}

// release frees one of q's upload slots and hands it to the first ORIGIN
// request queued for one (a block's first copies) whose peer is under
// its share of q's slots.
func (w *world) release(q *simNode, rel func()) {
	rel()
	for i := 0; i < len(q.slotQueue) && !q.slots.Full(); {
		sw := q.slotQueue[i]
		r, ok := q.slots.TryAcquire(sw.p)
		if !ok {
			i++
			continue
		}
		q.slotQueue = slices.Delete(q.slotQueue, i, i+1)
		if !sw.f(r) {
			r() // that request gave up
		}
	}
}

// originReq is an ORIGIN request in flight.
type originReq struct {
	done      bool
	cancelled bool
	flow      *flow
	rel       func()
	firstByte time.Duration // when the first answer arrives at the asker; 0: not yet known
	// drop ends the request for the asker (its FetchMany is over).
	drop func()
}

// originRequest asks q, n's designated fetcher for blocks, to fetch what it
// does not hold through its origin and serve them (handleBlock with the
// ORIGIN flag, originFor, startOrigin): q joins the origin fetches it runs
// already, starts one for the rest if one of its MaxOriginFetches is free
// (else serves what it can join, NOT_FOUND for the rest, or BUSY if it can
// join nothing), waits for the blocks, then sends them if one of its
// upload slots is free, else answers COMING (they spread from it through
// the swarm; n awaits them). n gives up at deadline. cb's lost: q could not
// be reached, or answered NOT_MEMBER (a left member; under the what-if
// NotMemberOff it answers NOT_FOUND instead, and lost stays false).
func (w *world) originRequest(n, q *simNode, blocks []uint32, deadline time.Duration, cb func(more, coming, lost bool)) *originReq {
	r := &originReq{}
	n.scores.Begin(q.pid)
	ow := w.oneWay(n, q)
	lost := false
	end := func(more, coming bool) {
		if r.done {
			return
		}
		r.done = true
		n.scores.End(q.pid)
		cb(more, coming, lost)
	}
	cancel := func() {
		r.cancelled = true
		if r.flow != nil {
			w.net.cancel(r.flow)
			q.uploaded += r.flow.sent
			q.blocksUp += r.flow.sent
			w.st.peerCancelled += r.flow.sent
			w.release(q, r.rel)
			r.flow = nil
		}
	}
	r.drop = func() {
		if r.done {
			return
		}
		cancel()
		r.done = true
		n.scores.End(q.pid)
	}
	w.e.at(deadline, func() {
		if r.done {
			return
		}
		cancel()
		w.st.originTimeouts++
		if r.firstByte == 0 || r.firstByte > w.e.now {
			n.scores.Failure(q.pid, w.cfg.Swarm.FirstByteTimeout, w.e.wall())
		}
		end(false, false)
	})
	if q.gone {
		// No connection can be made (p2p's dialHedged, or request's
		// stream that does not open): q is marked unreachable, unless the
		// wait ended first. A dial still running after DesignatedHedge
		// goes on in the background; the call takes q for gone then.
		fail := w.dialFail(n, q, w.designatedDial())
		if w.hedge() && fail > p2p.DesignatedHedge {
			dialEnd := w.e.now + fail
			w.e.after(fail, func() { w.unreachable(n, q) })
			w.e.after(p2p.DesignatedHedge, func() {
				w.slowDial(n, q, dialEnd)
				if r.done || w.e.now >= deadline {
					return
				}
				lost = true
				end(false, false)
			})
			return r
		}
		if w.e.now+fail < deadline {
			w.e.after(fail, func() {
				if r.done {
					return
				}
				if !w.hedge() { // request's stream did not open: a failure
					n.scores.Failure(q.pid, w.cfg.Swarm.FirstByteTimeout, w.e.wall())
				}
				w.unreachable(n, q)
				lost = true
				end(false, false)
			})
		}
		return r
	}
	if q.liar {
		// Byzantine: COMING for everything, and nothing sent.
		w.e.after(w.reach(n, q)+ow, func() {
			if r.done || r.cancelled {
				return
			}
			r.firstByte = w.e.now
			w.st.comingAnswers++
			end(true, true)
		})
		return r
	}
	if q.left {
		// Up, but not in the image's swarm: it answers NOT_MEMBER for
		// every block (the asker plans them again for the next member),
		// or, the daemon before, NOT_FOUND (they fall to the registry).
		w.e.after(w.reach(n, q)+ow, func() {
			if r.done || r.cancelled {
				return
			}
			r.firstByte = w.e.now
			if w.cfg.NotMemberOff {
				end(true, false)
				return
			}
			w.notMember(n, q)
			lost = true
			end(false, false)
		})
		return r
	}
	w.e.after(ow, func() {
		if r.cancelled {
			return
		}
		var waits, fresh []uint32
		for _, b := range blocks {
			switch {
			case q.have[b]:
			case q.regBusy[b]:
				waits = append(waits, b)
			default:
				fresh = append(fresh, b)
			}
		}
		slot := false
		if len(fresh) > 0 {
			if q.originFree > 0 {
				q.originFree--
				slot = true
				waits = append(waits, fresh...)
				w.fetchRegistry(q, fresh)
			} else if len(waits) == 0 {
				w.st.originBusy++
				w.e.after(ow, func() {
					n.scores.Busy(q.pid, w.e.wall().Add(w.cfg.Swarm.BusyBackoff))
					end(false, false)
				})
				return
			}
		}
		if slot {
			w.onHave(q, fresh, func() { q.originFree++ })
		}
		// The asker is recorded on each fetch it waits for; the fetch of
		// the first block of the request it waits for decides whether it
		// gets first copies (originFor's lead, p2p.FirstCopies).
		var lead *fetchCall
		for _, b := range blocks {
			if !slices.Contains(waits, b) {
				continue
			}
			c := q.calls[b]
			if c == nil {
				c = &fetchCall{block: b}
				q.calls[b] = c
			}
			c.askers = append(c.askers, n.pid)
			if lead == nil {
				lead = c
			}
		}
		w.onHave(q, waits, func() {
			serve := func(rel func()) {
				if r.cancelled {
					w.release(q, rel)
					return
				}
				var served []uint32
				var size float64
				for _, b := range blocks {
					if q.have[b] {
						served = append(served, b)
						size += float64(w.im.blocks[b].ULen)
					}
				}
				r.rel = rel
				r.firstByte = w.e.now + ow
				w.st.originBlocks += int64(len(served))
				w.serve(q, n, size, &r.flow, func() {
					r.flow = nil
					q.uploaded += size
					q.blocksUp += size
					w.st.peerDelivered += size
					w.release(q, rel)
					w.e.after(ow, func() {
						if r.cancelled {
							w.st.peerDiscarded += size
							return
						}
						w.blockWork(n, size, func() {
							if r.cancelled {
								w.st.peerDiscarded += size
								return
							}
							for _, b := range served {
								w.acquire(n, b, true)
								q.copied(b, n.i)
							}
							end(true, false)
						})
					})
				})
			}
			coming := func() {
				w.st.comingAnswers++
				w.e.after(ow, func() {
					if !r.cancelled {
						end(true, true)
					}
				})
			}
			if lead != nil && !slices.Contains(w.firstCopies(q, lead), n.pid) {
				w.st.firstCopyPassed++
				coming()
				return
			}
			var avail []uint32
			spread := true
			for _, b := range blocks {
				if q.have[b] {
					avail = append(avail, b)
					if !p2p.OriginSpread(q.originCopies[b], w.cfg.Swarm.MaxUploadStreams) {
						spread = false
					}
				}
			}
			if spread {
				coming()
				return
			}
			// One of the first copies: reserved, and queued for a slot
			// for at most OriginWait.
			for _, b := range avail {
				q.originCopies[b]++
			}
			if rel, ok := q.slots.TryAcquire(n.pid); ok {
				serve(rel)
				return
			}
			waiting := true
			q.slotQueue = append(q.slotQueue, slotWaiter{n.pid, func(rel func()) bool {
				if !waiting {
					return false
				}
				waiting = false
				serve(rel)
				return true
			}})
			w.e.after(w.cfg.Swarm.OriginWait, func() {
				if !waiting {
					return
				}
				waiting = false
				for _, b := range avail {
					q.originCopies[b]--
				}
				if !r.cancelled {
					coming()
				}
			})
		})
	})
	return r
}

// fetchCall is an origin fetch of one block for ORIGIN requests (p2p's
// originCall): the askers that wait for it, and the ones picked for its
// first copies once it is done.
type fetchCall struct {
	block  uint32
	askers []peer.ID
	first  []peer.ID
	picked bool
}

// firstCopies is publishOrigin's pick (p2p.FirstCopies), made once the
// block is held; later ORIGIN requests for it wait for no fetch.
func (w *world) firstCopies(q *simNode, c *fetchCall) []peer.ID {
	if !c.picked {
		c.picked = true
		c.first = p2p.FirstCopies(w.im.blocks[c.block].ID, c.askers, w.cfg.Swarm.MaxUploadStreams)
		if q.calls[c.block] == c {
			delete(q.calls, c.block)
		}
	}
	return c.first
}

// copied is originGroup.delivered: a copy of b from q reached p; the last
// p2p.MaxHints such peers are named in b's COMING answers.
func (q *simNode) copied(b uint32, p int32) {
	q.copiedTo[b] = p2p.AddRecipient(q.copiedTo[b], p)
}
