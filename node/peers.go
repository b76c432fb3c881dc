package node

import (
	"context"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// Peers is the swarm as the node sees it (the daemon's adapter of
// p2p.Node satisfies it): naming an image in the swarm, joining its swarm,
// a fetch source for its blocks, and announcing blocks as soon as they are
// verified and stored. JoinImage, PeerSource and OriginServer.ServeOrigin
// take the image's name, which ImageName gives: a public image's is its
// manifest digest; a private one's derives from its manifest's bytes, and
// the swarm shares it only with nodes that prove they hold them too.
type Peers interface {
	ImageName(m fetch.Manifest) string
	JoinImage(ctx context.Context, image string, index *flat.Index) error
	PeerSource(image string) fetch.Source
	Announce(ids ...flat.BlockID)
}

// BlockFetcher fetches blocks of one image; *fetch.Chain satisfies it. It
// is an alias of an unnamed interface, the same type as p2p.ImageFetcher,
// so that p2p.Node satisfies OriginServer without either package importing
// the other.
type BlockFetcher = interface {
	FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error)
}

// OriginServer is an optional extension of Peers (p2p.Node has it): the
// swarm fetches blocks from their origin through what it is given here —
// for peers that ask this node as a block's designated fetcher (origin
// coalescing), and for the blocks this node is designated for itself.
// Resolve offers it, before joining the image's swarm, a cache-backed
// registry chain for the image; ServeOrigin keeps the first one it is
// offered per image and returns the one it keeps, which Resolve makes the
// registry source of the image's chain. A block is then fetched from the
// registry once however many local reads, mounts and peers want it at the
// same time.
type OriginServer interface {
	ServeOrigin(digest string, origin BlockFetcher) BlockFetcher
}

// WithPeers puts the swarm in front of the registry in every chain, and
// announces every block the node stores (default: no peers).
func WithPeers(p Peers) Option { return func(c *config) error { c.peers = p; return nil } }

// announcingCache announces each block to the swarm once the cache holds it.
type announcingCache struct {
	fetch.Cache
	peers Peers
}

func (a announcingCache) Put(ctx context.Context, id flat.BlockID, data []byte) error {
	if err := a.Cache.Put(ctx, id, data); err != nil {
		return err
	}
	a.peers.Announce(id)
	return nil
}

// registrySource puts the chain over the cache and the registry alone in
// the registry's place in an image's chain: what it delivers is counted
// there as registry bytes.
type registrySource struct{ BlockFetcher }

func (registrySource) Name() string { return fetch.RegistryName }
