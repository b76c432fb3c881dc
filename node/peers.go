package node

import (
	"context"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// Peers is the swarm as the node sees it (p2p.Node satisfies it): joining
// an image's swarm, a fetch source for its blocks, and announcing blocks as
// soon as they are verified and stored.
type Peers interface {
	JoinImage(ctx context.Context, digest string, index *flat.Index) error
	PeerSource(image string) fetch.Source
	Announce(ids ...flat.BlockID)
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
