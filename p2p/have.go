package p2p

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

const (
	// keepAlive is how often an idle have session sends an empty update;
	// the receiver drops a session silent for three times as long.
	keepAlive = 15 * time.Second
	// helloTimeout bounds reading a hello and writing any have frame.
	helloTimeout = 10 * time.Second
	// sessionQueue is how many update frames may wait for a slow peer
	// before its session is dropped (it gets a full hello when it rejoins).
	sessionQueue = 64
	// reprovideInterval re-publishes image records well inside the DHT's
	// 48 h record lifetime.
	reprovideInterval = 12 * time.Hour
	// provideRetry is how soon a provide that failed is tried again (at the
	// next refresh after it).
	provideRetry = time.Minute
)

// swarm is the node's state for one joined image: its own have bitmap, the
// bitmaps its peers sent, and the sessions it sends its own updates on.
type swarm struct {
	digest string
	key    cid.Cid
	blocks []flat.Block
	pos    map[flat.BlockID]int
	tag    string // connection manager protection tag
	ctx    context.Context
	cancel context.CancelFunc

	// uploaded counts the bytes of the image's blocks sent to peers, for
	// the node's share of uploads (OverShare).
	uploaded atomic.Int64

	mu          sync.Mutex
	left        bool
	mine        bitmap
	heldBytes   int64                // uncompressed bytes of the blocks in mine
	dirty       map[int]struct{}     // positions changed since the last flush
	remotes     map[peer.ID]*remote  // peers' bitmaps, from their have streams
	out         map[peer.ID]*session // our have streams to peers; nil while opening
	changed     chan struct{}        // closed and replaced when remotes or out change
	lastProvide time.Time
	provideOK   bool
}

// remote is one peer's have state for an image, kept while its stream is.
type remote struct {
	st   network.Stream
	bits bitmap
}

// session is an outgoing have stream.
type session struct {
	st   network.Stream
	ch   chan []byte
	stop chan struct{}
	once sync.Once
}

func (se *session) close() { se.once.Do(func() { close(se.stop) }) }

// send queues a frame without blocking; a session that cannot keep up is
// closed.
func (se *session) send(frame []byte) {
	select {
	case se.ch <- frame:
	default:
		se.close()
	}
}

// notifyLocked wakes whoever waits on changed; s.mu must be held.
func (s *swarm) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// inTable reports whether every one of cids names a block of the image's
// block table (not its manifest or index blob).
func (s *swarm) inTable(cids [][]byte) bool {
	for _, c := range cids {
		id, ok := blockIDOf(c)
		if !ok {
			return false
		}
		if _, ok := s.pos[id]; !ok {
			return false
		}
	}
	return true
}

// rare reports whether one of cids (blocks of the image's table) is held
// by fewer than RareHolders of the node's image peers: a block still that
// rare is served even past the node's share of uploads, or a block whose
// few holders are all over their share would stop spreading (the
// simulator measured readers waiting out OriginWait for such blocks). A
// node with no image peers has no view to judge by: nothing is rare.
func (s *swarm) rare(cids [][]byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.remotes) == 0 {
		return false // no view of the swarm: nothing to judge by
	}
	for _, c := range cids {
		id, ok := blockIDOf(c)
		if !ok {
			continue
		}
		i, ok := s.pos[id]
		if !ok {
			continue
		}
		holders := 0
		for _, r := range s.remotes {
			if r.bits.has(i) {
				holders++
			}
		}
		if Rare(holders) {
			return true
		}
	}
	return false
}

// overShare reports whether the node has uploaded more than its share of
// the image (OverShare).
func (s *swarm) overShare(share float64) bool {
	s.mu.Lock()
	held := s.heldBytes
	s.mu.Unlock()
	return OverShare(s.uploaded.Load(), held, share)
}

// hasRemote reports whether p sent a have bitmap for the image.
func (s *swarm) hasRemote(p peer.ID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.remotes[p] != nil
}

