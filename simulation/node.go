package simulation

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/p2p"
	"github.com/shoal-project/shoal/seeder"
)

// world is one simulated rollout.
type world struct {
	cfg      Config
	e        *engine
	im       *image
	nodes    []*simNode
	byID     map[peer.ID]int32
	registry *psServer
	hostCPU  *psServer
	net      *peerNet
	// providers are the nodes whose image record a lookup finds, in the
	// order their provide completed.
	providers []int32
	swarm     bool
	st        counters
}

// counters are the run's totals.
type counters struct {
	registryMetaBytes, registryBlockBytes, registryLayerBytes float64
	indexesFromPeers                                          int
	registryRequests                                          int64
	peerRequests, busyAnswers                                 int64
	originAsks, originBusy, originTimeouts, originBlocks      int64
	hedgesDue                                                 int64
	duplicateBytes                                            float64
	// Peer bytes: delivered by finished transfers, and sent by transfers
	// cancelled (an ORIGIN request given up at its deadline).
	peerDelivered, peerCancelled float64
	// peerDiscarded were delivered to an ORIGIN request given up before
	// they were verified; dupPeer and dupRegistry arrived for blocks the
	// node held already; registryRaw is the uncompressed size of every
	// block fetched from the registry.
	peerDiscarded, dupPeer, dupRegistry, registryRaw float64
	dhtLookups                                       int64
}

// simNode is one node: its daemon's state (cache, have bitmap, sessions,
// peer scores, upload slots, origin fetches) and its replayed application.
type simNode struct {
	i      int32
	pid    peer.ID
	zone   int
	rack   int
	labels p2p.Labels
	seed   bool
	start  time.Duration
	up     link
	down   link
	cpu    *psServer
	rng    *rand.Rand

	have    []bool
	visible []time.Duration // when peers may see the block in its have bitmap
	pending []bool          // a fetch call of this node owns the block
	regBusy []bool          // a registry fetch of the block is in flight
	waiters map[uint32][]func()

	sessions   []int32 // peers that sent this node their have bitmap
	sessionSet map[int32]bool
	scores     *p2p.PeerScores
	slots      *p2p.UploadSlots
	slotQueue  []func(release func())
	originFree int
	phase      time.Duration // of the announce ticker

	unpackQueue []float64
	unpacking   bool

	ready                     time.Duration
	readyOK                   bool
	fromPeers, fromRegistry   float64 // uncompressed block bytes
	registryWire, uploaded    float64
	peerReqs, registryReqs    int64
	prefetchNext, prefetching int
}

func newWorld(cfg Config) *world {
	e := &engine{}
	w := &world{cfg: cfg, e: e, im: newImage(cfg.Workload), byID: map[peer.ID]int32{}, net: &peerNet{e: e}}
	w.swarm = cfg.Strategy == Swarm || cfg.Strategy == SwarmSeeded
	w.registry = newPSServer(e, cfg.RegistryBytesPerSec, cfg.NodeDownBytesPerSec)
	if cfg.HostCores > 0 {
		w.hostCPU = newPSServer(e, float64(cfg.HostCores), 1)
	}
	nb := len(w.im.blocks)
	total := cfg.Nodes + cfg.Seeds
	for i := range total {
		n := &simNode{
			i:          int32(i),
			pid:        peer.ID(fmt.Sprintf("sim-node-%06d", i)),
			zone:       i % cfg.Zones,
			rack:       (i / cfg.Zones) % cfg.RacksPerZone,
			seed:       i >= cfg.Nodes,
			up:         link{capacity: cfg.NodeUpBytesPerSec},
			down:       link{capacity: cfg.NodeDownBytesPerSec},
			rng:        rand.New(rand.NewPCG(cfg.Seed, uint64(i))),
			have:       make([]bool, nb),
			visible:    make([]time.Duration, nb),
			pending:    make([]bool, nb),
			regBusy:    make([]bool, nb),
			waiters:    map[uint32][]func(){},
			sessionSet: map[int32]bool{},
			scores:     p2p.NewPeerScores(),
			slots:      p2p.NewUploadSlots(cfg.Swarm.MaxUploadStreams),
			originFree: cfg.Swarm.MaxOriginFetches,
		}
		n.labels = p2p.Labels{Zone: fmt.Sprintf("z%d", n.zone), Rack: fmt.Sprintf("r%d", n.rack)}
		n.phase = time.Duration(n.rng.Int64N(int64(cfg.Swarm.AnnounceInterval)))
		if w.hostCPU != nil {
			n.cpu = w.hostCPU
		} else {
			n.cpu = newPSServer(e, float64(cfg.NodeCores), 1)
		}
		if !n.seed && cfg.Waves > 1 {
			n.start = time.Duration(i*cfg.Waves/cfg.Nodes) * cfg.WaveInterval
		}
		w.nodes = append(w.nodes, n)
		w.byID[n.pid] = n.i
	}
	return w
}

