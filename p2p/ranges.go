package p2p

// Blob ranges: origin coalescing for registry blobs that nobody holds yet
// (package mirror).
//
// When many nodes pull the same blob through their mirrors at once, nobody
// holds it whole, and a blob record (ProvideBlob) finds nobody. Instead each
// node that starts such a pull joins the blob's pull swarm: it provides
// PullKey(key) early (as ImageBlob provides an image's record) and looks it
// up, which gives the pull's origin group (OriginGroup over the providers,
// as for an image). The blob is cut into ranges of a fixed size; range i
// has the rendezvous ID RangeID(key, i), and its designated fetcher is
// Designate over the group less the members this node found gone, slow or
// not members (LiveGroup) — the same designation as an image's blocks and
// blobs. The designated fetcher reads its ranges from the registry; the
// other nodes ask it (FetchRange), and a sample of the other members, which
// serve a range as soon as they hold it.
//
// A range has no digest anywhere: the registry states only the whole
// blob's. So a range from a peer is untrusted bytes of the right length;
// the caller (the mirror) verifies the assembled blob against its digest
// before any client sees a byte, and on a mismatch reads the ranges that
// came from peers from the registry again, compares, and strikes the peers
// whose bytes differed. A server therefore serves only ranges it read
// from the registry itself, or of a blob it verified whole (RangeGetter):
// never bytes it got from another peer unverified, so a bad range always
// has the peer that sent it as its author.
//
//	request = frame( str(key) uvarint(index) uvarint(flags) members )     flags: bit 0 MEMBER
//	answer  = frame( status(1 byte) rest )
//	  OK:        rest = the range's bytes
//	  COMING:    rest = uvarint(n) members: the range is on its way here — n = 0:
//	             queued, to be read upstream; n ≥ 1: being read upstream, n-1 bytes landed
//	  NOT_FOUND: rest = members
//	  BUSY (no upload slot), NOT_MEMBER (not pulling the blob: do not designate),
//	  DENIED (a private blob, and no proof of access from the asker): rest empty
//	members = uvarint(k) k × str(peer ID): the sender's view of the pull's
//	  origin group (k ≤ PullGroupSize), which the receiver adds to its own
//
// The key is a public blob's digest or a private blob's swarm name; a
// private blob's ranges go only to peers that proved access for the name
// (admitted, ProtocolAccess), as its recipe and blocks do. A range's bytes
// take an upload slot and are paced like blocks.

import (
	"bufio"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/shoal-project/shoal/flat"
)

// ProtocolRange serves ranges of blobs being pulled.
const ProtocolRange protocol.ID = "/shoal/range/1"

// MaxRangeSize bounds one range on the wire.
const MaxRangeSize = flat.MaxBlockSize

// RangeMinRate is the slowest a designated fetcher's registry read of a
// range may progress, on average, before askers stop waiting for it: a
// range's wait is bounded by OriginWait plus its length at this rate. It
// is low because a registry link is shared by every range being read at
// once (at a rollout's start, several per blob on each of the group's
// nodes), so one range's share of it is a small part of the link, and an
// asker that gives up early adds a registry copy that slows every range
// further. Within the bound a read must also keep moving (RangeStall).
const RangeMinRate = 32 << 10

// RangeStall ends the wait for a range whose read at its designated
// fetcher has landed no new byte for this long. It is longer than
// OriginWait because a capped registry link queues deeply: a read's first
// bytes may sit in the link's queue for seconds.
const RangeStall = 10 * time.Second

// ErrRangeUpstream means: read this range from the registry (this node is
// its designated fetcher, or the swarm did not deliver it in time).
var ErrRangeUpstream = errors.New("p2p: read the range from the registry")

// RangeGetter gives the ranges of blobs this node pulls or holds.
// BlobRange returns range i of the blob under key if the node read it from
// the registry itself or verified the whole blob (ok); else coming is 0
// if its registry read of the range is queued, 1 plus the bytes landed so
// far once that read is sent, and negative if it is not reading it.
type RangeGetter interface {
	BlobRange(ctx context.Context, key string, i int) (data []byte, coming int64, ok bool)
}

