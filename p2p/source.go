package p2p

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

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
// say they hold them. It satisfies fetch.Source and goes in the chain after
// the cache and before the registry: what it cannot get quickly falls
// through. (*PeerSource) satisfies fetch.Source; the tests assert it, so
// that this package does not import the chain.
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

// FetchMany implements fetch.Source. For each block it picks a holder —
// same zone (and rack) first, then the lowest latency, at random among
// equals — asks each peer for its blocks in batched requests, and verifies
// every block it receives. A peer that sends a wrong block is penalised and
// not asked again in this call; one that is busy, slow (FirstByteTimeout)
// or gone is skipped the same way, and its blocks are asked of the next
// holder. What no holder delivered is left out, with an error saying why,
// for the next source.
func (ps *PeerSource) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	n := ps.n
	out := make(map[flat.BlockID][]byte, len(blocks))
	want := make([]flat.Block, 0, len(blocks))
	seen := make(map[flat.BlockID]bool, len(blocks))
	for _, b := range blocks {
		if !seen[b.ID] {
			seen[b.ID] = true
			want = append(want, b)
		}
	}
	total := len(want)
	excluded := map[peer.ID]bool{}               // peers that failed this call
	tried := map[flat.BlockID]map[peer.ID]bool{} // NOT_FOUND answers
	var errBusy, errBad, errFail error
	for round := 0; round < maxRounds && len(want) > 0 && ctx.Err() == nil; round++ {
		plan, _ := ps.plan(want, tried, excluded)
		if len(plan) == 0 {
			break
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		slots := make(chan struct{}, parallelPeers)
		for p, bs := range plan {
			wg.Go(func() {
				slots <- struct{}{}
				defer func() { <-slots }()
				for _, batch := range batches(bs) {
					o := n.request(ctx, p, ps.image, batch)
					mu.Lock()
					for id, data := range o.got {
						out[id] = data
					}
					for _, b := range o.notFound {
						if tried[b.ID] == nil {
							tried[b.ID] = map[peer.ID]bool{}
						}
						tried[b.ID][p] = true
					}
					stop := o.err != nil
					if stop {
						excluded[p] = true
					}
					mu.Unlock()
					for _, b := range o.notFound {
						n.forget(p, b.ID)
					}
					now := time.Now()
					switch {
					case o.bad:
						n.st.badBlocks.Add(1)
						avoided := n.peers.strike(p, n.cfg.BadBlockStrikes, n.cfg.PenaltyCoolDown, now)
						n.log.Warn("peer sent a wrong block; asking elsewhere", "peer", p.String(), "image", ps.image, "avoided", avoided, "err", o.err)
						mu.Lock()
						errBad = cmp.Or(errBad, fmt.Errorf("peer %s: %w", p, o.err))
						mu.Unlock()
					case o.busy:
						n.st.busyRecv.Add(1)
						n.peers.busy(p, now.Add(n.cfg.BusyBackoff))
						mu.Lock()
						errBusy = cmp.Or(errBusy, fmt.Errorf("peer %s: %w", p, ErrBusy))
						mu.Unlock()
					case o.err != nil:
						n.st.failedReqs.Add(1)
						if ctx.Err() == nil {
							n.peers.failure(p, n.cfg.FirstByteTimeout, now)
						}
						n.log.Debug("peer request failed; asking elsewhere", "peer", p.String(), "image", ps.image, "err", o.err)
						mu.Lock()
						errFail = cmp.Or(errFail, fmt.Errorf("peer %s: %w", p, o.err))
						mu.Unlock()
					default:
						n.peers.success(p, o.firstByte, len(o.got))
					}
					if stop {
						return
					}
				}
			})
		}
		wg.Wait()
		still := want[:0]
		for _, b := range want {
			if _, ok := out[b.ID]; !ok {
				still = append(still, b)
			}
		}
		want = still
	}
	if len(want) == 0 {
		return out, nil
	}
	if err := ctx.Err(); err != nil {
		return out, err
	}
	reason := errors.Join(errBad, errBusy, errFail)
	if reason == nil {
		reason = ErrNoHolder
	}
	return out, fmt.Errorf("%d of %d blocks not fetched from peers: %w", len(want), total, reason)
}

// plan assigns each wanted block to the best holder that may be asked: not
// excluded, not known to lack it, not avoided or resting. Blocks with no
// such holder are returned apart. This is where hedging (a second request
// to the next holder after a latency budget) and origin coalescing (waiting
// a bounded time for the block's designated fetcher) will plug in.
func (ps *PeerSource) plan(want []flat.Block, tried map[flat.BlockID]map[peer.ID]bool, excluded map[peer.ID]bool) (map[peer.ID][]flat.Block, []flat.Block) {
	n := ps.n
	now := time.Now()
	type score struct {
		r   rank
		tie uint32
		ok  bool
	}
	scores := map[peer.ID]*score{}
	scoreOf := func(p peer.ID) *score {
		if s := scores[p]; s != nil {
			return s
		}
		s := &score{tie: rand.Uint32()}
		if !excluded[p] {
			n.peers.mu.Lock()
			s.r, s.ok = n.peers.usable(p, n.cfg.Zone, n.cfg.Rack, now)
			n.peers.mu.Unlock()
		}
		scores[p] = s
		return s
	}
	plan := map[peer.ID][]flat.Block{}
	var none []flat.Block
	for _, b := range want {
		var best peer.ID
		var bs *score
		for _, p := range n.holders(b.ID) {
			if tried[b.ID][p] {
				continue
			}
			s := scoreOf(p)
			if !s.ok {
				continue
			}
			if bs == nil || s.r.less(bs.r) || (s.r == bs.r && s.tie < bs.tie) {
				best, bs = p, s
			}
		}
		if bs == nil {
			none = append(none, b)
			continue
		}
		plan[best] = append(plan[best], b)
	}
	return plan, none
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