func (s *swarm) peerCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.remotes)
}

func (s *swarm) provideDue(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.provideOK {
		return now.Sub(s.lastProvide) >= reprovideInterval
	}
	return now.Sub(s.lastProvide) >= provideRetry
}

func (n *Node) swarm(digest string) *swarm {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.swarms[digest]
}

func (n *Node) swarmList() []*swarm {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]*swarm, 0, len(n.swarms))
	for _, s := range n.swarms {
		out = append(out, s)
	}
	return out
}

// JoinImage makes the node a member of the image's swarm: it provides the
// image's DHT record (in the background), finds up to MaxImagePeers other
// providers with one DHT lookup, connects to them and exchanges have
// bitmaps, waiting up to FirstByteTimeout for their answers. index is the
// image's decoded index; its block table gives bitmap positions. The
// initial bitmap is what Config.Blocks holds (if it has Has). Joining an
// image already joined looks for peers again.
func (n *Node) JoinImage(ctx context.Context, digest string, index *flat.Index) error {
	key, err := ImageKey(digest)
	if err != nil {
		return err
	}
	if index == nil {
		return fmt.Errorf("join %s: no index", digest)
	}
	if len(index.Blocks) > maxBitmapBlocks {
		return fmt.Errorf("join %s: %d blocks, at most %d supported", digest, len(index.Blocks), maxBitmapBlocks)
	}
	s, created, err := n.addSwarm(digest, key, index)
	if err != nil {
		return err
	}
	if created {
		if h, ok := n.cfg.Blocks.(hasser); ok {
			held := 0
			for i, b := range s.blocks {
				if has, err := h.Has(ctx, b.ID); err == nil && has {
					s.mu.Lock()
					if s.mine.set(i, true) {
						s.heldBytes += int64(b.ULen)
					}
					s.mu.Unlock()
					held++
				}
			}
			n.log.Debug("joined image", "image", digest, "blocks", len(s.blocks), "held", held)
		}
		n.spawn(func() { n.provideImage(s.ctx, s) })
	}
	if len(n.host.Network().Peers()) == 0 {
		// Run may not have reached the bootstrap peers yet (or they were
		// down when it tried): without a peer there is nobody to ask.
		n.bootstrap(ctx)
	}
	n.waitRoutingTable(ctx, 2*time.Second)
	n.discover(ctx, s)
	return nil
}

func (n *Node) addSwarm(digest string, key cid.Cid, index *flat.Index) (*swarm, bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, false, ErrClosed
	}
	if s := n.swarms[digest]; s != nil {
		return s, false, nil
	}
	s := &swarm{
		digest:  digest,
		key:     key,
		blocks:  index.Blocks,
		pos:     make(map[flat.BlockID]int, len(index.Blocks)),
		tag:     fmt.Sprintf("shoal-image-%d-%s", n.swarmSeq.Add(1), digest),
		mine:    newBitmap(len(index.Blocks)),
		dirty:   map[int]struct{}{},
		remotes: map[peer.ID]*remote{},
		out:     map[peer.ID]*session{},
		changed: make(chan struct{}),
	}
	for i, b := range index.Blocks {
		if _, dup := s.pos[b.ID]; !dup {
			s.pos[b.ID] = i
		}
	}
	s.ctx, s.cancel = context.WithCancel(n.life)
	n.swarms[digest] = s
	return s, true, nil
}

