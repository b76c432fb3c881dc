package p2p

import (
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/shoal-project/shoal/flat"
)

// An image's peers hold its manifest and its index (the node keeps both
// blobs in its block cache, each as a block whose ID is the blob's sha256):
// ImageManifest and ImageIndex fetch them from the peers, so that a rollout
// of thousands of nodes costs the registry about one copy of each rather
// than one per node (the manifest is about a kilobyte, the index about
// 120 KB for a Debian image: 1% of the bytes python reads at start, times
// every node). The lookup that finds the peers is kept for the JoinImage
// that follows, so a node start still costs one DHT lookup (and one
// provide: the early one, see ImageBlob).

const (
	// foundLifetime is how long a lookup's providers are reused.
	foundLifetime = 30 * time.Second
	// earlyProvideTimeout bounds the provide ImageBlob starts in the
	// background (including the wait for a routing table).
	earlyProvideTimeout = 30 * time.Second
	// earlyProvideRoutingWait is how long that provide waits for the DHT
	// routing table to take a peer in: the node may still be bootstrapping
	// (ImageBlob does that in the foreground), and a provide with an empty
	// routing table publishes nothing.
	earlyProvideRoutingWait = 5 * time.Second
	// blobBackoffMin and blobBackoffMax bound the wait between two passes
	// over an image blob's candidates: it starts at the minimum and
	// doubles each pass.
	blobBackoffMin = 10 * time.Millisecond
	blobBackoffMax = 200 * time.Millisecond
	// designatedPeers is how many providers the designated fetcher of a
	// blob asks, once each, before it reads the registry.
	designatedPeers = 3
)

// ErrNoIndex means no peer of the image delivered the image blob (its
// index or its manifest) asked for, or that this node is the blob's
// designated fetcher: either way the caller reads it from the registry.
var ErrNoIndex = errors.New("p2p: no peer delivered the image's blob")

type foundProviders struct {
	at    time.Time
	provs []peer.AddrInfo
}

// earlyProvide is the state of an image's early provide (ImageBlob).
type earlyProvide struct {
	running bool
	done    chan struct{} // closed when the running one ends
	ok      time.Time     // when the last one succeeded; zero if none did
	opened  time.Time     // when ImageBlob last asked for the image (opening)
}

// openingGrace is how long after its last ImageBlob call a node that has
// not joined an image still counts as a member of the image's swarm: it is
// opening the image (a mount reads the manifest and the index before it
// joins), and answers NOT_FOUND, not NOT_MEMBER, meanwhile.
const openingGrace = time.Minute

