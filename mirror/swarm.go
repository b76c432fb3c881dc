package mirror

import (
	"context"
	"errors"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/p2p"
)

// maxProviders bounds the providers asked per blob.
const maxProviders = 8

// SwarmPeers adapts a p2p node to Peers: blob provider records in the DHT,
// recipes over /shoal/recipe/1, blocks over /shoal/block/1. The node must
// also serve the mirror's recipes (p2p.Node.ServeRecipes with the Mirror).
func SwarmPeers(n *p2p.Node) Peers { return swarmPeers{n} }

type swarmPeers struct{ n *p2p.Node }

var (
	_ p2p.RecipeGetter = (*Mirror)(nil)
	_ p2p.RecipeBlocks = (*Mirror)(nil)
)

// BlobBlocks returns the blocks a public blob kept whole is cut into: what
// the node serves peers that ask for blocks under the blob's digest
// (p2p.RecipeBlocks). Blobs that are not public have none to give.
func (m *Mirror) BlobBlocks(_ context.Context, digest string) ([]flat.BlockID, bool) {
	if _, ok := parseDigest(digest); !ok || m.keep.class(digest) != classPublic {
		return nil, false
	}
	r, _, ok := m.keep.recipeOnDisk(digest, m.cfg.MaxBlobSize)
	if !ok {
		return nil, false
	}
	return r.ids, true
}

func (s swarmPeers) Providers(ctx context.Context, digest string) ([]string, error) {
	ids, err := s.n.BlobProviders(ctx, digest, maxProviders)
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = id.String()
	}
	return out, err
}

func (s swarmPeers) Recipe(ctx context.Context, p, digest string) ([]byte, error) {
	id, err := peer.Decode(p)
	if err != nil {
		return nil, err
	}
	return s.n.FetchRecipe(ctx, id, digest)
}

func (s swarmPeers) Blocks(ctx context.Context, p, digest string, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	id, err := peer.Decode(p)
	if err != nil {
		return nil, err
	}
	got, err := s.n.FetchBlobBlocks(ctx, id, digest, blocks)
	switch {
	case errors.Is(err, p2p.ErrBadBlock):
		err = fmt.Errorf("%w: %w", ErrBadPeer, err)
	case errors.Is(err, p2p.ErrBusy):
		err = fmt.Errorf("%w: %w", ErrPeerBusy, err)
	}
	return got, err
}

func (s swarmPeers) Strike(p string) {
	if id, err := peer.Decode(p); err == nil {
		s.n.Strike(id)
	}
}

func (s swarmPeers) Provide(ctx context.Context, digest string) error {
	return s.n.ProvideBlob(ctx, digest)
}