// ServeRanges makes the node answer /shoal/range/1 requests from g.
func (n *Node) ServeRanges(g RangeGetter) {
	n.host.SetStreamHandler(ProtocolRange, func(st network.Stream) { n.handleRange(st, g) })
}

// PullKey is the digest ("sha256:<hex>") under which the nodes pulling the
// blob named key find each other: derived from key, so that a private
// blob's pull record says nothing of it to anyone who does not know its
// name.
func PullKey(key string) string {
	h := sha256.Sum256([]byte("shoal/mirror pull v1\x00" + key))
	return "sha256:" + hex.EncodeToString(h[:])
}

// RangeID is range i's rendezvous ID in the pull of the blob named key.
func RangeID(key string, i int) flat.BlockID {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(i))
	return flat.BlockID(sha256.Sum256([]byte("shoal/mirror range v1\x00" + key + "\x00" + string(b[:]))))
}

// PullGroupSize is how many members a pull's origin group has at most:
// the lowest of OriginGroup's scores among the members found. Larger than
// an image's (OriginGroupSize): members of a pull are found while the
// pull runs, and with rendezvous hashing a member found late takes only
// the ranges it wins, whereas in a group cut at eight it pushes another
// member out and that member's whole share moves, to be read twice by
// the old and the new designee.
const PullGroupSize = 32

// pullRelook is how often JoinPull looks a pull up again while it is
// called: nodes that start a moment apart find each other within it.
const pullRelook = 250 * time.Millisecond

// Bounds of pullPeers: pulls tracked, and askers per pull.
const (
	maxPullsTracked = 1 << 10
	maxPullAskers   = 1 << 12
)