// opening reports whether ImageBlob asked for image within openingGrace.
func (n *Node) opening(image string) bool {
	key, err := ImageKey(image)
	if err != nil {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.early[key.KeyString()]
	return ok && time.Since(e.opened) < openingGrace
}

// fresh reports whether a new early provide would be redundant: one is
// running, or one succeeded within reprovideInterval.
func (e earlyProvide) fresh(now time.Time) bool {
	return e.running || e.succeeded(now)
}

func (e earlyProvide) succeeded(now time.Time) bool {
	return !e.ok.IsZero() && now.Sub(e.ok) < reprovideInterval
}

// imageOfKey returns the image digest ("sha256:<hex>") and its sha256 as a
// block ID for an image key (ImageKey); ok is false for a key that is not
// a sha2-256 CID.
func imageOfKey(key cid.Cid) (digest string, id flat.BlockID, ok bool) {
	dmh, err := multihash.Decode(key.Hash())
	if err != nil || dmh.Code != multihash.SHA2_256 || len(dmh.Digest) != len(id) {
		return "", id, false
	}
	copy(id[:], dmh.Digest)
	return "sha256:" + hex.EncodeToString(dmh.Digest), id, true
}

// providers returns the providers of key: those of a lookup made in the
// last foundLifetime if it found at least reuse of them, or a new lookup's
// (up to DiscoveryPool, in the DHT's order). Image blobs need one provider
// (reuse 1); JoinImage's discovery reuses the blob lookup only if it found
// a full set of MaxImagePeers: when a whole swarm starts at once, the blob
// lookup runs before most records are out, and discovery, after its own
// provide, must look again or it would settle for the first few nodes.
//
// Every new lookup also sets the image's origin group (imageGroup), from
// the providers in the order found and this node: the group follows the
// node's latest view of the swarm, and designated fetchers with it. A
// lookup that fails (no provider found before its deadline) leaves the
// group as it was.
func (n *Node) providers(ctx context.Context, key cid.Cid, reuse int) ([]peer.AddrInfo, error) {
	k := key.KeyString()
	n.mu.Lock()
	f, ok := n.found[k]
	n.mu.Unlock()
	if ok && len(f.provs) >= max(reuse, 1) && time.Since(f.at) < foundLifetime {
		return f.provs, nil
	}
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	provs, err := n.FindProviders(fctx, key, max(n.cfg.DiscoveryPool, n.cfg.MaxImagePeers))
	if err != nil {
		return nil, err
	}
	digest, image, isImage := imageOfKey(key)
	var group []peer.ID
	if isImage {
		ids := make([]peer.ID, len(provs))
		for i, ai := range provs {
			ids[i] = ai.ID
		}
		group = OriginGroup(image, ids, n.ID(), OriginGroupSize)
	}
	n.mu.Lock()
	if n.found == nil {
		n.found = map[string]foundProviders{}
	}
	for kk, ff := range n.found {
		if time.Since(ff.at) >= foundLifetime {
			delete(n.found, kk)
		}
	}
	if len(provs) > 0 {
		n.found[k] = foundProviders{at: time.Now(), provs: provs}
	}
	if isImage {
		if n.groups == nil {
			n.groups = map[string][]peer.ID{}
		}
		n.groups[digest] = group
	}
	n.mu.Unlock()
	return provs, nil
}

// imageGroup returns the origin group of the image whose manifest digest is
// digest (OriginGroup over the providers of the node's latest lookup of the
// image, and the node itself), or nil if the node never looked the image
// up. Designate over it picks an image's designated fetchers: of its blocks
// (PeerSource) and of its blobs (ImageBlob). Groups are kept for the
// node's lifetime: a handful of peer IDs per image ever looked up.
func (n *Node) imageGroup(digest string) []peer.ID {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.groups[digest])
}

// startEarlyProvide starts providing key in the background (provideEarly,
// on a goroutine the node owns) unless an early provide of key is fresh:
// running, or successful within reprovideInterval.
func (n *Node) startEarlyProvide(key cid.Cid) {
	k := key.KeyString()
	now := time.Now()
	n.mu.Lock()
	if n.early == nil {
		n.early = map[string]earlyProvide{}
	}
	e := n.early[k]
	e.opened = now
	n.early[k] = e
	if e.fresh(now) {
		n.mu.Unlock()
		return
	}
	for kk, ee := range n.early {
		if !ee.fresh(now) && now.Sub(ee.opened) >= openingGrace {
			delete(n.early, kk)
		}
	}
	n.early[k] = earlyProvide{running: true, done: make(chan struct{}), ok: e.ok, opened: now}
	n.mu.Unlock()
	if !n.spawn(func() { n.provideEarly(key) }) {
		n.endEarlyProvide(k, false)
	}
}

// provideEarly publishes this node's record for an image key before the
// node holds anything of the image: see ImageBlob for why. It waits (a
// little) for the DHT's routing table first, since the node may still be
// bootstrapping, and records when it succeeded (recentlyProvided).
func (n *Node) provideEarly(key cid.Cid) {
	ctx, cancel := context.WithTimeout(n.life, earlyProvideTimeout)
	defer cancel()
	rctx, rcancel := context.WithTimeout(ctx, earlyProvideRoutingWait)
	t := time.NewTicker(10 * time.Millisecond)
	for n.dht.RoutingTable().Size() == 0 && rctx.Err() == nil {
		select {
		case <-rctx.Done():
		case <-t.C:
		}
	}
	t.Stop()
	rcancel()
	start := time.Now()
	err := n.Provide(ctx, key)
	n.endEarlyProvide(key.KeyString(), err == nil)
	if err != nil {
		// The record is in the local store anyway; the next ImageBlob (or
		// JoinImage's own provide) tries again.
		n.log.Debug("early provide of image record", "key", key.String(), "err", err)
		return
	}
	n.log.Debug("provided image record early", "key", key.String(), "took", time.Since(start))
}