// oneWay is the one-way delay between two nodes.
func (w *world) oneWay(a, b *simNode) time.Duration {
	switch {
	case a.zone == b.zone && a.rack == b.rack:
		return w.cfg.RTTRack / 2
	case a.zone == b.zone:
		return w.cfg.RTTZone / 2
	default:
		return w.cfg.RTTCross / 2
	}
}

// work runs d of one core's time on n's CPU, then cb.
func (w *world) work(n *simNode, d time.Duration, cb func()) {
	if d <= 0 {
		cb()
		return
	}
	n.cpu.add(d.Seconds(), cb)
}

// blockWork is the CPU a node spends on bytes of fetched blocks.
func (w *world) blockWork(n *simNode, bytes float64, cb func()) {
	w.work(n, time.Duration(float64(w.cfg.BlockCPU)*bytes/float64(w.cfg.BlockCPUBytes)), cb)
}

// nextFlush is when a block n acquires now reaches its peers' view: the
// next tick of n's announce ticker.
func (w *world) nextFlush(n *simNode) time.Duration {
	iv := w.cfg.Swarm.AnnounceInterval
	t := w.e.now - n.phase
	k := t / iv
	if t%iv != 0 || t < 0 {
		k++
	}
	return n.phase + k*iv
}

// acquire stores a verified block in n's cache, announces it, and wakes
// what waits for it.
func (w *world) acquire(n *simNode, b uint32, fromPeer bool) {
	blk := &w.im.blocks[b]
	if n.have[b] {
		w.st.duplicateBytes += float64(blk.ULen)
		if fromPeer {
			w.st.dupPeer += float64(blk.ULen)
		} else {
			w.st.dupRegistry += float64(blk.ULen)
		}
		return
	}
	n.have[b] = true
	n.pending[b] = false
	n.visible[b] = w.nextFlush(n)
	if fromPeer {
		n.fromPeers += float64(blk.ULen)
	} else {
		n.fromRegistry += float64(blk.ULen)
	}
	if ws := n.waiters[b]; ws != nil {
		delete(n.waiters, b)
		for _, f := range ws {
			f()
		}
	}
}

// onHave runs cb once n holds every one of blocks.
func (w *world) onHave(n *simNode, blocks []uint32, cb func()) {
	left := 0
	for _, b := range blocks {
		if !n.have[b] {
			left++
		}
	}
	if left == 0 {
		cb()
		return
	}
	dec := func() {
		left--
		if left == 0 {
			cb()
		}
	}
	for _, b := range blocks {
		if !n.have[b] {
			n.waiters[b] = append(n.waiters[b], dec)
		}
	}
}

// want is the node's fetch chain (cache → peers → registry) as a reader
// sees it: cb runs once every block is in the cache. Blocks another call
// is fetching are waited for (singleflight); the others are fetched.
func (w *world) want(n *simNode, blocks []uint32, cb func()) {
	var fresh []uint32
	for _, b := range blocks {
		if !n.have[b] && !n.pending[b] {
			n.pending[b] = true
			fresh = append(fresh, b)
		}
	}
	w.onHave(n, blocks, cb)
	if len(fresh) == 0 {
		return
	}
	if w.swarm {
		w.fetchPeers(n, fresh, func(missing []uint32) { w.fetchRegistry(n, missing) })
		return
	}
	w.fetchRegistry(n, fresh)
}

