package p2p

import (
	"context"
	"slices"
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// OriginFetcher fetches blocks of an image from their origin, the
// registry: for peers that asked this node with the ORIGIN flag, as the
// blocks' designated fetcher, and for the blocks this node is designated
// for itself. FetchOrigin returns the verified, uncompressed bytes of as
// many of blocks as it can (slices the node may keep and share), and an
// error for the rest.
//
// It must share its fetches and its cache with the source that follows
// PeerSource in the node's fetch chains: the node starts the fetch of the
// blocks it is designated for through it, and leaves them to that source,
// which must join the fetch rather than start another. The daemon hands it,
// per image, a fetch.Chain over the block cache (announcing what it
// stores) and the registry alone — the same chain every fetch chain of the
// image has as its registry source. It must not go through a chain that
// has this node's PeerSource: that chain is waiting on PeerSource when
// FetchOrigin is called, and the call would wait on itself.
type OriginFetcher interface {
	FetchOrigin(ctx context.Context, image string, blocks []flat.Block) (map[flat.BlockID][]byte, error)
}

// ImageFetcher fetches blocks of one image; *fetch.Chain satisfies it. It
// is an alias of an unnamed interface so that packages that must not
// import p2p can name the same type.
type ImageFetcher = interface {
	FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error)
}

// ServeOrigin makes f the origin of image's blocks for this node, unless
// it has one already, and returns the one it has: f, or the earlier one.
// The caller should read through the returned one in f's place, so that
// every chain of the image shares one origin and its in-flight fetches.
// The origin is what the node fetches blocks through for peers that ask it
// as their designated fetcher, and for the blocks it is designated for
// itself, when Config.Origin is nil. The contract of OriginFetcher
// applies: it must share its fetches with the registry source of the
// node's chains for the image, and must not be a chain that has this
// node's PeerSource. A nil f removes the image's origin; so does
// LeaveImage.
func (n *Node) ServeOrigin(image string, f ImageFetcher) ImageFetcher {
	n.mu.Lock()
	defer n.mu.Unlock()
	if f == nil {
		delete(n.origins, image)
		return nil
	}
	if cur := n.origins[image]; cur != nil {
		return cur
	}
	n.origins[image] = f
	return f
}

// originFetch returns what fetches image's blocks from their origin:
// Config.Origin, else what ServeOrigin set for image; nil if neither.
func (n *Node) originFetch(image string) func(context.Context, []flat.Block) (map[flat.BlockID][]byte, error) {
	if o := n.cfg.Origin; o != nil {
		return func(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
			return o.FetchOrigin(ctx, image, blocks)
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if f := n.origins[image]; f != nil {
		return f.FetchMany
	}
	return nil
}

// originGroup runs the origin fetches the node does, for peers and for
// itself: one per block at a time however many requests want it, and at
// most cap(slots) at once for peers.
type originGroup struct {
	mu    sync.Mutex
	calls map[flat.BlockID]*originCall
	slots chan struct{}
	// copies counts the copies of each block sent to peers, in ORIGIN
	// and plain answers, by binary CID (OriginSpread, Spread).
	copies map[string]int
	// to lists, by binary CID, the last MaxHints peers a copy of the
	// block reached (the whole answer was written), oldest first: the
	// hints of the block's COMING frames.
	to map[string][]peer.ID
}

// maxAskersTracked bounds the askers one origin fetch records; later ones
// are not candidates for its first copies.
const maxAskersTracked = 1 << 14

// maxCopiesTracked bounds originGroup.copies; past it the counts start
// over (a block then gets a few more first copies, nothing worse).
const maxCopiesTracked = 1 << 16

// reserve counts one more copy of each of cids (blocks the node holds) to
// be sent in an ORIGIN answer, unless each has been sent slots times
// already (OriginSpread): then it reports false, and the request is
// answered COMING.
func (g *originGroup) reserve(cids [][]byte, slots int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !slices.ContainsFunc(cids, func(c []byte) bool { return !OriginSpread(g.copies[string(c)], slots) }) {
		return false
	}
	if len(g.copies) > maxCopiesTracked {
		clear(g.copies)
		clear(g.to)
	}
	for _, c := range cids {
		g.copies[string(c)]++
	}
	return true
}

// take splits the cids of a plain request into those to send, each
// counted as one more copy, and those sent limit times already, to be
// answered COMING (Spread), with the peers their copies reached so far
// (hints[i] for spread[i]); force sends (and counts) them all.
func (g *originGroup) take(cids [][]byte, limit int, force bool) (send, spread [][]byte, hints [][]peer.ID) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.copies) > maxCopiesTracked {
		clear(g.copies)
		clear(g.to)
	}
	for _, c := range cids {
		if !force && Spread(g.copies[string(c)], limit) {
			spread = append(spread, c)
			hints = append(hints, slices.Clone(g.to[string(c)]))
			continue
		}
		g.copies[string(c)]++
		send = append(send, c)
	}
	return send, spread, hints
}