func (n *Node) endEarlyProvide(k string, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e := n.early[k]
	if e.running && e.done != nil {
		close(e.done)
	}
	e.running, e.done = false, nil
	if ok {
		e.ok = time.Now()
	}
	if n.early == nil {
		n.early = map[string]earlyProvide{}
	}
	n.early[k] = e
}

// recentlyProvided reports whether an early provide of key (ImageBlob)
// succeeded within reprovideInterval: a provide of the same key now would
// publish the same record again. One still running is waited for (until
// ctx ends). It takes n.mu.
func (n *Node) recentlyProvided(ctx context.Context, key cid.Cid) bool {
	n.mu.Lock()
	e := n.early[key.KeyString()]
	n.mu.Unlock()
	if e.running && e.done != nil {
		select {
		case <-e.done:
		case <-ctx.Done():
			return false
		}
		n.mu.Lock()
		e = n.early[key.KeyString()]
		n.mu.Unlock()
	}
	return e.succeeded(time.Now())
}

// ImageManifest fetches the flat manifest whose digest is digest (size
// bytes) from the image's peers, as ImageBlob does; the block ID is the
// digest itself. It counts Stats.ManifestsFetched.
func (n *Node) ImageManifest(ctx context.Context, digest string, size int64) ([]byte, error) {
	key, err := ImageKey(digest)
	if err != nil {
		return nil, err
	}
	if n.Private(digest) {
		// Holding the manifest is the proof of access: each node reads
		// it from the registry itself.
		return nil, fmt.Errorf("manifest of private image %s: %w: read it from the registry", digest, ErrNoIndex)
	}
	_, id, _ := imageOfKey(key)
	data, err := n.ImageBlob(ctx, digest, id, size)
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	n.st.manifestsFetched.Add(1)
	return data, nil
}

// ImageIndex fetches the index blob of the flat image whose manifest digest
// is digest (its sha256 is id, its size size) from the image's peers, as
// ImageBlob does. It counts Stats.IndexesFetched.
func (n *Node) ImageIndex(ctx context.Context, digest string, id flat.BlockID, size int64) ([]byte, error) {
	data, err := n.ImageBlob(ctx, digest, id, size)
	if err != nil {
		return nil, fmt.Errorf("index: %w", err)
	}
	n.st.indexesFetched.Add(1)
	return data, nil
}