// registryParallel is the merged range requests one fetch runs at once
// (fetch.DefaultParallel).
const registryParallel = 4

// registryMaxRequest caps one merged range request (fetch.DefaultMaxRequestSize).
const registryMaxRequest = 8 << 20

// fetchRegistry fetches blocks from the registry through n's registry
// chain, which both its reads and its origin fetches for peers go through:
// blocks it is fetching already are joined, the others merged into range
// requests of adjacent blocks.
func (w *world) fetchRegistry(n *simNode, blocks []uint32) {
	var fresh []uint32
	for _, b := range blocks {
		if !n.have[b] && !n.regBusy[b] {
			n.regBusy[b] = true
			fresh = append(fresh, b)
		}
	}
	if len(fresh) == 0 {
		return
	}
	slices.Sort(fresh)
	var spans [][]uint32
	var size uint64
	for i, b := range fresh {
		c := uint64(w.im.blocks[b].CLen)
		if i == 0 || b != fresh[i-1]+1 || size+c > registryMaxRequest {
			spans = append(spans, nil)
			size = 0
		}
		spans[len(spans)-1] = append(spans[len(spans)-1], b)
		size += c
	}
	var next func()
	next = func() {
		if len(spans) == 0 {
			return
		}
		s := spans[0]
		spans = spans[1:]
		var stored, raw float64
		for _, b := range s {
			stored += float64(w.im.blocks[b].CLen)
			raw += float64(w.im.blocks[b].ULen)
		}
		w.st.registryBlockBytes += stored
		w.st.registryRaw += raw
		n.registryWire += stored
		n.registryReqs++
		w.registryGet(stored, func() {
			next()
			w.blockWork(n, raw, func() {
				for _, b := range s {
					n.regBusy[b] = false
					w.acquire(n, b, false)
				}
			})
		})
	}
	for range min(registryParallel, len(spans)) {
		next()
	}
}

// registryGet is one request to the registry for bytes; cb runs when the
// last byte has arrived.
func (w *world) registryGet(bytes float64, cb func()) {
	w.st.registryRequests++
	half := w.cfg.RTTRegistry / 2
	w.e.after(half+w.cfg.RegistryRequestTime, func() {
		w.registry.add(bytes, func() { w.e.after(half, cb) })
	})
}

// start runs a node: its daemon mounts the image (the manifest from the
// registry; with the swarm, the index from a peer when the lookup finds one,
// then the join; without, the index from the registry), then the
// application replays the trace.
func (w *world) start(n *simNode) {
	w.e.at(n.start+w.cfg.StartOverhead, func() {
		if w.cfg.Strategy == FullPull {
			w.fullPull(n)
			return
		}
		w.st.registryMetaBytes += float64(w.cfg.Workload.ManifestBytes)
		w.registryGet(float64(w.cfg.Workload.ManifestBytes), func() {
			if w.swarm {
				w.join(n, func() { w.mounted(n) })
				return
			}
			w.indexFromRegistry(func() { w.mounted(n) })
		})
	})
}

func (w *world) indexFromRegistry(cb func()) {
	w.st.registryMetaBytes += float64(w.cfg.Workload.IndexBytes)
	w.registryGet(float64(w.cfg.Workload.IndexBytes), cb)
}

// mounted starts the application and the background prefetch.
func (w *world) mounted(n *simNode) {
	w.app(n, 0)
	if w.cfg.Prefetch != 0 {
		w.prefetch(n)
	}
}

// app replays read k and the ones after it; the node is ready when the
// last read is served.
func (w *world) app(n *simNode, k int) {
	if k == len(w.im.reads) {
		n.ready, n.readyOK = w.e.now-n.start, true
		return
	}
	r := w.im.reads[k]
	w.work(n, r.think, func() {
		w.want(n, r.blocks, func() { w.app(n, k+1) })
	})
}

// prefetchBatch is the blocks one prefetch call asks for.
const prefetchBatch = 8