// LeaveImage ends the node's membership of an image: its have sessions
// close, its origin (ServeOrigin) is forgotten, and its record is no
// longer re-provided. DHT records cannot be withdrawn: the record expires,
// and meanwhile a peer that still finds it is turned away at the hello,
// and answered NOT_MEMBER when it asks this node to fetch blocks of the
// image (or for blocks of it this node no longer holds).
func (n *Node) LeaveImage(digest string) {
	n.access.drop(digest)
	n.mu.Lock()
	s := n.swarms[digest]
	delete(n.swarms, digest)
	delete(n.origins, digest)
	delete(n.blobs, digest)
	if key, err := ImageKey(digest); err == nil {
		if e, ok := n.early[key.KeyString()]; ok {
			// Not opening it either: NOT_MEMBER from now on, until it
			// is opened again.
			e.opened = time.Time{}
			n.early[key.KeyString()] = e
		}
	}
	n.mu.Unlock()
	if s == nil {
		return
	}
	s.cancel()
	s.mu.Lock()
	s.left = true
	var streams []network.Stream
	for p, r := range s.remotes {
		streams = append(streams, r.st)
		n.host.ConnManager().Unprotect(p, s.tag)
	}
	clear(s.remotes)
	for _, se := range s.out {
		if se != nil {
			se.close()
		}
	}
	s.notifyLocked()
	s.mu.Unlock()
	for _, st := range streams {
		st.Reset()
	}
}