// ImageBlob fetches a blob of the flat image whose manifest digest is
// digest — its manifest or its index — from the image's peers, which keep
// it in their block caches as one block: id is the blob's sha256, size its
// length (at most flat.MaxBlockSize). The bytes come back verified against
// id; a peer that sends wrong bytes gets a strike. Any error means: read
// the blob from the registry. An error wrapping ErrNoIndex comes back at
// once when this node is the blob's designated fetcher, and otherwise
// within OriginWait of the call (plus the DHT lookup's own bound, when it
// is slow).
//
// The problem it solves is a rollout: thousands of nodes start the same
// image at the same moment, and each would read the blob from the registry
// — at 10,000 nodes a hundred times the bytes one node reads — because
// nobody holds it yet when they look. So:
//
//  1. The node first provides the image's record, in the background
//     (startEarlyProvide; JoinImage then need not provide again, see
//     recentlyProvided). When a whole swarm starts at once, a lookup run
//     before anybody's record is out finds nobody; a node that provides
//     before it looks is found by the nodes that look after it.
//  2. One lookup (reused by JoinImage) gives the image's providers and the
//     image's origin group (imageGroup, OriginGroup): the same few nodes
//     for every node that found the same providers, whatever order the
//     DHT returned them in.
//  3. Designate picks the blob's designated fetcher in the group. If it is
//     this node, it asks up to designatedPeers (3) of the other providers
//     once each (in a swarm that has run a while, one of them holds the
//     blob), and the caller then reads the blob from the registry and
//     keeps it in its block cache, and the other nodes fetch it from here.
//     A node that found nobody else returns at once: a lone node loses no
//     time.
//  4. Otherwise the node asks the designated fetcher first, then up to
//     MaxImagePeers of the other providers picked at random, one after the
//     other, and again after a back-off (10 ms, doubling, at most 200 ms)
//     as long as nobody delivered, until OriginWait after the call began;
//     in the passes after the first the designated fetcher is asked last.
//     A peer that cannot be reached or sends wrong bytes is not asked
//     again in this call; one that answers NOT_FOUND or BUSY, or whose
//     request fails, is asked in the next pass (unless the peer table
//     rests it meanwhile: BUSY rests a peer for BusyBackoff). With
//     OriginWait negative (origin coalescing off) there is one pass and no
//     waiting.
//
// The designated fetcher reads the blob from the registry once; every
// other node asks it, and then the providers it sampled, which have the
// blob from it and from each other as they keep what they fetched: the
// holders double every few milliseconds, and no node waits long. The
// registry sees about one copy for the swarm. A swarm that is broken (the
// designated fetcher gone, or nobody ever holding the blob) costs a node
// at most OriginWait before it reads the registry itself.
func (n *Node) ImageBlob(ctx context.Context, digest string, id flat.BlockID, size int64) ([]byte, error) {
	start, clockStart := time.Now(), n.cfg.Clock.Now()
	blob := "sha256:" + id.Hex()
	if size <= 0 || size > flat.MaxBlockSize {
		return nil, fmt.Errorf("blob %s of %s: %d bytes is more than peers serve in one block", blob, digest, size)
	}
	key, err := ImageKey(digest)
	if err != nil {
		return nil, err
	}
	// Served under the image from here on, once this node has it.
	n.addImageBlob(digest, id)
	n.startEarlyProvide(key)
	if len(n.host.Network().Peers()) == 0 {
		n.bootstrap(ctx)
	}
	n.waitRoutingTable(ctx, 2*time.Second)
	provs, err := n.providers(ctx, key, 1)
	if err != nil {
		return nil, fmt.Errorf("blob %s of %s: %w", blob, digest, err)
	}
	self := n.ID()
	group := n.imageGroup(digest)
	if group == nil { // not a sha256 key: ImageKey makes nothing else
		return nil, fmt.Errorf("blob %s of %s: no origin group: %w", blob, digest, ErrNoIndex)
	}
	// The designated fetcher over the group less the members this node
	// found unreachable, not members of the image, or slow to connect,
	// lately (LiveGroup).
	designee := func() peer.ID {
		return Designate(id, LiveGroup(group, self, n.undesignatable(digest)), self)
	}
	d := designee()
	designated := d == self || d == ""
	var others []peer.AddrInfo
	dInfo := peer.AddrInfo{ID: d}
	for _, ai := range provs {
		switch ai.ID {
		case d:
			dInfo = ai
		case self:
		default:
			others = append(others, ai)
		}
	}
	if designated && len(others) == 0 {
		n.log.Debug("designated fetcher of an image blob", "image", digest, "blob", blob, "providers", len(provs))
		return nil, fmt.Errorf("blob %s of %s: %w: this node is its designated fetcher (no other provider found)", blob, digest, ErrNoIndex)
	}
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	var cands []peer.AddrInfo
	wait := n.cfg.OriginWait
	if designated {
		// The designated fetcher of a swarm that has been running a while
		// (a node joining late, or one that came back): a peer probably
		// holds the blob already. One quick pass over a few, then the
		// registry — never a wait, which in a swarm starting at once
		// would hold up everybody who asks this node.
		cands = SampleProviders(others, designatedPeers, rng)
		wait = 0
	} else {
		// The designated fetcher, then a sample of the others.
		if len(dInfo.Addrs) == 0 { // the group came from a later lookup than provs
			dInfo = n.host.Peerstore().PeerInfo(d)
		}
		cands = append([]peer.AddrInfo{dInfo}, SampleProviders(others, n.cfg.MaxImagePeers, rng)...)
	}

	deadline := clockStart.Add(wait)
	wctx := ctx
	if wait > 0 {
		var cancel context.CancelFunc
		wctx, cancel = context.WithDeadline(ctx, start.Add(wait))
		defer cancel()
	}
	blk := []flat.Block{{ID: id, ULen: uint32(size)}}
	dropped := make([]bool, len(cands))
	asked := map[peer.ID]bool{}
	requests, passes := 0, 0
	var last error
	backoff := blobBackoffMin
	// replace puts the next member of the group in the place (cands[i]) of
	// the designated fetcher, which is gone or not a member of the image,
	// as every node that finds it so does — else nobody would fetch the
	// blob for the swarm, and every node would wait OriginWait and read
	// it from the registry itself. It reports whether cands[i] is to be
	// asked now.
	dSince := clockStart // when d became the designated fetcher (BlobGrace)
	replace := func(i int) bool {
		n.st.originReplanned.Add(1)
		dSince = n.cfg.Clock.Now()
		if d = designee(); d == self || d == "" {
			designated, wait = true, 0 // a quick pass, then the registry
			return false
		}
		cands[i], dropped[i] = n.host.Peerstore().PeerInfo(d), false
		return true
	}
	for {
		passes++
		// The designated fetcher holds the blob a registry read after the
		// swarm asks for it. One that has delivered nothing, nor has
		// anyone, within BlobGrace of becoming the designee is taken for a
		// member that lies, as PeerSource takes one whose COMING never
		// comes: unreachable, and the next member in its place, in every
		// node that finds it so.
		if !designated && wait > 0 && n.cfg.Clock.Now().Sub(dSince) >= BlobGrace(wait) && wctx.Err() == nil {
			n.st.comingUndelivered.Add(1)
			n.markUnreachable(d)
			n.log.Warn("designated fetcher of an image blob delivered nothing; asking the next member", "peer", d.String(), "image", digest, "blob", blob)
			if i := slices.IndexFunc(cands, func(ai peer.AddrInfo) bool { return ai.ID == d }); i >= 0 {
				replace(i)
			}
		}
		for k := 0; k < len(cands); k++ {
			// The designated fetcher is asked first in the first pass
			// and last in the later ones: by then the others have the
			// blob from it, and it has readers enough.
			i := k
			if passes > 1 && !designated {
				i = (k + 1) % len(cands)
			}
			ai := cands[i]
			if dropped[i] || wctx.Err() != nil {
				continue
			}
			if !n.peers.usable(ai.ID, n.cfg.Clock.Now()) {
				continue
			}
			// One pass asks the candidates one after another: a provider
			// at a silent address held it for its whole dial (5 s, cut
			// short by OriginWait), and the node then read the blob from
			// the registry.
			if !n.dialHedged(wctx, ai) {
				dropped[i] = true
				last = fmt.Errorf("peer %s: no connection within %v", ai.ID, DesignatedHedge)
				// The designated fetcher gone, or slow to connect: the
				// next member takes its place, as in every node that
				// finds it so.
				if ai.ID == d && !designated && wctx.Err() == nil && n.undesignatable(digest)(d) && replace(i) {
					k-- // ask the next member now
				}
				continue
			}
			asked[ai.ID] = true
			requests++
			// One block, requested and booked as a blob's blocks are.
			got, notMember, err := n.fetchBlob(wctx, ai.ID, digest, blk, flagMember)
			if data, ok := got[id]; ok {
				n.log.Debug("image blob from a peer", "image", digest, "blob", blob, "peer", ai.ID.String(),
					"designated", ai.ID == d, "pass", passes, "requests", requests, "took", time.Since(start))
				return data, nil
			}
			if notMember {
				// It left the image (or restarted) and does not hold the
				// blob: no use asking it again.
				n.markNotMember(digest, ai.ID)
				dropped[i] = true
				last = fmt.Errorf("peer %s is not a member of the image", ai.ID)
				if ai.ID == d && !designated && wctx.Err() == nil && replace(i) {
					k--
				}
				continue
			}
			if errors.Is(err, ErrBadBlock) {
				dropped[i] = true
			}
			if last == nil || wctx.Err() == nil { // keep a real reason over the deadline's
				last = cmp.Or(err, fmt.Errorf("peer %s does not hold it", ai.ID))
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("blob %s of %s: %w", blob, digest, err)
		}
		live := 0
		for _, dr := range dropped {
			if !dr {
				live++
			}
		}
		left := deadline.Sub(n.cfg.Clock.Now())
		if live == 0 || wait <= 0 || left <= 0 || wctx.Err() != nil {
			break
		}
		select {
		case <-n.cfg.Clock.After(min(backoff, left)):
		case <-wctx.Done():
		}
		backoff = min(2*backoff, blobBackoffMax)
	}
	if last == nil {
		last = errors.New("no candidate could be asked")
	}
	return nil, fmt.Errorf("blob %s of %s: %w (%d of %d candidates asked, %d requests in %d passes over %v; last: %v)",
		blob, digest, ErrNoIndex, len(asked), len(cands), requests, passes, time.Since(start).Round(time.Millisecond), last)
}