// JoinPull makes this node a member of the pull swarm of the blob named
// key for openingGrace: it provides PullKey(key) in the background and
// waits (at most OriginWait) for that provide, so that the nodes that
// look after it find it, then looks the pull up — again at most every
// pullRelook. It returns the size of the pull's origin group as this node
// sees it (1: alone, as far as it knows). An error means the node is
// connected to no peer: the swarm cannot help.
func (n *Node) JoinPull(ctx context.Context, key string) (int, error) {
	pk := PullKey(key)
	k, err := ImageKey(pk)
	if err != nil {
		return 0, err
	}
	n.startEarlyProvide(k)
	if len(n.host.Network().Peers()) == 0 {
		n.bootstrap(ctx)
		if len(n.host.Network().Peers()) == 0 {
			return 0, errors.New("p2p: no peer connected")
		}
	}
	n.mu.Lock()
	done := n.early[k.KeyString()].done
	if f, ok := n.found[k.KeyString()]; ok && time.Since(f.at) >= pullRelook {
		delete(n.found, k.KeyString())
	}
	n.mu.Unlock()
	if done != nil {
		t := time.NewTimer(cmp.Or(max(n.cfg.OriginWait, 0), time.Second))
		select {
		case <-done:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	n.waitRoutingTable(ctx, 2*time.Second)
	provs, err := n.providers(ctx, k, 1)
	if err != nil {
		n.log.Debug("pull lookup", "key", key, "err", err)
	}
	// The members a lookup found stay members (for openingGrace): a later
	// lookup that finds fewer — a DHT query cut short under load — must
	// not shrink the group, or this node would designate itself for
	// ranges the others leave to the members it lost.
	for _, ai := range provs {
		if ai.ID != n.ID() {
			n.sawPullMember(pk, ai.ID)
		}
	}
	return len(n.pullGroup(pk)), nil
}

// pullGroup is the origin group of a pull (pk = PullKey(key)): the lowest
// of the providers its lookups found, the peers that asked this node for
// its ranges, and this node (OriginGroup), less those it may not
// designate now (LiveGroup).
func (n *Node) pullGroup(pk string) []peer.ID {
	found := n.imageGroup(pk)
	now := time.Now()
	n.mu.Lock()
	for p, at := range n.pullPeers[pk] {
		if now.Sub(at) < openingGrace {
			found = append(found, p)
		}
	}
	n.mu.Unlock()
	_, id, _ := imageOfKey(mustKey(pk))
	return LiveGroup(OriginGroup(id, found, n.ID(), PullGroupSize), n.ID(), n.undesignatable(pk))
}

func mustKey(digest string) cid.Cid {
	k, _ := ImageKey(digest)
	return k
}

// sawPullMember records that p is a member of the pull pk: a lookup
// found it, or it asked for the pull's ranges.
func (n *Node) sawPullMember(pk string, p peer.ID) {
	now := time.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.pullPeers == nil {
		n.pullPeers = map[string]map[peer.ID]time.Time{}
	}
	m := n.pullPeers[pk]
	if m == nil {
		if len(n.pullPeers) >= maxPullsTracked {
			for k, mm := range n.pullPeers {
				for q, at := range mm {
					if now.Sub(at) >= openingGrace {
						delete(mm, q)
					}
				}
				if len(mm) == 0 {
					delete(n.pullPeers, k)
				}
			}
			if len(n.pullPeers) >= maxPullsTracked {
				return
			}
		}
		m = map[peer.ID]time.Time{}
		n.pullPeers[pk] = m
	}
	if _, ok := m[p]; ok || len(m) < maxPullAskers {
		m[p] = now
	}
}

// RangeDesignee returns range i's designated fetcher in the pull of key
// (Designate over pullGroup); self or "" means this node.
func (n *Node) RangeDesignee(key string, i int) peer.ID {
	return Designate(RangeID(key, i), n.pullGroup(PullKey(key)), n.ID())
}

// FetchRange gets range i (size bytes) of the blob named key from the
// nodes pulling it: its designated fetcher first, then a sample of the
// other members, again after a back-off while one of them says it is on
// its way (COMING: read or queued there) or nobody holds it yet. It
// returns the bytes, unverified (see the file comment), and the peer they
// came from. While the designee does not have the range on its way, the
// other members are asked too, and one that reads it or has it queued is
// waited for instead. The wait is bounded: a designated fetcher that does
// not answer within BlobGrace is taken for gone (unreachable, and the next
// member designated, as every node that sees it does), and one that
// answers that it does not read the range, with nobody else reading it,
// leaves this node to read it; a read that has started and lands no byte
// for RangeStall is given up; and the whole wait ends OriginWait plus size at RangeMinRate
// after the call began — a designated fetcher that let it end is
// unreachable too, so that its other ranges go to the next member. An
// error wrapping ErrRangeUpstream means: read it from the registry — at
// once when this node is designated.
func (n *Node) FetchRange(ctx context.Context, key string, i int, size int64) ([]byte, peer.ID, error) {
	if size <= 0 || size > MaxRangeSize {
		return nil, "", fmt.Errorf("range %d of %s: %d bytes: %w", i, key, size, ErrRangeUpstream)
	}
	pk := PullKey(key)
	k, err := ImageKey(pk)
	if err != nil {
		return nil, "", err
	}
	wait := n.cfg.OriginWait
	if wait <= 0 {
		return nil, "", fmt.Errorf("range %d of %s: origin coalescing off: %w", i, key, ErrRangeUpstream)
	}
	start := n.cfg.Clock.Now()
	deadline := start.Add(wait + time.Duration(size)*time.Second/RangeMinRate)
	parent := ctx
	ctx, cancel := context.WithDeadline(ctx, time.Now().Add(deadline.Sub(start)))
	defer cancel()
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	self := n.ID()
	progress := map[peer.ID]int64{}
	dSince := start // when d became the designated fetcher
	moved := start  // when d's read last landed bytes
	d := n.RangeDesignee(key, i)
	// adopted: d is a member found reading the range upstream when this
	// node was designated; it is waited for, not re-designated.
	adopted, answered := false, false // answered: d said NOT_FOUND
	backoff := blobBackoffMin
	for {
		if d == self || d == "" {
			// Designated here (at first, or now that the members before
			// this node are passed over): unless another member reads
			// the range already, read it.
			var data []byte
			if d, data = n.readingElsewhere(ctx, key, i, size, progress); data != nil {
				return data, d, nil
			}
			if d == "" {
				return nil, "", fmt.Errorf("range %d of %s: designated here: %w", i, key, ErrRangeUpstream)
			}
			adopted, answered, dSince, moved = true, false, n.cfg.Clock.Now(), n.cfg.Clock.Now()
		}
		// The designated fetcher; unless it has the range on its way,
		// also the other members of the group (one of them may read it,
		// its view being another) and a sample of the other providers.
		provs, _ := n.providers(ctx, k, 1)
		cands := []peer.AddrInfo{n.host.Peerstore().PeerInfo(d)}
		inGroup := map[peer.ID]bool{d: true, self: true}
		for _, p := range n.pullGroup(pk) {
			if !inGroup[p] {
				inGroup[p] = true
				cands = append(cands, n.host.Peerstore().PeerInfo(p))
			}
		}
		var others []peer.AddrInfo
		for _, ai := range provs {
			if !inGroup[ai.ID] {
				others = append(others, ai)
			}
		}
		cands = append(cands, SampleProviders(others, 3, rng)...)
		reader := peer.ID("")
		for k, ai := range cands {
			if ctx.Err() != nil {
				break
			}
			if k == 1 {
				if c, ok := progress[d]; ok && c >= 0 && !answered {
					break // d has it on its way: no need to ask the others
				}
			}
			if !n.peers.usable(ai.ID, n.cfg.Clock.Now()) && ai.ID != d {
				continue
			}
			if !n.dialHedged(ctx, ai) {
				continue
			}
			data, coming, notMember, err := n.askRange(ctx, ai.ID, key, i, size)
			switch {
			case err == nil && data != nil:
				return data, ai.ID, nil
			case notMember:
				n.markNotMember(pk, ai.ID)
			case coming >= 0:
				if old, seen := progress[ai.ID]; !seen || coming > old {
					progress[ai.ID] = coming
					if ai.ID == d {
						moved = n.cfg.Clock.Now()
					}
				}
				if ai.ID == d {
					answered = false
				}
				// Read there now, or queued to be: a member that
				// designated itself under another view.
				if reader == "" || coming > progress[reader] {
					reader = ai.ID
				}
			case err == nil && ai.ID == d:
				answered = true // alive, and neither holds nor reads it
				if adopted {
					// It no longer reads the range (its view changed):
					// designate again, over this node's view.
					adopted = false
				}
			}
		}
		if err := ctx.Err(); err != nil {
			// It said the range was on its way, and it never came.
			if _, started := progress[d]; started && d != self && parent.Err() == nil {
				n.markUnreachable(d)
			}
			return nil, "", fmt.Errorf("range %d of %s: %w: %w", i, key, ErrRangeUpstream, err)
		}
		now := n.cfg.Clock.Now()
		if _, started := progress[d]; !started && reader != "" && reader != d {
			// Not the designee, but another member reads it: wait for that.
			d, dSince, adopted, answered, moved = reader, now, true, false, now
			continue
		}
		if p, started := progress[d]; started && p >= 1 && now.Sub(moved) >= RangeStall {
			return nil, "", fmt.Errorf("range %d of %s: the read at %s landed nothing for %v: %w", i, key, d, RangeStall, ErrRangeUpstream)
		}
		if adopted {
			// Waited for until the deadline, whatever the designation says.
		} else if nd := n.RangeDesignee(key, i); nd != d {
			d, dSince, answered, moved = nd, now, false, now // gone, slow or not a member: the next member
			continue
		}
		// A designated fetcher that has not said within BlobGrace of
		// becoming the designee that the range is on its way (COMING) is
		// passed over. One that does not answer is taken for gone, as
		// ImageBlob takes it: unreachable, and the next member designated,
		// as every node that sees it so does. One that answers NOT_FOUND
		// is up but sees the pull otherwise, and nobody this node asked
		// reads the range: views are exchanged with every answer, so such
		// a disagreement is brief, and it costs this range a registry
		// read here, not the member its whole share (marking it out moved
		// its ranges onto other members, who had planned them otherwise
		// too).
		if _, started := progress[d]; !started && !adopted && now.Sub(dSince) >= BlobGrace(wait) {
			n.st.comingUndelivered.Add(1)
			if answered {
				return nil, "", fmt.Errorf("range %d of %s: designee %s does not read it: %w", i, key, d, ErrRangeUpstream)
			}
			n.markUnreachable(d)
			n.log.Debug("designated fetcher of a blob range delivered nothing; asking the next member", "peer", d.String(), "key", key, "range", i)
			d, dSince, answered, moved = n.RangeDesignee(key, i), now, false, now
			continue
		}
		select {
		case <-n.cfg.Clock.After(backoff):
		case <-ctx.Done():
		}
		backoff = min(2*backoff, blobBackoffMax)
	}
}

// maxElsewhere bounds the members readingElsewhere asks.
const maxElsewhere = 16

// readingElsewhere is the pass the designated fetcher of a range makes
// before it reads the range upstream, as ImageBlob's asks a few providers:
// it asks the other members of the pull it knows and is connected to (the
// group first, at most maxElsewhere), at once. A
// member that holds the range (it started earlier) gives it (data). Nodes
// that joined a moment apart may see different groups, and each designate
// itself for the same range — a node that found few members at first may
// have started reading ranges that the group it is not in leaves to
// others; the one that asks second finds the first reading it (COMING ≥
// 1) and waits for it (the peer returned, data nil). Two that ask each
// other while both have it queued agree by Designate over the two of them.
// "" means: nobody is reading it, read it here. The pass takes at most
// BlobGrace: a member that has not answered by then is taken for one that
// does not read the range (with DesignatedHedge, a loaded swarm of twelve
// in network namespaces had every answer late, and each designee read
// ranges others were reading).
func (n *Node) readingElsewhere(ctx context.Context, key string, i int, size int64, progress map[peer.ID]int64) (peer.ID, []byte) {
	ctx, cancel := context.WithTimeout(ctx, BlobGrace(max(n.cfg.OriginWait, 0)))
	defer cancel()
	pk := PullKey(key)
	seen := map[peer.ID]bool{n.ID(): true}
	var members []peer.ID
	add := func(p peer.ID) {
		if !seen[p] && len(members) < maxElsewhere && n.host.Network().Connectedness(p) == network.Connected {
			seen[p] = true
			members = append(members, p)
		}
	}
	for _, p := range n.pullGroup(pk) {
		add(p)
	}
	now := time.Now()
	n.mu.Lock()
	var others []peer.ID
	for p, at := range n.pullPeers[pk] {
		if now.Sub(at) < openingGrace {
			others = append(others, p)
		}
	}
	n.mu.Unlock()
	for _, p := range others {
		add(p)
	}
	type answer struct {
		data   []byte
		coming int64
	}
	answers := make([]answer, len(members))
	var wg sync.WaitGroup
	for k, p := range members {
		wg.Go(func() {
			data, coming, _, err := n.askRange(ctx, p, key, i, size)
			if err != nil {
				data, coming = nil, -1
			}
			answers[k] = answer{data, coming}
		})
	}
	wg.Wait()
	reader, best := peer.ID(""), int64(0)
	for k, p := range members {
		a := answers[k]
		if a.data != nil {
			return p, a.data
		}
		// Reading it already (the furthest along); or queued there too —
		// p designated itself as well — and p, not this node, is the
		// pair's designee: both nodes compute the same, so exactly one of
		// them reads it.
		pair := a.coming == 0 && Designate(RangeID(key, i), []peer.ID{n.ID(), p}, n.ID()) == p
		if (a.coming >= 1 && a.coming > best) || (pair && reader == "") {
			reader, best = p, max(best, a.coming)
			progress[p] = a.coming
		}
	}
	return reader, nil
}

// RangeElsewhere is readingElsewhere for a caller that must not wait: the
// range from a member that holds it (data, from), or whether a member
// reads it upstream now or will (reading: FetchRange waits for it).
func (n *Node) RangeElsewhere(ctx context.Context, key string, i int, size int64) (data []byte, from peer.ID, reading bool) {
	if size <= 0 || size > MaxRangeSize {
		return nil, "", false
	}
	from, data = n.readingElsewhere(ctx, key, i, size, map[peer.ID]int64{})
	return data, from, data == nil && from != ""
}

// askRange asks p for range i of key once: the bytes (data, exactly size
// of them), or how far p's own read of it is (coming ≥ 0), or that p is
// not pulling the blob (notMember); coming is -1 when p neither holds nor
// reads it.
func (n *Node) askRange(ctx context.Context, p peer.ID, key string, i int, size int64) (data []byte, coming int64, notMember bool, err error) {
	coming = -1
	if _, err := n.prove(ctx, p, key); err != nil {
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: %w", i, key, p, err)
	}
	st, err := n.host.NewStream(ctx, p, ProtocolRange)
	if err != nil {
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: open stream: %w", i, key, p, err)
	}
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	_ = st.SetDeadline(time.Now().Add(n.cfg.FrameTimeout + time.Duration(size)*time.Second/minTransferRate))
	q := appendBytes(nil, []byte(key))
	q = binary.AppendUvarint(q, uint64(i))
	q = binary.AppendUvarint(q, 1) // MEMBER
	q = n.appendMembers(q, key)
	if _, err := st.Write(appendFrame(nil, q)); err != nil {
		st.Reset()
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: send: %w", i, key, p, err)
	}
	_ = st.CloseWrite()
	sent := time.Now()
	payload, err := readFrame(bufio.NewReaderSize(st, 64<<10), int(size)+1, nil)
	if err != nil {
		st.Reset()
		if ctx.Err() == nil { // not this node's own deadline or cancellation
			n.st.failedReqs.Add(1)
			n.peers.failure(p, n.cfg.FirstByteTimeout, time.Now())
		}
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: read: %w", i, key, p, err)
	}
	_ = st.Close()
	n.peers.success(p, time.Since(sent), 0)
	if len(payload) == 0 {
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: %w", i, key, p, ErrMalformed)
	}
	rest := payload[1:]
	switch payload[0] {
	case statusOK:
		if int64(len(rest)) != size {
			n.Strike(p)
			return nil, coming, false, fmt.Errorf("range %d of %s from %s: %d bytes, want %d: %w", i, key, p, len(rest), size, ErrBadBlock)
		}
		n.st.bytesDown.Add(int64(len(rest)))
		return rest, coming, false, nil
	case statusComing:
		d := decoder{b: rest}
		c := d.uvarint()
		if d.err != nil || c > uint64(size)+1 || !n.learnMembers(key, &d) {
			return nil, coming, false, fmt.Errorf("range %d of %s from %s: %w", i, key, p, ErrMalformed)
		}
		return nil, int64(c), false, nil
	case statusNotFound:
		d := decoder{b: rest}
		if !n.learnMembers(key, &d) {
			return nil, coming, false, fmt.Errorf("range %d of %s from %s: %w", i, key, p, ErrMalformed)
		}
	case statusNotMember:
		return nil, coming, true, nil
	case statusBusy:
		n.peers.busy(p, time.Now().Add(n.cfg.BusyBackoff))
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: %w", i, key, p, ErrBusy)
	case statusDenied:
		return nil, coming, false, fmt.Errorf("range %d of %s from %s: denied", i, key, p)
	}
	return nil, coming, false, nil
}

// appendMembers appends the pull's origin group as this node sees it
// (PullGroupSize peer IDs at most) to a COMING or NOT_FOUND answer:
//
//	members = uvarint(k) k × str(peer ID)
//
// Two nodes that joined a pull a moment apart may each have found members
// the other has not, and designate ranges differently; the asker adds
// these to its view (learnMembers), so the views converge on the lowest
// members of their union — the group every node uses — within a round
// trip, rather than both reading the ranges they disagree on.
func (n *Node) appendMembers(b []byte, key string) []byte {
	g := n.pullGroup(PullKey(key))
	if len(g) > PullGroupSize {
		g = g[:PullGroupSize]
	}
	b = binary.AppendUvarint(b, uint64(len(g)))
	for _, p := range g {
		b = appendBytes(b, []byte(p))
	}
	return b
}

// learnMembers reads a members list (appendMembers) and records, as
// members of the pull, those this node can dial (it knows an address);
// false if the list does not decode.
func (n *Node) learnMembers(key string, d *decoder) bool {
	k := d.uvarint()
	if d.err != nil || k > PullGroupSize {
		return false
	}
	var ids []peer.ID
	for range k {
		b := d.bytes(maxHintPeerLen)
		if d.err != nil {
			return false
		}
		id, err := peer.IDFromBytes(b)
		if err != nil {
			return false
		}
		ids = append(ids, id)
	}
	if len(d.b) != 0 {
		return false
	}
	pk := PullKey(key)
	for _, id := range ids {
		if id != n.ID() && len(n.host.Peerstore().Addrs(id)) > 0 {
			n.sawPullMember(pk, id)
		}
	}
	return true
}

// maxRangeRequest bounds a range request: the key, the index, the flags
// and the asker's members.
const maxRangeRequest = maxDigestLen + 24 + PullGroupSize*(maxHintPeerLen+2)

// maxRangeIndex bounds a requested range's index (a 64 GiB blob of 1 MiB
// ranges has 65,536).
const maxRangeIndex = 1 << 20

func (n *Node) handleRange(st network.Stream, g RangeGetter) {
	if !n.enter() {
		st.Reset()
		return
	}
	defer n.wg.Done()
	p := st.Conn().RemotePeer()
	_ = st.SetReadDeadline(time.Now().Add(requestTimeout))
	payload, err := readFrame(bufio.NewReaderSize(st, 512), maxRangeRequest, nil)
	if err != nil {
		st.Reset()
		return
	}
	d := decoder{b: payload}
	key := string(d.bytes(maxDigestLen))
	i := d.uvarint()
	flags := d.uvarint()
	if d.err != nil || i >= maxRangeIndex {
		st.Reset()
		return
	}
	members := d // read once the asker is admitted
	ctx, cancel := context.WithTimeout(n.life, n.cfg.UploadTimeout)
	defer cancel()
	answer := func(b []byte) {
		_ = st.SetWriteDeadline(time.Now().Add(writeTimeout + time.Duration(len(b))*time.Second/minTransferRate))
		if _, err := st.Write(appendFrame(nil, b)); err != nil {
			st.Reset()
			return
		}
		_ = st.Close()
	}
	if !n.admitted(ctx, p, key) {
		n.st.deniedSent.Add(1)
		answer([]byte{statusDenied})
		return
	}
	if !n.learnMembers(key, &members) {
		st.Reset()
		return
	}
	if flags&1 != 0 {
		n.sawPullMember(PullKey(key), p)
	}
	data, coming, ok := g.BlobRange(ctx, key, int(i))
	switch {
	case ok && len(data) <= MaxRangeSize:
	case coming >= 0:
		answer(n.appendMembers(binary.AppendUvarint([]byte{statusComing}, uint64(coming)), key))
		return
	case flags&1 != 0 && !n.opening(PullKey(key)):
		n.st.notMemberSent.Add(1)
		answer([]byte{statusNotMember})
		return
	default:
		n.st.notFound.Add(1)
		answer(n.appendMembers([]byte{statusNotFound}, key))
		return
	}
	up, _, preempted := n.up.acquire(p, func() { st.Reset() })
	if up == nil {
		n.st.busySent.Add(1)
		answer([]byte{statusBusy})
		return
	}
	defer up.release()
	if preempted != nil {
		n.st.uploadsPreempted.Add(1)
	}
	if err := n.up.pace(ctx, len(data)); err != nil {
		st.Reset()
		return
	}
	n.st.bytesUp.Add(int64(len(data)))
	n.peers.sent(p, int64(len(data)))
	answer(append([]byte{statusOK}, data...))
}