// provideImage publishes the image's provider record.
func (n *Node) provideImage(ctx context.Context, s *swarm) {
	if n.recentlyProvided(ctx, s.key) {
		// Provided early, when the node fetched the image's manifest or
		// index from peers (ImageBlob): one provide per start.
		s.mu.Lock()
		s.lastProvide, s.provideOK = time.Now(), true
		s.mu.Unlock()
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	start := time.Now()
	err := n.Provide(ctx, s.key)
	s.mu.Lock()
	s.lastProvide, s.provideOK = time.Now(), err == nil
	s.mu.Unlock()
	if err != nil {
		// The record is in the local store anyway: peers that ask this node
		// find it. Retried at the next refresh.
		n.log.Debug("provide image record", "image", s.digest, "err", err)
		return
	}
	n.log.Debug("provided image record", "image", s.digest, "took", time.Since(start))
}

// discover finds providers of the image, opens have sessions to those it
// has none with, and waits (up to FirstByteTimeout) for their bitmaps. It
// waits at most FirstByteTimeout for the dials too, and once
// DesignatedHedge has passed, only until half of them have ended: a
// provider that is gone at a silent address (a drained node whose record
// lives on) would hold a dial for its 5 s bound, and one in 32 sampled is
// common in a cluster that churns, while a dial within a data centre takes
// a few milliseconds. Dials still running then go on in the background,
// bounded by the swarm's life, and open their sessions when they connect.
func (n *Node) discover(ctx context.Context, s *swarm) {
	// A lookup made moments ago for the image's index (ImageIndex) is
	// reused if it found a full set: then a node start costs one lookup.
	provs, err := n.providers(ctx, s.key, n.cfg.MaxImagePeers)
	if err != nil {
		n.log.Debug("find image providers", "image", s.digest, "err", err)
	}
	provs = SampleProviders(provs, n.cfg.MaxImagePeers, rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())))
	var (
		mu     sync.Mutex
		opened []peer.ID
		left   = len(provs)
		dialed = make(chan struct{}) // closed when every dial has ended
		half   = make(chan struct{}) // closed when half of them have
		slots  = make(chan struct{}, 8)
	)
	if left == 0 {
		return
	}
	for _, ai := range provs {
		dial := func() {
			defer func() {
				mu.Lock()
				if left--; left == 0 {
					close(dialed)
				}
				if left == len(provs)/2 {
					close(half)
				}
				mu.Unlock()
			}()
			select {
			case slots <- struct{}{}:
			case <-s.ctx.Done():
				return
			}
			defer func() { <-slots }()
			if err := n.connect(s.ctx, ai); err != nil {
				n.log.Debug("connect to image provider", "image", s.digest, "peer", ai.ID.String(), "err", err)
				return
			}
			if ok, err := n.openSession(s.ctx, s, ai.ID); err != nil {
				n.log.Debug("open have session", "image", s.digest, "peer", ai.ID.String(), "err", err)
			} else if ok {
				mu.Lock()
				opened = append(opened, ai.ID)
				mu.Unlock()
			}
		}
		if !n.spawn(dial) {
			return // closing
		}
	}
	dt := time.NewTimer(n.cfg.FirstByteTimeout)
	ht := time.NewTimer(DesignatedHedge)
	var halfC <-chan struct{} // half, once DesignatedHedge has passed
	for wait := true; wait; {
		select {
		case <-ht.C:
			halfC = half
		case <-halfC:
			wait = false
		case <-dialed:
			wait = false
		case <-dt.C:
			wait = false
		case <-ctx.Done():
			wait = false
		}
	}
	dt.Stop()
	ht.Stop()
	// The sessions opened by now (dials still running append to opened
	// later, under mu: this is a copy).
	mu.Lock()
	waitFor := slices.Clone(opened)
	mu.Unlock()
	if len(waitFor) == 0 {
		return
	}
	// Wait for each peer's own hello, or for it to turn the session down.
	t := time.NewTimer(n.cfg.FirstByteTimeout)
	defer t.Stop()
	for {
		s.mu.Lock()
		waiting := 0
		for _, p := range waitFor {
			_, open := s.out[p]
			if s.remotes[p] == nil && open {
				waiting++
			}
		}
		ch := s.changed
		s.mu.Unlock()
		if waiting == 0 {
			return
		}
		select {
		case <-ch:
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// openSession opens a have stream to p for s and starts sending on it:
// the hello with the current bitmap, then the batched updates. It reports
// false if a session to p already exists.
func (n *Node) openSession(ctx context.Context, s *swarm, p peer.ID) (bool, error) {
	s.mu.Lock()
	if _, exists := s.out[p]; exists || s.left {
		s.mu.Unlock()
		return false, nil
	}
	s.out[p] = nil // opening
	s.mu.Unlock()
	abandon := func() {
		s.mu.Lock()
		if se, ok := s.out[p]; ok && se == nil {
			delete(s.out, p)
			s.notifyLocked()
		}
		s.mu.Unlock()
	}

	octx, cancel := context.WithTimeout(ctx, 5*time.Second)
	// A private image's bitmap goes only to a peer that proved it can
	// read the image (and its hello is taken only from one).
	_, err := n.prove(octx, p, s.digest)
	var st network.Stream
	if err == nil {
		st, err = n.host.NewStream(octx, p, ProtocolHave)
	}
	cancel()
	if err != nil {
		abandon()
		return false, err
	}
	se := &session{st: st, ch: make(chan []byte, sessionQueue), stop: make(chan struct{})}
	s.mu.Lock()
	if s.left {
		s.mu.Unlock()
		st.Reset()
		abandon()
		return false, nil
	}
	h := hello{image: s.digest, zone: n.cfg.Zone, rack: n.cfg.Rack, nblocks: len(s.blocks), bits: slices.Clone(s.mine)}
	s.out[p] = se
	s.mu.Unlock()
	first := appendFrame(nil, h.encode())
	if !n.spawn(func() { n.runSession(s, p, se, first) }) {
		st.Reset()
		abandon()
		return false, ErrClosed
	}
	return true, nil
}

// runSession writes the hello and then updates and keepalives on an
// outgoing have stream until the peer goes away, the image is left, or the
// node closes.
func (n *Node) runSession(s *swarm, p peer.ID, se *session, first []byte) {
	defer func() {
		se.close()
		se.st.Reset()
		s.mu.Lock()
		if s.out[p] == se {
			delete(s.out, p)
			s.notifyLocked()
		}
		s.mu.Unlock()
	}()
	// The peer never writes on this stream: a read returns when it resets
	// or closes it, which ends the session at once rather than at the next
	// write.
	gone := make(chan struct{})
	if !n.spawn(func() {
		defer close(gone)
		var b [1]byte
		_, _ = se.st.Read(b[:]) // a byte from the peer breaks the protocol: end too
		se.close()
	}) {
		return
	}
	defer func() { se.st.Reset(); <-gone }()

	write := func(frame []byte) bool {
		_ = se.st.SetWriteDeadline(time.Now().Add(helloTimeout))
		_, err := se.st.Write(frame)
		return err == nil
	}
	if !write(first) {
		return
	}
	keep := time.NewTicker(keepAlive)
	defer keep.Stop()
	keepFrame := appendFrame(nil, (&update{}).encode())
	for {
		select {
		case <-se.stop:
			return
		case <-s.ctx.Done():
			return
		case f := <-se.ch:
			if !write(f) {
				return
			}
			n.st.updatesSent.Add(1)
		case <-keep.C:
			if !write(keepFrame) {
				return
			}
		}
	}
}

// handleHave serves an incoming have stream: the peer's hello, then its
// updates, kept as its bitmap for the image until the stream ends.
func (n *Node) handleHave(st network.Stream) {
	if !n.enter() {
		st.Reset()
		return
	}
	defer n.wg.Done()
	p := st.Conn().RemotePeer()
	r := bufio.NewReaderSize(st, 4096)
	_ = st.SetReadDeadline(time.Now().Add(helloTimeout))
	payload, err := readFrame(r, maxHelloFrame, nil)
	if err != nil {
		st.Reset()
		return
	}
	h, err := decodeHello(payload)
	if err != nil {
		n.log.Debug("bad have hello", "peer", p.String(), "err", err)
		st.Reset()
		return
	}
	s := n.swarm(h.image)
	if s == nil || h.nblocks != len(s.blocks) {
		st.Reset() // not joined (or a different index): not a peer of ours
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, accessTimeout)
	ok := n.admitted(ctx, p, h.image)
	cancel()
	if !ok {
		st.Reset() // a private image, and no proof of access from p
		return
	}
	n.peers.setLabels(p, h.zone, h.rack)
	rm := &remote{st: st, bits: h.bits}
	s.mu.Lock()
	if s.left || (s.remotes[p] == nil && len(s.remotes) >= 2*n.cfg.MaxImagePeers) {
		s.mu.Unlock()
		st.Reset()
		return
	}
	old := s.remotes[p]
	s.remotes[p] = rm
	_, haveOut := s.out[p]
	s.notifyLocked()
	s.mu.Unlock()
	if old != nil {
		old.st.Reset()
	}
	n.host.ConnManager().Protect(p, s.tag)
	defer func() {
		s.mu.Lock()
		if s.remotes[p] == rm {
			delete(s.remotes, p)
			n.host.ConnManager().Unprotect(p, s.tag)
			s.notifyLocked()
		}
		s.mu.Unlock()
		st.Reset()
	}()
	if !haveOut {
		// A peer that found us: tell it what we hold.
		n.spawn(func() {
			ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
			defer cancel()
			if _, err := n.openSession(ctx, s, p); err != nil {
				n.log.Debug("open have session back", "image", s.digest, "peer", p.String(), "err", err)
			}
		})
	}

	var buf []byte
	for {
		_ = st.SetReadDeadline(time.Now().Add(3 * keepAlive))
		payload, err := readFrame(r, maxUpdateFrame, buf)
		if err != nil {
			return
		}
		buf = payload[:0]
		u, err := decodeUpdate(payload, len(s.blocks))
		if err != nil {
			n.log.Debug("bad have update", "peer", p.String(), "err", err)
			return
		}
		if len(u.set) == 0 && len(u.clear) == 0 {
			continue
		}
		s.mu.Lock()
		for _, i := range u.set {
			rm.bits.set(i, true)
		}
		for _, i := range u.clear {
			rm.bits.set(i, false)
		}
		if len(u.set) > 0 {
			s.notifyLocked() // a reader awaiting a block may find it here
		}
		s.mu.Unlock()
	}
}

// enter registers a handler goroutine with the node's wait group; it
// reports false once the node is closed.
func (n *Node) enter() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Add(1)
	return true
}

// flush sends the changes to every joined image's bitmap since the last
// flush to the image's peers, batched into update frames.
func (n *Node) flush() {
	for _, s := range n.swarmList() {
		s.mu.Lock()
		if len(s.dirty) == 0 {
			s.mu.Unlock()
			continue
		}
		var sessions []*session
		for _, se := range s.out {
			if se != nil {
				sessions = append(sessions, se)
			}
		}
		var frames [][]byte
		if len(sessions) > 0 {
			pos := make([]int, 0, len(s.dirty))
			for i := range s.dirty {
				pos = append(pos, i)
			}
			slices.Sort(pos)
			for len(pos) > 0 {
				chunk := pos[:min(len(pos), maxUpdateCount)]
				pos = pos[len(chunk):]
				var u update
				for _, i := range chunk {
					if s.mine.has(i) {
						u.set = append(u.set, i)
					} else {
						u.clear = append(u.clear, i)
					}
				}
				frames = append(frames, appendFrame(nil, u.encode()))
			}
		}
		// With no session the changes need not be kept: a session opened
		// later starts with a hello carrying the whole bitmap.
		clear(s.dirty)
		s.mu.Unlock()
		for _, f := range frames {
			for _, se := range sessions {
				se.send(f)
			}
		}
	}
}

// Announce records that the node now holds the blocks (verified and
// stored) and queues the news for the peers of every joined image that
// contains them; it goes out within AnnounceInterval. Call it after a
// successful Put. It does not block.
func (n *Node) Announce(ids ...flat.BlockID) { n.mark(ids, true) }

// Withdraw records that the node no longer holds the blocks, for example
// from blockstore.WithOnEvict, and queues the news like Announce. It does
// not block.
func (n *Node) Withdraw(ids ...flat.BlockID) { n.mark(ids, false) }

func (n *Node) mark(ids []flat.BlockID, held bool) {
	for _, s := range n.swarmList() {
		s.mu.Lock()
		for _, id := range ids {
			if i, ok := s.pos[id]; ok && s.mine.set(i, held) {
				s.dirty[i] = struct{}{}
				if held {
					s.heldBytes += int64(s.blocks[i].ULen)
				} else {
					s.heldBytes -= int64(s.blocks[i].ULen)
				}
			}
		}
		s.mu.Unlock()
	}
}

// Holders returns the peers whose have bitmap for the image says they hold
// the block at position pos of its block table.
func (n *Node) Holders(digest string, pos int) []peer.ID {
	s := n.swarm(digest)
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []peer.ID
	for p, r := range s.remotes {
		if r.bits.has(pos) {
			out = append(out, p)
		}
	}
	return out
}

// ImagePeers returns the peers that sent the node a have bitmap for the
// image: the image's swarm as this node sees it.
func (n *Node) ImagePeers(digest string) []peer.ID {
	s := n.swarm(digest)
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]peer.ID, 0, len(s.remotes))
	for p := range s.remotes {
		out = append(out, p)
	}
	return out
}

// holders returns the peers that hold block id in any joined image's
// bitmap: a block shared by two versions of an image can come from peers
// of either.
func (n *Node) holders(id flat.BlockID) []peer.ID {
	var out []peer.ID
	for _, s := range n.swarmList() {
		i, ok := s.pos[id]
		if !ok {
			continue
		}
		s.mu.Lock()
		for p, r := range s.remotes {
			if r.bits.has(i) && !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
		s.mu.Unlock()
	}
	return out
}

// forget clears block id from p's bitmaps: p said NOT_FOUND, so its
// bitmap was stale (it evicted the block and its withdrawal is in flight).
func (n *Node) forget(p peer.ID, id flat.BlockID) {
	for _, s := range n.swarmList() {
		i, ok := s.pos[id]
		if !ok {
			continue
		}
		s.mu.Lock()
		if r := s.remotes[p]; r != nil {
			r.bits.set(i, false)
		}
		s.mu.Unlock()
	}
}
