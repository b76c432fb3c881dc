package simulation

import (
	"crypto/sha256"
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
	// im.id's origin group of each prefix of providers (originGroup).
	groups map[int][]peer.ID
	// blobIDs name the manifest and the index, for p2p.Designate.
	blobIDs [nBlobs]flat.BlockID
}

// counters are the run's totals.
type counters struct {
	registryMetaBytes, registryBlockBytes, registryLayerBytes float64
	blobsFromPeers                                            [nBlobs]int
	blobRequests, comingAnswers, awaitRounds                  int64
	spreadAnswers, forcedRequests, firstCopyPassed            int64
	hintsReceived                                             int64
	designatedOwn, fellThrough, awaitTimeouts                 int64
	blobDelivered                                             float64 // manifests and indexes sent by peers
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
	unreachable, originReplanned, notMember          int64
	designatedSlow, comingUndelivered                int64
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
	gone   bool // a member of the origin group that is gone (Config.Gone)
	left   bool // one that is up but not in the image's swarm (Config.Left)
	liar   bool // a byzantine member that answers ORIGIN requests COMING and sends nothing (Config.Liars)
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

	held         float64               // uncompressed bytes of the blocks it holds
	blocksUp     float64               // block bytes sent to peers (the upload share)
	originCopies map[uint32]int        // copies sent of each block (ORIGIN and plain answers)
	copiedTo     map[uint32][]int32    // the last p2p.MaxHints peers its copies of each block reached
	calls        map[uint32]*fetchCall // registry fetches ORIGIN requests wait for
	slotQueue    []slotWaiter          // ORIGIN first copies waiting for a slot
	viewDirty    bool                  // sessions changed since view was computed
	view         []peer.ID             // originView's last answer
	provided     bool                  // its image record is out (or on its way)
	joined       bool                  // it has the index and takes have sessions
	hasBlob      [nBlobs]bool          // holds the manifest, the index
	pool         []int32               // its lookup's providers
	group        []peer.ID             // the image's origin group, as it sees it
	conn         map[int32]bool        // peers it is connected to
	awaiters     []*awaiter            // FetchMany calls waiting for a holder to appear

	sessions   []int32 // peers that sent this node their have bitmap
	sessionSet map[int32]bool
	scores     *p2p.PeerScores
	notMembers map[peer.ID]time.Time     // peers that answered NOT_MEMBER, until (wall clock)
	slowUntil  map[peer.ID]time.Duration // designated fetchers whose dial outlasted DesignatedHedge, until it ends
	slots      *p2p.UploadSlots
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
	w := &world{cfg: cfg, e: e, im: newImage(cfg.Workload), byID: map[peer.ID]int32{}, net: &peerNet{e: e}, groups: map[int][]peer.ID{}}
	w.blobIDs[blobManifest] = w.im.id
	w.blobIDs[blobIndex] = sha256.Sum256([]byte("index of " + cfg.Workload.Trace.Image))
	w.swarm = cfg.Strategy == Swarm || cfg.Strategy == SwarmSeeded
	w.registry = newPSServer(e, cfg.RegistryBytesPerSec, cfg.NodeDownBytesPerSec)
	if cfg.HostCores > 0 {
		w.hostCPU = newPSServer(e, float64(cfg.HostCores), 1)
	}
	nb := len(w.im.blocks)
	firstAway := cfg.Nodes + cfg.Seeds // the gone, the left, then the lying members
	away := cfg.Gone + cfg.Left + cfg.Liars
	total := firstAway + away
	for i := range total {
		n := &simNode{
			i:            int32(i),
			pid:          peer.ID(fmt.Sprintf("sim-node-%06d", i)),
			zone:         i % cfg.Zones,
			rack:         (i / cfg.Zones) % cfg.RacksPerZone,
			seed:         i >= cfg.Nodes && i < cfg.Nodes+cfg.Seeds,
			gone:         i >= firstAway && i < firstAway+cfg.Gone,
			left:         i >= firstAway+cfg.Gone && i < firstAway+cfg.Gone+cfg.Left,
			liar:         i >= firstAway+cfg.Gone+cfg.Left,
			up:           link{capacity: cfg.NodeUpBytesPerSec},
			down:         link{capacity: cfg.NodeDownBytesPerSec},
			rng:          rand.New(rand.NewPCG(cfg.Seed, uint64(i))),
			have:         make([]bool, nb),
			visible:      make([]time.Duration, nb),
			pending:      make([]bool, nb),
			regBusy:      make([]bool, nb),
			waiters:      map[uint32][]func(){},
			conn:         map[int32]bool{},
			originCopies: map[uint32]int{},
			copiedTo:     map[uint32][]int32{},
			calls:        map[uint32]*fetchCall{},
			sessionSet:   map[int32]bool{},
			scores:       p2p.NewPeerScores(),
			slots:        p2p.NewUploadSlots(cfg.Swarm.MaxUploadStreams, cfg.Swarm.UploadStreamsPerPeer),
			originFree:   cfg.Swarm.MaxOriginFetches,
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
	}
	if away > 0 {
		ids := make([]peer.ID, firstAway)
		for i := range ids {
			ids[i] = w.nodes[i].pid
		}
		for j, id := range goneIDs(w.im.id, ids, away) {
			w.nodes[firstAway+j].pid = id
		}
	}
	for _, n := range w.nodes {
		w.byID[n.pid] = n.i
	}
	return w
}

// dialFail is how long n's dial to a gone node q takes to fail, for a
// caller that gives up after bound: one round trip (a reset) when
// GoneDial is zero, else GoneDial, at most bound.
func (w *world) dialFail(n, q *simNode, bound time.Duration) time.Duration {
	if w.cfg.GoneDial == 0 {
		return 2 * w.oneWay(n, q)
	}
	return min(w.cfg.GoneDial, bound)
}

// unreachable is p2p's markUnreachable: n could not connect to q, which
// it leaves out of origin designation for UnreachableRest.
func (w *world) unreachable(n, q *simNode) {
	w.st.unreachable++
	if !w.cfg.DesignateGone { // the daemon before did not mark them
		n.scores.Unreachable(q.pid, w.e.wall().Add(p2p.UnreachableRest))
	}
}

// notMember is markNotMember: q answered n NOT_MEMBER, and n leaves it out
// of the image's designation for NotMemberRest.
func (w *world) notMember(n, q *simNode) {
	w.st.notMember++
	if n.notMembers == nil {
		n.notMembers = map[peer.ID]time.Time{}
	}
	n.notMembers[q.pid] = w.e.wall().Add(p2p.NotMemberRest)
}

// isNotMember reports whether p answered n NOT_MEMBER within NotMemberRest.
func (w *world) isNotMember(n *simNode, p peer.ID) bool {
	until, ok := n.notMembers[p]
	return ok && w.e.wall().Before(until)
}

// away reports whether n is a member of the origin group that runs no part
// of the rollout: gone, left, or lying.
func (n *simNode) away() bool { return n.gone || n.left || n.liar }

// goneAll puts the gone and left nodes' records in the DHT before anybody
// else's: they provided the image before the rollout.
func (w *world) goneAll() {
	for _, n := range w.nodes {
		if n.away() {
			w.providers = append(w.providers, n.i)
		}
	}
}

// goneIDs returns k peer IDs that each rank before every one of ids in the
// image's origin group (p2p.OriginGroup): the gone and left nodes are
// members of the group whatever else the lookups find.
func goneIDs(image flat.BlockID, ids []peer.ID, k int) []peer.ID {
	if k == 0 {
		return nil
	}
	best := p2p.OriginGroup(image, ids, "", 1)
	var out []peer.ID
	for j := 0; len(out) < k; j++ {
		id := peer.ID(fmt.Sprintf("sim-gone-%08d", j))
		if g := p2p.OriginGroup(image, append([]peer.ID{id}, best...), "", 1); g[0] == id {
			out = append(out, id)
		}
	}
	return out
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
	// At the flush, the update reaches the session peers; those awaiting
	// the block (PeerSource.await) plan again when it arrives.
	w.e.at(n.visible[b], func() {
		for _, p := range n.sessions {
			if q := w.nodes[p]; len(q.awaiters) > 0 {
				w.e.after(w.oneWay(n, q), func() { w.wakeAwaiters(q) })
			}
		}
	})
	n.held += float64(blk.ULen)
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

// awaiter is a FetchMany call asleep in its await phase.
type awaiter struct {
	wake func()
	done bool
}

// wakeAwaiters wakes n's FetchMany calls waiting for a holder to appear,
// as the daemon's have handler does on any bitmap gain: each plans again.
func (w *world) wakeAwaiters(n *simNode) {
	ws := n.awaiters
	n.awaiters = nil
	for _, a := range ws {
		if !a.done {
			a.wake()
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
		w.fetchPeers(n, fresh, func(missing []uint32) {
			w.st.fellThrough += int64(len(missing))
			w.fetchRegistry(n, missing)
		})
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

// start runs a node: its daemon mounts the image, then the application
// replays the trace. Without the swarm the mount reads the manifest and the
// index from the registry. With it (fetch.OpenImage with the swarm as its
// manifest and index source, then JoinImage): a HEAD of the tag (no body),
// the image's record provided early and one lookup (lookup), the manifest
// and then the index from peers (blobFromPeers), then the have sessions
// (joinSessions).
func (w *world) start(n *simNode) {
	w.e.at(n.start+w.cfg.StartOverhead, func() {
		if w.cfg.Strategy == FullPull {
			w.fullPull(n)
			return
		}
		if !w.swarm {
			w.st.registryMetaBytes += float64(w.cfg.Workload.ManifestBytes)
			w.registryGet(float64(w.cfg.Workload.ManifestBytes), func() {
				w.indexFromRegistry(func() { w.mounted(n) })
			})
			return
		}
		w.registryGet(0, func() { // HEAD: the digest, no body
			w.lookup(n, func() {
				w.blobFromPeers(n, blobManifest, func() {
					w.blobFromPeers(n, blobIndex, func() {
						w.joinSessions(n, func() { w.mounted(n) })
					})
				})
			})
		})
	})
}

// designatedPeers is how many providers p2p.ImageBlob's designated fetcher
// asks once before the registry.
const designatedPeers = 3

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

// Image blobs a mount reads before its first block.
const (
	blobManifest = iota
	blobIndex
	nBlobs
)

// lookup is p2p.ImageBlob's first steps: the node starts providing the
// image's record (it lands after DHTHops round trips: provideEarly) and
// looks the image up (one round trip more); the lookup finds the records
// that have landed by then, up to DiscoveryPool of them, and the node
// computes the image's origin group from them (p2p.OriginGroup).
func (w *world) lookup(n *simNode, cb func()) {
	hop := w.cfg.RTTCross
	hops := time.Duration(w.cfg.DHTHops)
	w.provide(n)
	w.e.after((hops+1)*hop, func() {
		w.st.dhtLookups++
		var consumed int
		n.pool, consumed = w.pool(n)
		n.group = w.originGroup(n, consumed)
		cb()
	})
}

// provide puts n's image record out: lookups made once it has landed
// find n.
func (w *world) provide(n *simNode) {
	if n.provided {
		return
	}
	n.provided = true
	w.e.after(time.Duration(w.cfg.DHTHops)*w.cfg.RTTCross, func() { w.providers = append(w.providers, n.i) })
}

// pool is what one lookup returns: the providers whose records have landed,
// in the order they landed (kad-dht's answer order), up to DiscoveryPool,
// n itself left out; and how many of the landed records it went through.
// The what-if DHTRandomProviders has no pool limit.
func (w *world) pool(n *simNode) (pool []int32, consumed int) {
	limit := max(w.cfg.Swarm.DiscoveryPool, w.cfg.Swarm.MaxImagePeers)
	if w.cfg.DHTRandomProviders {
		limit = len(w.providers)
	}
	pool = make([]int32, 0, min(limit, len(w.providers)))
	for _, p := range w.providers {
		if len(pool) == limit {
			break
		}
		consumed++
		if p != n.i {
			pool = append(pool, p)
		}
	}
	return pool, consumed
}

// originGroup is p2p.OriginGroup over a pool that went through the first
// consumed landed records, and n: the group of a set is the group of (the
// group of a subset, plus the rest), so the group of each prefix of the
// landed records is computed once and n is added to it.
func (w *world) originGroup(n *simNode, consumed int) []peer.ID {
	g, ok := w.groups[consumed]
	if !ok {
		ids := make([]peer.ID, consumed)
		for i, p := range w.providers[:consumed] {
			ids[i] = w.nodes[p].pid
		}
		g = p2p.OriginGroup(w.im.id, ids, "", p2p.OriginGroupSize)
		w.groups[consumed] = g
	}
	return p2p.OriginGroup(w.im.id, g, n.pid, p2p.OriginGroupSize)
}

// originView is p2p's originView: OriginGroup over the lookup's group
// and the node's session peers (recomputed when the sessions changed).
func (w *world) originView(n *simNode) []peer.ID {
	if n.view == nil || n.viewDirty {
		ids := slices.Clone(n.group)
		for _, p := range n.sessions {
			ids = append(ids, w.nodes[p].pid)
		}
		n.view = p2p.OriginGroup(w.im.id, ids, n.pid, p2p.OriginGroupSize)
		n.viewDirty = false
	}
	return n.view
}

// blobFromPeers is p2p.ImageBlob for the manifest or the index: the blob's
// designated fetcher over the origin group (p2p.Designate) reads it from
// the registry; every other node asks the designated fetcher first, then
// MaxImagePeers providers sampled from its pool, one request at a time
// (a first request to a peer also connects); a holder with a free upload
// slot serves it, one without answers BUSY (and rests BusyBackoff), a
// node without it answers NOT_FOUND. After a pass with no success the
// node backs off (10 ms, doubling, at most 200 ms) and passes again, until
// OriginWait has passed; then the registry.
func (w *world) blobFromPeers(n *simNode, kind int, cb func()) {
	size := float64(w.cfg.Workload.ManifestBytes)
	if kind == blobIndex {
		size = float64(w.cfg.Workload.IndexBytes)
	}
	fromRegistry := func() {
		w.st.registryMetaBytes += size
		w.registryGet(size, func() {
			n.hasBlob[kind] = true
			cb()
		})
	}
	designee := func() peer.ID {
		return p2p.Designate(w.blobIDs[kind], p2p.LiveGroup(n.group, n.pid, w.down(n)), n.pid)
	}
	d := designee()
	designated := d == n.pid || d == ""
	if designated && len(n.pool) == 0 {
		fromRegistry()
		return
	}
	var cands []int32
	wait := w.cfg.Swarm.OriginWait
	if designated {
		// One quick pass over a few providers, then the registry.
		cands = p2p.SampleProviders(n.pool, designatedPeers, n.rng)
		wait = 0
	} else {
		first := w.byID[d]
		rest := make([]int32, 0, len(n.pool))
		for _, p := range n.pool {
			if p != first {
				rest = append(rest, p)
			}
		}
		cands = append([]int32{first}, p2p.SampleProviders(rest, w.cfg.Swarm.MaxImagePeers, n.rng)...)
	}
	start := w.e.now
	deadline := start + wait
	pass := 1
	backoff := 10 * time.Millisecond
	dropped := map[int32]bool{} // could not connect, or not a member: not asked again
	dSince := start             // when d became the designated fetcher (p2p.BlobGrace)
	var ask func(k int)
	// replace puts the next member of the group in the place (cands[i])
	// of the designated fetcher, as ImageBlob's replace does, and reports
	// whether cands[i] is to be asked now.
	replace := func(i int) bool {
		w.st.originReplanned++
		dSince = w.e.now
		if d = designee(); d == n.pid || d == "" {
			designated, wait, deadline = true, 0, w.e.now
			return false
		}
		cands[i] = w.byID[d]
		delete(dropped, cands[i])
		return true
	}
	// lost drops cands[i], found gone or not a member, and goes on with
	// the next candidate: the next member, if it was the designated
	// fetcher.
	lost := func(i, k int) {
		q := w.nodes[cands[i]]
		dropped[q.i] = true
		if q.pid == d && !designated && w.e.now < deadline && (w.down(n)(d) || !n.scores.Designatable(d, w.e.wall())) && replace(i) {
			ask(k)
			return
		}
		ask(k + 1)
	}
	ask = func(k int) {
		// ImageBlob's grace: a designated fetcher that delivered nothing,
		// nor anyone, within BlobGrace of becoming the designee is taken
		// for unreachable, and the next member takes its place.
		if k == 0 && !designated && !w.cfg.blobGraceOff() && wait > 0 && w.e.now-dSince >= p2p.BlobGrace(wait) && w.e.now < deadline {
			w.st.comingUndelivered++
			w.unreachable(n, w.nodes[w.byID[d]])
			if i := slices.Index(cands, w.byID[d]); i >= 0 {
				replace(i)
			}
		}
		if k == len(cands) {
			if !slices.ContainsFunc(cands, func(c int32) bool { return !dropped[c] }) {
				fromRegistry() // nobody left to ask
				return
			}
			pause := backoff
			backoff = min(2*backoff, 200*time.Millisecond)
			if w.e.now+pause >= deadline {
				w.e.at(max(deadline, w.e.now), fromRegistry)
				return
			}
			pass++
			w.e.after(pause, func() { ask(0) })
			return
		}
		if wait > 0 && w.e.now >= deadline {
			fromRegistry()
			return
		}
		i := k
		if pass > 1 && !designated {
			i = (k + 1) % len(cands) // the designated fetcher last
		}
		q := w.nodes[cands[i]]
		if dropped[q.i] || !n.scores.Usable(q.pid, w.e.wall()) {
			ask(k + 1)
			return
		}
		if q.gone {
			// The connect fails (at most DesignatedDial, dialHedged's
			// bound; the daemons before: 5 s for a provider that is not
			// the designated fetcher; and the wait bounds it).
			bound := 5 * time.Second
			if w.hedge() || q.pid == d && !designated && !w.cfg.DesignateGone {
				bound = p2p.DesignatedDial
			}
			fail := w.dialFail(n, q, bound)
			if w.hedge() && fail > p2p.DesignatedHedge {
				// dialHedged: the dial goes on in the background; the
				// pass goes on now (and if q was the designated fetcher,
				// the next member takes its place).
				dialEnd := w.e.now + fail
				w.e.after(fail, func() { w.unreachable(n, q) })
				w.e.after(min(p2p.DesignatedHedge, max(deadline-w.e.now, 0)), func() {
					w.slowDial(n, q, dialEnd)
					lost(i, k)
				})
				return
			}
			if wait > 0 {
				fail = min(fail, max(deadline-w.e.now, 0))
			}
			w.e.after(fail, func() {
				if wait == 0 || w.e.now < deadline {
					w.unreachable(n, q)
				}
				lost(i, k)
			})
			return
		}
		ow := w.oneWay(n, q)
		there := ow
		if !n.conn[q.i] {
			there += 6 * ow // TCP, noise, yamux: three round trips
			n.conn[q.i], q.conn[n.i] = true, true
		}
		w.st.blobRequests++
		w.e.after(there, func() {
			if q.left && !w.cfg.NotMemberOff {
				w.e.after(ow, func() {
					w.notMember(n, q)
					lost(i, k)
				})
				return
			}
			if !q.hasBlob[kind] {
				w.e.after(ow, func() { ask(k + 1) })
				return
			}
			rel, ok := q.slots.TryAcquire(n.pid) // blobs are not in the upload share
			if !ok {
				w.st.busyAnswers++
				w.e.after(ow, func() {
					n.scores.Busy(q.pid, w.e.wall().Add(w.cfg.Swarm.BusyBackoff))
					ask(k + 1)
				})
				return
			}
			w.serve(q, n, size, nil, func() {
				q.uploaded += size
				w.st.blobDelivered += size
				rel()
				w.e.after(ow, func() {
					w.st.blobsFromPeers[kind]++
					n.hasBlob[kind] = true
					cb()
				})
			})
		})
	}
	ask(0)
}

// joinSessions is JoinImage after the blobs: the node has the image (it
// accepts have sessions from now on) and opens sessions to MaxImagePeers
// providers sampled from the lookup's pool — reused if it found that many,
// else looked up again — and waits for their bitmaps.
func (w *world) joinSessions(n *simNode, cb func()) {
	n.joined = true
	sessions := func(pool []int32) {
		var ends []time.Duration // when each dial (and hello) ends
		for _, p := range p2p.SampleProviders(pool, w.cfg.Swarm.MaxImagePeers, n.rng) {
			q := w.nodes[p]
			if q.gone {
				// The connect fails (a dial that outlasts JoinImage's
				// wait goes on in the background).
				fail := w.dialFail(n, q, 5*time.Second)
				ends = append(ends, fail)
				w.e.after(fail, func() { w.unreachable(n, q) })
				continue
			}
			ow := w.oneWay(n, q)
			rtt := 2 * ow
			cost := rtt // the hellos
			if !n.conn[q.i] {
				cost += 3 * rtt
				n.conn[q.i], q.conn[n.i] = true, true
			}
			ends = append(ends, cost)
			if q.left || q.liar {
				continue // it resets the hello: not a member (a liar holds nothing to show)
			}
			w.e.after(cost, func() { w.session(n, q) })
		}
		w.e.after(w.joinWait(ends), cb)
	}
	if len(n.pool) >= w.cfg.Swarm.MaxImagePeers {
		sessions(n.pool) // the blob lookup's answer, reused
		return
	}
	w.e.after(time.Duration(w.cfg.DHTHops+1)*w.cfg.RTTCross, func() {
		w.st.dhtLookups++
		n.pool, _ = w.pool(n)
		sessions(n.pool)
	})
}

// joinWait is how long discover waits for dials that end after ends:
// for all of them, at most FirstByteTimeout, and once DesignatedHedge has
// passed, until half of them have ended. The what-ifs of the daemon
// before: DesignateGone waits for every dial, NoDesignatedHedge at most
// FirstByteTimeout.
func (w *world) joinWait(ends []time.Duration) time.Duration {
	if len(ends) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(ends))
	wait := s[len(s)-1]
	if w.cfg.DesignateGone {
		return wait
	}
	wait = min(wait, w.cfg.Swarm.FirstByteTimeout)
	if !w.hedge() {
		return wait
	}
	return min(wait, max(p2p.DesignatedHedge, s[len(s)-len(s)/2-1]))
}

// session opens a have session from n to q: q takes it if it has room,
// and answers with its own.
func (w *world) session(n, q *simNode) {
	maxRemotes := 2 * w.cfg.Swarm.MaxImagePeers
	if !q.joined || q.sessionSet[n.i] || len(q.sessions) >= maxRemotes {
		return // not joined yet: it resets the hello (it opens its own when it joins)
	}
	q.sessionSet[n.i] = true
	q.sessions = append(q.sessions, n.i)
	q.viewDirty = true
	q.scores.SetLabels(n.pid, n.labels.Zone, n.labels.Rack)
	if !n.sessionSet[q.i] && len(n.sessions) < maxRemotes {
		n.sessionSet[q.i] = true
		n.sessions = append(n.sessions, q.i)
		n.viewDirty = true
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
			n.held += float64(w.im.blocks[b].ULen)
		}
		n.hasBlob = [nBlobs]bool{true, true}
		n.joined, n.provided = true, true
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
