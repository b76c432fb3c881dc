package p2p

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// An image's peers hold its index (the node keeps the index blob in its
// block cache, as a block whose ID is the blob's sha256): ImageIndex fetches
// it from them, so that a rollout costs the registry the manifest per node
// (about a kilobyte) rather than manifest plus index (about 120 KB for a
// Debian image; 1% of the bytes python reads at start, times every node).
// The lookup that finds the peers is kept for the JoinImage that follows,
// so a node start still costs one DHT lookup.

// foundLifetime is how long a lookup's providers are reused.
const foundLifetime = 30 * time.Second

// indexPeers is how many providers ImageIndex asks, one after the other.
const indexPeers = 3

// ErrNoIndex means no peer of the image delivered its index.
var ErrNoIndex = errors.New("no peer delivered the image's index")

type foundProviders struct {
	at    time.Time
	provs []peer.AddrInfo
}

// providers returns the providers of key: those of a lookup made in the
// last foundLifetime if it found at least reuse of them, or a new lookup's
// (up to DiscoveryPool, in the DHT's order). The index needs one provider
// (reuse 1); JoinImage's discovery reuses the index lookup only if it found
// a full set of MaxImagePeers: when a whole swarm starts at once, the index
// lookup runs before most records are out, and discovery, after its own
// provide, must look again or it would settle for the first few nodes.
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
	n.mu.Unlock()
	return provs, nil
}

// ImageIndex fetches the index blob of the flat image whose manifest digest
// is digest (its sha256 is id, its size size) from up to indexPeers of the
// image's providers, picked at random. The blob comes back verified against
// id; a peer sending wrong bytes gets a strike.
func (n *Node) ImageIndex(ctx context.Context, digest string, id flat.BlockID, size int64) ([]byte, error) {
	if size <= 0 || size > flat.MaxBlockSize {
		return nil, fmt.Errorf("index of %s: %d bytes is more than peers serve in one block", digest, size)
	}
	key, err := ImageKey(digest)
	if err != nil {
		return nil, err
	}
	if len(n.host.Network().Peers()) == 0 {
		n.bootstrap(ctx)
	}
	n.waitRoutingTable(ctx, 2*time.Second)
	provs, err := n.providers(ctx, key, 1)
	if err != nil {
		return nil, fmt.Errorf("index of %s: %w", digest, err)
	}
	blk := flat.Block{ID: id, ULen: uint32(size)}
	now := n.cfg.Clock.Now()
	asked := 0
	var last error
	for _, ai := range SampleProviders(provs, len(provs), rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))) {
		if asked == indexPeers || ctx.Err() != nil {
			break
		}
		if !n.peers.usable(ai.ID, now) {
			continue
		}
		asked++
		if err := n.connect(ctx, ai); err != nil {
			last = err
			continue
		}
		// One block, requested and booked as a blob's blocks are.
		got, err := n.FetchBlobBlocks(ctx, ai.ID, digest, []flat.Block{blk})
		if data, ok := got[id]; ok {
			n.st.indexesFetched.Add(1)
			return data, nil
		}
		last = cmp.Or(err, fmt.Errorf("peer %s does not hold it", ai.ID))
	}
	if last == nil {
		return nil, fmt.Errorf("index of %s: %w: no provider to ask", digest, ErrNoIndex)
	}
	return nil, fmt.Errorf("index of %s: %w (%d asked; last: %v)", digest, ErrNoIndex, asked, last)
}