// prefetch fills the cache in seeder.Order, up to cfg.Prefetch blocks,
// with at most cfg.PrefetchWindow calls in flight.
func (w *world) prefetch(n *simNode) {
	order, _ := seeder.Order(w.cfg.Workload.Trace, len(w.im.blocks))
	limit := len(order)
	if w.cfg.Prefetch > 0 {
		limit = min(limit, w.cfg.Prefetch)
	}
	var fill func()
	fill = func() {
		for n.prefetching < w.cfg.PrefetchWindow && n.prefetchNext < limit {
			var batch []uint32
			for n.prefetchNext < limit && len(batch) < prefetchBatch {
				b := order[n.prefetchNext]
				n.prefetchNext++
				if !n.have[b] && !n.pending[b] {
					batch = append(batch, b)
				}
			}
			if len(batch) == 0 {
				continue
			}
			n.prefetching++
			w.want(n, batch, func() { n.prefetching--; fill() })
		}
	}
	fill()
}

// fullPull: the node pulls the source image's layers (in 8 MiB pieces,
// unpacked as they arrive, one piece at a time), then runs the application
// with every block local.
func (w *world) fullPull(n *simNode) {
	total := float64(w.cfg.Workload.SourceLayerBytes)
	image := float64(w.cfg.Workload.Trace.ImageBytes)
	const piece = 8 << 20
	pieces := max(1, int((total+piece-1)/piece))
	left := pieces
	var unpack func()
	unpack = func() {
		if n.unpacking || len(n.unpackQueue) == 0 {
			return
		}
		n.unpacking = true
		sz := n.unpackQueue[0]
		n.unpackQueue = n.unpackQueue[1:]
		d := time.Duration(float64(w.cfg.UnpackCPU) * sz / (1 << 20))
		w.work(n, d, func() {
			n.unpacking = false
			left--
			if left == 0 {
				for b := range n.have {
					n.have[b] = true
				}
				w.app(n, 0)
				return
			}
			unpack()
		})
	}
	var get func(k int)
	get = func(k int) {
		if k == pieces {
			return
		}
		sz := min(float64(piece), total-float64(k)*piece)
		w.st.registryLayerBytes += sz
		n.registryWire += sz
		n.registryReqs++
		w.registryGet(sz, func() {
			n.unpackQueue = append(n.unpackQueue, image*sz/total)
			unpack()
			get(k + 1)
		})
	}
	get(0)
}

// join is the swarm's part of a mount: one lookup finds the image's
// providers (p2p.ImageIndex's, which JoinImage's discovery reuses); the
// index comes from one of them (a random one of the sample, as ImageIndex
// tries them), or from the registry when there is none; then JoinImage
// provides the image's record and opens have sessions to up to
// MaxImagePeers providers and waits for their bitmaps. Sessions are mutual;
// a node takes at most twice MaxImagePeers.
func (w *world) join(n *simNode, cb func()) {
	hop := w.cfg.RTTCross
	hops := time.Duration(w.cfg.DHTHops)
	w.e.after((hops+1)*hop, func() {
		w.st.dhtLookups++
		found := w.sampleProviders(n, w.cfg.Swarm.MaxImagePeers)
		sessions := func(found []int32) {
			var wait time.Duration
			for _, p := range found {
				q := w.nodes[p]
				rtt := 2 * w.oneWay(n, q)
				wait = max(wait, 3*rtt) // connect (TCP, noise, yamux), then the hellos
				w.e.after(3*rtt, func() { w.session(n, q) })
			}
			w.e.after(wait, cb)
		}
		joined := func() {
			w.e.after(hops*hop, func() { w.providers = append(w.providers, n.i) })
			if len(found) >= w.cfg.Swarm.MaxImagePeers {
				sessions(found) // the index lookup's answer, reused
				return
			}
			// A short answer is not reused: discovery looks again,
			// after its own provide has started.
			w.e.after((hops+1)*hop, func() {
				w.st.dhtLookups++
				sessions(w.sampleProviders(n, w.cfg.Swarm.MaxImagePeers))
			})
		}
		w.indexFromPeers(n, found, 0, joined)
	})
}