// delivered records that copies of cids reached p (AddRecipient): the
// last MaxHints peers of each block are named in its COMING frames.
func (g *originGroup) delivered(cids [][]byte, p peer.ID) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.to) > maxCopiesTracked {
		clear(g.to)
	}
	for _, c := range cids {
		g.to[string(c)] = AddRecipient(g.to[string(c)], p)
	}
}

// unreserve takes back what reserve or take counted, for copies that were
// not sent: no upload slot, or the block is not here.
func (g *originGroup) unreserve(cids [][]byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range cids {
		if g.copies[string(c)] > 0 {
			g.copies[string(c)]--
		}
	}
}

// originCall is one block being fetched from its origin; done closes once data
// is set (nil if the fetch did not deliver it).
type originCall struct {
	done chan struct{}
	data []byte
	// askers are the peers whose ORIGIN requests wait for the fetch;
	// first, set before done closes, those of them that get the block's
	// first copies (FirstCopies).
	askers []peer.ID
	first  []peer.ID
}

// firstCopy reports whether p was picked for one of the block's first
// copies; only once done is closed.
func (c *originCall) firstCopy(p peer.ID) bool { return slices.Contains(c.first, p) }

func newOriginGroup(limit int) *originGroup {
	return &originGroup{calls: map[flat.BlockID]*originCall{}, slots: make(chan struct{}, limit), copies: map[string]int{}, to: map[string][]peer.ID{}}
}

// originFor gets the blocks of an ORIGIN request from p that the node
// does not hold: each is fetched through the image's origin (originFetch)
// unless a fetch of it is already running, which the request joins. It
// returns the fetched bytes by binary CID, once every fetch it waits for
// has ended or ctx has, and the fetch of the first block in the request
// it waited for (lead; nil if none, or if it failed): whether p gets
// first copies is decided there (FirstCopies). It reports false (BUSY)
// when the request would need a new fetch and MaxOriginFetches are
// running, unless it can join one for some of its blocks, in which case
// the others are left out (NOT_FOUND).
func (n *Node) originFor(ctx context.Context, p peer.ID, q request) (fetched map[string][]byte, lead *originCall, ok bool) {
	s := n.swarm(q.image)
	fetch := n.originFetch(q.image)
	if fetch == nil || s == nil {
		return nil, nil, true // not joined, or no origin: what it holds, NOT_FOUND for the rest
	}
	var need []flat.Block
	cidOf := map[flat.BlockID]string{}
	for _, c := range q.cids {
		id, ok := blockIDOf(c)
		if !ok {
			continue
		}
		i, ok := s.pos[id]
		if !ok {
			continue // not a block of the image: NOT_FOUND
		}
		if _, dup := cidOf[id]; dup {
			continue
		}
		if n.holds(ctx, id, c) {
			continue // served from the store
		}
		cidOf[id] = string(c)
		need = append(need, s.blocks[i])
	}
	if len(need) == 0 {
		return nil, nil, true
	}

	waits, ok := n.startOrigin(s.digest, fetch, need, p)
	if !ok {
		return nil, nil, false
	}

	n.st.originWaiting.Add(1)
	defer n.st.originWaiting.Add(-1)
	out := make(map[string][]byte, len(waits))
	for id, c := range waits {
		select {
		case <-c.done:
			if c.data != nil {
				out[cidOf[id]] = c.data
			}
		case <-ctx.Done():
			return out, nil, true
		}
	}
	for _, b := range need {
		if c := waits[b.ID]; c != nil {
			if c.data != nil {
				lead = c
			}
			break
		}
	}
	return out, lead, true
}

