package simulation

import (
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

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
	originLeft int
	originDone bool
	then       func(missing []uint32)
	thenCalled bool
	// The await phase: blocks left to the registry source (designated to
	// this node), blocks a designated fetcher answered COMING for, the
	// deadline, whether a round of it runs, and its wake-up generation.
	own      map[uint32]bool
	coming   map[uint32]bool
	deadline time.Duration
	awaiting bool
	wakeGen  int
}

type peerWork struct {
	p      int32
	blocks []uint32
}

// fetchPeers runs one FetchMany over blocks.
func (w *world) fetchPeers(n *simNode, blocks []uint32, then func(missing []uint32)) {
	c := &pcall{w: w, n: n, all: blocks, want: blocks, excluded: map[int32]bool{}, then: then, originDone: true,
		own: map[uint32]bool{}, coming: map[uint32]bool{}, deadline: w.e.now + w.cfg.Swarm.OriginWait}
	c.plan()
}

// plan runs one round: the plan of PeerSource.plan, then the requests.
func (c *pcall) plan() {
	w, n := c.w, c.n
	now := w.e.wall()
	holders := make([][]peer.ID, len(c.want))
	var views []p2p.PeerView
	seen := map[int32]bool{}
	for i, b := range c.want {
		for _, p := range n.sessions {
			q := w.nodes[p]
			if !q.have[b] || q.visible[b]+w.oneWay(n, q) > w.e.now {
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
			if len(holders[i]) == 0 {
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
		c.planned[b] = true
		_ = second[i] // hedging's second choice: see request
	}
	if c.round == 0 && len(none) > 0 && !c.awaiting {
		c.origin(none)
	}
	if len(c.queue) == 0 {
		if c.awaiting {
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
	batches := p2p.Batches(c.w.blocksOf(pw.blocks))
	var next func(k int)
	next = func(k int) {
		if k == len(batches) {
			c.peerDone()
			return
		}
		c.w.request(c.n, c.w.nodes[pw.p], c.w.positions(batches[k], c.w.im.pos), func(ok bool) {
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
	if !c.roundsDone || !c.originDone || c.thenCalled {
		return
	}
	if !c.awaiting {
		c.awaiting = true
		c.await()
		return
	}
	c.thenCalled = true
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
		if c.coming[b] || w.heldBySession(n, b, c.excluded) {
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

// awaitPoll is p2p's awaitPoll.
const awaitPoll = 50 * time.Millisecond

// sleep waits for news: a session's bitmap gaining a block, or awaitPoll,
// or the deadline; then await again.
func (c *pcall) sleep() {
	w, n := c.w, c.n
	c.wakeGen++
	gen := c.wakeGen
	wake := func() {
		if c.wakeGen != gen || c.thenCalled {
			return
		}
		c.wakeGen++
		c.await()
	}
	n.awaiters = append(n.awaiters, wake)
	w.e.after(min(awaitPoll, c.deadline-w.e.now), wake)
}

// heldBySession reports whether a session peer of n not excluded from the
// call shows b in the bitmap n has of it (p2p's holders).
func (w *world) heldBySession(n *simNode, b uint32, excluded map[int32]bool) bool {
	for _, p := range n.sessions {
		q := w.nodes[p]
		if !excluded[p] && q.have[b] && q.visible[b]+w.oneWay(n, q) <= w.e.now {
			return true
		}
	}
	return false
}

// origin is PeerSource.origin: the blocks nobody holds go to their
// designated fetcher (PlanOrigin over the origin group): its own are
// fetched from the registry at once; the others are asked of their
// designated peer with the ORIGIN flag, for at most OriginWait.
func (c *pcall) origin(none []uint32) {
	w, n := c.w, c.n
	ask, own := p2p.PlanOrigin(w.blocksOf(none), w.originView(n), n.pid)
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
	// Map order must not decide anything: peers in ID order.
	ids := make([]peer.ID, 0, len(ask))
	for id := range ask {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	now := w.e.wall()
	for _, id := range ids {
		if !n.scores.Designatable(id, now) {
			continue
		}
		q := w.nodes[w.byID[id]]
		batches := p2p.Batches(ask[id])
		c.originDone = false
		c.originLeft++
		var next func(k int)
		next = func(k int) {
			if k == len(batches) {
				c.originLeft--
				if c.originLeft == 0 {
					c.originDone = true
					c.finish()
				}
				return
			}
			w.st.originAsks++
			bs := w.positions(batches[k], w.im.pos)
			w.originRequest(n, q, bs, deadline, func(more, coming bool) {
				if coming {
					for _, b := range bs {
						c.coming[b] = true
					}
				}
				if !more {
					next(len(batches))
					return
				}
				next(k + 1)
			})
		}
		next(0)
	}
}

// request is one block request from n to q (p2p's request and handleBlock):
// q serves it if one of its upload slots is free, else answers BUSY. cb
// gets whether q may be asked again in this call.
func (w *world) request(n, q *simNode, blocks []uint32, cb func(ok bool)) {
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
	w.e.after(ow, func() {
		rel, ok := q.slots.TryAcquire()
		if ok && p2p.OverShare(int64(q.uploaded), int64(q.held), w.cfg.Swarm.UploadShare) {
			rel() // over its share of uploads: BUSY
			ok = false
		}
		if !ok {
			w.st.busyAnswers++
			w.e.after(ow, func() {
				n.scores.End(q.pid)
				n.scores.Busy(q.pid, w.e.wall().Add(w.cfg.Swarm.BusyBackoff))
				cb(false)
			})
			return
		}
		var size float64
		for _, b := range blocks {
			size += float64(w.im.blocks[b].ULen)
		}
		w.serve(q, n, size, nil, func() {
			q.uploaded += size
			w.st.peerDelivered += size
			w.release(q, rel)
			w.e.after(ow, func() {
				w.blockWork(n, size, func() {
					n.scores.End(q.pid)
					n.scores.Success(q.pid, 2*ow, len(blocks))
					for _, b := range blocks {
						w.acquire(n, b, true)
					}
					cb(true)
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

// release frees one of q's upload slots.
func (w *world) release(_ *simNode, rel func()) { rel() }

// originReq is an ORIGIN request in flight.
type originReq struct {
	done      bool
	cancelled bool
	flow      *flow
	rel       func()
	firstByte time.Duration // when the first answer arrives at the asker; 0: not yet known
}

// originRequest asks q, n's designated fetcher for blocks, to fetch what it
// does not hold through its origin and serve them (handleBlock with the
// ORIGIN flag, originFor, startOrigin): q joins the origin fetches it runs
// already, starts one for the rest if one of its MaxOriginFetches is free
// (else serves what it can join, NOT_FOUND for the rest, or BUSY if it can
// join nothing), waits for the blocks, then sends them if one of its
// upload slots is free, else answers COMING (they spread from it through
// the swarm; n awaits them). n gives up at deadline.
func (w *world) originRequest(n, q *simNode, blocks []uint32, deadline time.Duration, cb func(more, coming bool)) {
	r := &originReq{}
	n.scores.Begin(q.pid)
	ow := w.oneWay(n, q)
	end := func(more, coming bool) {
		if r.done {
			return
		}
		r.done = true
		n.scores.End(q.pid)
		cb(more, coming)
	}
	w.e.at(deadline, func() {
		if r.done {
			return
		}
		r.cancelled = true
		if r.flow != nil {
			w.net.cancel(r.flow)
			q.uploaded += r.flow.sent
			w.st.peerCancelled += r.flow.sent
			w.release(q, r.rel)
		}
		w.st.originTimeouts++
		if r.firstByte == 0 || r.firstByte > w.e.now {
			n.scores.Failure(q.pid, w.cfg.Swarm.FirstByteTimeout, w.e.wall())
		}
		end(false, false)
	})
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
							}
							end(true, false)
						})
					})
				})
			}
			spread := true
			for _, b := range blocks {
				if !p2p.OriginSpread(q.originCopies[b], w.cfg.Swarm.MaxUploadStreams) {
					spread = false
				}
			}
			if !spread {
				if rel, ok := q.slots.TryAcquire(); ok {
					for _, b := range blocks {
						q.originCopies[b]++
					}
					serve(rel)
					return
				}
			}
			w.st.comingAnswers++
			w.e.after(ow, func() {
				if !r.cancelled {
					end(true, true)
				}
			})
		})
	})
}
