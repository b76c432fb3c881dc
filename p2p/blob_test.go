package p2p

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// recipeMap serves fixed recipes, and says which blocks each blob is cut
// into (RecipeBlocks).
type recipeMap map[string]testRecipe

type testRecipe struct {
	raw    []byte
	blocks []flat.BlockID
}

func (m recipeMap) Recipe(_ context.Context, d string) ([]byte, error) {
	if r, ok := m[d]; ok {
		return r.raw, nil
	}
	return nil, errors.New("no such blob")
}

func (m recipeMap) BlobBlocks(_ context.Context, d string) ([]flat.BlockID, bool) {
	r, ok := m[d]
	return r.blocks, ok
}

func blockIDs(bs []flat.Block) []flat.BlockID {
	ids := make([]flat.BlockID, len(bs))
	for i, b := range bs {
		ids[i] = b.ID
	}
	return ids
}

// TestBlobExchange: a blob's provider is found by its digest, serves its
// recipe (NOT_FOUND for others) and its blocks; a wrong block is a strike.
func TestBlobExchange(t *testing.T) {
	t.Parallel()
	im := newTestImage("blob", 4, 64<<10)
	digest := "sha256:" + strings.Repeat("ab", 32)
	other := "sha256:" + strings.Repeat("cd", 32)
	recipe := []byte("opaque recipe bytes")

	recipes := recipeMap{digest: {raw: recipe, blocks: blockIDs(im.index.Blocks[1:])}}
	a := startNode(t, Config{Blocks: openStore(t, im, nil)})
	a.ServeRecipes(recipes)
	b := startNode(t, Config{BootstrapPeers: a.Addrs()})
	eventually(t, 10*time.Second, "B to connect to A", func() bool { return len(b.host.Network().Peers()) > 0 })

	if err := a.ProvideBlob(t.Context(), digest); err != nil {
		t.Logf("provide (held locally): %v", err)
	}
	if err := a.ProvideBlob(t.Context(), "sha256:short"); !errors.Is(err, ErrBadDigest) {
		t.Errorf("bad digest provided: %v", err)
	}
	provs, err := b.BlobProviders(t.Context(), digest, 4)
	if err != nil || len(provs) != 1 || provs[0] != a.ID() {
		t.Fatalf("providers of the blob: %v, %v", provs, err)
	}
	got, err := b.FetchRecipe(t.Context(), a.ID(), digest)
	if err != nil || !bytes.Equal(got, recipe) {
		t.Fatalf("recipe: %q, %v", got, err)
	}
	if _, err := b.FetchRecipe(t.Context(), a.ID(), other); !errors.Is(err, ErrNoRecipe) {
		t.Errorf("recipe of a blob A does not hold: %v", err)
	}
	if _, err := a.FetchRecipe(t.Context(), b.ID(), digest); err == nil {
		t.Error("a node that serves no recipes answered")
	}

	// The blob's blocks are served under it; a block A holds that is not
	// in the blob's recipe is not.
	blocks := im.index.Blocks[1:]
	data, err := b.FetchBlobBlocks(t.Context(), a.ID(), digest, im.index.Blocks)
	if err != nil || len(data) != len(blocks) || data[im.index.Blocks[0].ID] != nil {
		t.Fatalf("blocks: %d of %d, %v; want all but the first, which is not the blob's", len(data), len(blocks), err)
	}
	checkBlocks(t, im, data)
	if data, err := b.FetchBlobBlocks(t.Context(), a.ID(), other, blocks); err != nil || len(data) != 0 {
		t.Errorf("blocks under a blob A does not keep: %d, %v; want none", len(data), err)
	}

	// A node whose store returns wrong bytes: the block is refused and
	// the node struck.
	c := startNode(t, Config{Blocks: corruptGetter{openStore(t, im, nil)}})
	c.ServeRecipes(recipes)
	if err := b.Connect(t.Context(), c.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	_, err = b.FetchBlobBlocks(t.Context(), c.ID(), digest, blocks[:1])
	if !errors.Is(err, ErrBadBlock) {
		t.Errorf("corrupt block: %v", err)
	}
	if info, ok := b.PeerInfo(c.ID()); !ok || info.BadBlocks != 1 {
		t.Errorf("corrupt peer not struck: %+v", info)
	}
	if _, err := b.FetchBlobBlocks(t.Context(), a.ID(), digest, make([]flat.Block, MaxRequestBlocks+1)); err == nil {
		t.Error("oversized request accepted")
	}
}

// TestBlobProvidersResting: a provider resting after BUSY is still
// returned, after the others (the mirror paces its retries; leaving it out
// sent a whole layer upstream), and a provider avoided after bad data is
// left out.
func TestBlobProvidersResting(t *testing.T) {
	t.Parallel()
	digest := "sha256:" + strings.Repeat("ef", 32)
	a := startNode(t, Config{})
	c := startNode(t, Config{BootstrapPeers: a.Addrs()})
	b := startNode(t, Config{BootstrapPeers: a.Addrs(), BadBlockStrikes: 1})
	for _, n := range []*Node{a, c} {
		if err := n.ProvideBlob(t.Context(), digest); err != nil {
			t.Logf("provide (held locally): %v", err)
		}
	}
	if err := b.Connect(t.Context(), c.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	find := func() []string {
		t.Helper()
		provs, err := b.BlobProviders(t.Context(), digest, 4)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, p := range provs {
			out = append(out, map[peer.ID]string{a.ID(): "A", c.ID(): "C"}[p])
		}
		return out
	}
	eventually(t, 10*time.Second, "B to find both providers", func() bool { return len(find()) == 2 })

	b.peers.busy(a.ID(), time.Now().Add(time.Minute))
	if got := find(); !slices.Equal(got, []string{"C", "A"}) {
		t.Errorf("A resting after BUSY: providers %v, want [C A]", got)
	}
	b.Strike(c.ID())
	if got := find(); !slices.Equal(got, []string{"A"}) {
		t.Errorf("C avoided after bad data: providers %v, want [A]", got)
	}
}