// startOrigin starts fetching blocks through fetch, except those
// already being fetched, and returns the fetches that will deliver each of
// blocks. For a peer's ORIGIN request (asker set), a new fetch needs one
// of MaxOriginFetches slots: with none free it starts nothing and, if
// some of blocks are being fetched already, returns those alone, else
// reports false (BUSY); the asker is recorded on each fetch it waits for
// (FirstCopies). The node's fetches of the blocks it is designated for
// (asker "") take no slot: they are the fetches its chains would make
// anyway, only earlier.
func (n *Node) startOrigin(image string, fetch func(context.Context, []flat.Block) (map[flat.BlockID][]byte, error), blocks []flat.Block, asker peer.ID) (map[flat.BlockID]*originCall, bool) {
	forPeers := asker != ""
	g := n.origin
	g.mu.Lock()
	var fresh []flat.Block
	waits := make(map[flat.BlockID]*originCall, len(blocks))
	for _, b := range blocks {
		if c := g.calls[b.ID]; c != nil {
			waits[b.ID] = c
		} else if _, dup := waits[b.ID]; !dup {
			waits[b.ID] = nil // placeholder until a slot is had
			fresh = append(fresh, b)
		}
	}
	slot := false
	if len(fresh) > 0 && forPeers {
		select {
		case g.slots <- struct{}{}:
			slot = true
		default:
			for _, b := range fresh {
				delete(waits, b.ID)
			}
			if len(waits) == 0 {
				g.mu.Unlock()
				return nil, false
			}
			fresh = nil // serve what others are fetching; NOT_FOUND for the rest
		}
	}
	for _, b := range fresh {
		c := &originCall{done: make(chan struct{})}
		g.calls[b.ID] = c
		waits[b.ID] = c
	}
	if forPeers {
		for _, c := range waits {
			if len(c.askers) < maxAskersTracked {
				c.askers = append(c.askers, asker)
			}
		}
	}
	g.mu.Unlock()
	if len(fresh) > 0 {
		n.st.originFetches.Add(1)
		if !n.spawn(func() { n.fetchOrigin(image, fetch, fresh, slot) }) {
			n.publishOrigin(fresh, nil, slot)
		}
	}
	return waits, true
}

// fetchOrigin runs one origin fetch, bounded by OriginFetchTimeout and the
// node's life, not by any one asker: a block others wait for is fetched
// even if the first asker gives up.
func (n *Node) fetchOrigin(image string, fetch func(context.Context, []flat.Block) (map[flat.BlockID][]byte, error), blocks []flat.Block, slot bool) {
	ctx, cancel := context.WithTimeout(n.life, n.cfg.OriginFetchTimeout)
	defer cancel()
	got, err := fetch(ctx, blocks)
	if err != nil {
		n.log.Debug("origin fetch incomplete", "image", image, "blocks", len(blocks), "fetched", len(got), "err", err)
	}
	n.publishOrigin(blocks, got, slot)
}

// publishOrigin hands the outcome of an origin fetch to the requests
// waiting for it and frees its slot, if it had one.
func (n *Node) publishOrigin(blocks []flat.Block, got map[flat.BlockID][]byte, slot bool) {
	g := n.origin
	g.mu.Lock()
	for _, b := range blocks {
		c := g.calls[b.ID]
		delete(g.calls, b.ID)
		if d, ok := got[b.ID]; ok && len(d) == int(b.ULen) && len(d) <= MaxBlockFrame {
			c.data = d
		}
		if len(c.askers) > 0 {
			c.first = FirstCopies(b.ID, c.askers, n.cfg.MaxUploadStreams)
		}
		close(c.done)
	}
	g.mu.Unlock()
	if slot {
		<-g.slots
	}
}