// indexPeers is how many providers p2p.ImageIndex asks before the registry.
const indexPeers = 3

// indexFromPeers is p2p.ImageIndex: the index from the k-th of the sampled
// providers, which serves it in an upload slot or answers BUSY (then the
// next is asked); after indexPeers refusals, or with no provider, the
// registry.
func (w *world) indexFromPeers(n *simNode, found []int32, k int, cb func()) {
	if k >= min(len(found), indexPeers) {
		w.indexFromRegistry(cb)
		return
	}
	q := w.nodes[found[k]]
	ow := w.oneWay(n, q)
	// Connect (TCP, noise, yamux) and send the request.
	w.e.after(5*ow, func() {
		rel, ok := q.slots.TryAcquire()
		if !ok {
			w.st.busyAnswers++
			w.e.after(ow, func() { w.indexFromPeers(n, found, k+1, cb) })
			return
		}
		w.st.indexesFromPeers++
		w.serve(q, n, float64(w.cfg.Workload.IndexBytes), nil, func() {
			w.release(q, rel)
			w.e.after(ow, cb)
		})
	})
}

// sampleProviders is what discovery returns: kad-dht hands out a key's
// providers in the order their records arrived (the provider set appends),
// and FindProvidersAsync stops at the limit, so one lookup collects the
// earliest DiscoveryPool providers; the daemon then keeps a random sample
// of k of them (p2p.SampleProviders). n itself is left out. The what-if
// DHTRandomProviders samples from all providers instead.
func (w *world) sampleProviders(n *simNode, k int) []int32 {
	pool := make([]int32, 0, w.cfg.Swarm.DiscoveryPool)
	if w.cfg.DHTRandomProviders && len(w.providers) > k+1 {
		picked := map[int32]bool{n.i: true}
		var out []int32
		for len(out) < k {
			p := w.providers[n.rng.IntN(len(w.providers))]
			if !picked[p] {
				picked[p] = true
				out = append(out, p)
			}
		}
		return out
	}
	for _, p := range w.providers {
		if len(pool) == max(w.cfg.Swarm.DiscoveryPool, k) {
			break
		}
		if p != n.i {
			pool = append(pool, p)
		}
	}
	return p2p.SampleProviders(pool, k, n.rng)
}

// session opens a have session from n to q: q takes it if it has room,
// and answers with its own.
func (w *world) session(n, q *simNode) {
	maxRemotes := 2 * w.cfg.Swarm.MaxImagePeers
	if q.sessionSet[n.i] || len(q.sessions) >= maxRemotes {
		return
	}
	q.sessionSet[n.i] = true
	q.sessions = append(q.sessions, n.i)
	q.scores.SetLabels(n.pid, n.labels.Zone, n.labels.Rack)
	if !n.sessionSet[q.i] && len(n.sessions) < maxRemotes {
		n.sessionSet[q.i] = true
		n.sessions = append(n.sessions, q.i)
		n.scores.SetLabels(q.pid, q.labels.Zone, q.labels.Rack)
	}
}

// seedAll makes the seeds hold every block, visible to peers from the
// start, provided in the DHT, and in session with each other.
func (w *world) seedAll() {
	for _, n := range w.nodes {
		if !n.seed {
			continue
		}
		for b := range n.have {
			n.have[b] = true
			n.visible[b] = -time.Hour
		}
		w.providers = append(w.providers, n.i)
		for _, q := range w.nodes {
			if q.seed && q != n {
				w.session(n, q)
			}
		}
	}
}

// blocksOf returns the table entries of positions.
func (w *world) blocksOf(bs []uint32) []flat.Block {
	out := make([]flat.Block, len(bs))
	for i, b := range bs {
		out[i] = w.im.blocks[b]
	}
	return out
}

// positions maps blocks back to table positions.
func (w *world) positions(bs []flat.Block, pos map[flat.BlockID]uint32) []uint32 {
	out := make([]uint32, len(bs))
	for i, b := range bs {
		out[i] = pos[b.ID]
	}
	return out
}
