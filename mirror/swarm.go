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

// SwarmPeers adapts a p2p node to Peers and PrivatePeers: blob provider
// records in the DHT, recipes over /shoal/recipe/1, blocks over
// /shoal/block/1, private blobs' names and proofs of access
// (/shoal/access/1). The node must also serve the mirror's recipes
// (p2p.Node.ServeRecipes with the Mirror).
func SwarmPeers(n *p2p.Node) Peers { return swarmPeers{n} }

type swarmPeers struct{ n *p2p.Node }

var (
	_ p2p.RecipeGetter = (*Mirror)(nil)
	_ p2p.RecipeBlocks = (*Mirror)(nil)
	_ PrivatePeers     = swarmPeers{}
)

// BlobBlocks returns the blocks a kept blob is cut into: what the node
// serves peers that ask for blocks under a public blob's digest or a
// private blob's name (p2p.RecipeBlocks; p2p serves a name only to peers
// that proved they know it). A private blob's digest has none to give.
func (m *Mirror) BlobBlocks(_ context.Context, key string) ([]flat.BlockID, bool) {
	d, ok := m.keyDigest(key)
	if !ok {
		return nil, false
	}
	r, _, ok := m.keep.recipeOnDisk(d, m.cfg.MaxBlobSize)
	if !ok {
		return nil, false
	}
	return r.ids, true
}

func (s swarmPeers) Providers(ctx context.Context, key string) ([]string, error) {
	ids, err := s.n.BlobProviders(ctx, key, maxProviders)
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = id.String()
	}
	return out, err
}

func (s swarmPeers) Recipe(ctx context.Context, p, key string) ([]byte, error) {
	id, err := peer.Decode(p)
	if err != nil {
		return nil, err
	}
	return s.n.FetchRecipe(ctx, id, key)
}

func (s swarmPeers) Blocks(ctx context.Context, p, key string, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	id, err := peer.Decode(p)
	if err != nil {
		return nil, err
	}
	got, err := s.n.FetchBlobBlocks(ctx, id, key, blocks)
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

func (s swarmPeers) Provide(ctx context.Context, key string) error {
	return s.n.ProvideBlob(ctx, key)
}

// AddPrivate registers a private blob with the node under the secret its
// digest and window give (p2p.PrivateBlob).
func (s swarmPeers) AddPrivate(digest string, window []byte) string {
	_, secret := p2p.PrivateBlob(digest, window)
	return s.n.AddPrivate(secret)
}

func (s swarmPeers) RemovePrivate(name string) { s.n.RemovePrivate(name) }

var _ RangePeers = swarmPeers{}

func (s swarmPeers) JoinPull(ctx context.Context, key string) (int, error) {
	return s.n.JoinPull(ctx, key)
}

func (s swarmPeers) Designated(key string, i int) bool {
	d := s.n.RangeDesignee(key, i)
	return d == "" || d == s.n.ID()
}

func (s swarmPeers) Range(ctx context.Context, key string, i int, n int64) ([]byte, string, error) {
	data, from, err := s.n.FetchRange(ctx, key, i, n)
	return data, from.String(), err
}

func (s swarmPeers) Elsewhere(ctx context.Context, key string, i int, n int64) ([]byte, string, bool) {
	data, from, reading := s.n.RangeElsewhere(ctx, key, i, n)
	return data, from.String(), reading
}
