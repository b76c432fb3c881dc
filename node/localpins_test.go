package node

import (
	"bytes"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/shoal-project/shoal/flat"
)

// TestLocalPinsLRU converts three images locally into a cache whose quota
// holds all three, with pins allowed half of it: the least recently used
// image that is not mounted has its pins released, its blocks stay cached
// and a later use pins them again without a pull; ordinary writes still fit.
func TestLocalPinsLRU(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	t.Parallel()
	ctx := t.Context()
	reg := memRegistry(t)
	const size = 1 << 20
	for i, name := range []string{"a", "b", "c"} {
		data := make([]byte, size) // incompressible: each image pins about size bytes
		_, _ = rand.NewChaCha8([32]byte{byte(i + 1)}).Read(data)
		pushImage(t, reg+"/"+name+":v1", map[string]string{"data": string(data)})
	}
	var notices bytes.Buffer
	n, err := Open(ctx, t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithNotices(&notices),
		WithCacheQuota(3*size+size/2))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	budget := int64(float64(3*size+size/2) * localPinShare)
	resolve := func(name string) *Image {
		t.Helper()
		img, err := n.Resolve(ctx, reg+"/"+name+":v1")
		if err != nil || !img.Local {
			t.Fatalf("Resolve %s: %v (want a local conversion)", name, err)
		}
		return img
	}
	// pinned reports whether every block of img is pinned (true) or none
	// is (false); it fails the test if they are mixed or a block is gone.
	pinned := func(name string, img *Image) bool {
		t.Helper()
		var yes, no int
		for _, b := range img.Index.Blocks {
			if ok, _ := n.Store().Has(ctx, b.ID); !ok {
				t.Fatalf("image %s: block %s no longer cached", name, b.ID)
			}
			if c, _ := n.Store().PinCount(b.ID); c > 0 {
				yes++
			} else {
				no++
			}
		}
		if yes > 0 && no > 0 {
			t.Fatalf("image %s: %d blocks pinned, %d not", name, yes, no)
		}
		return yes > 0
	}

	a := resolve("a")
	b := resolve("b") // a and b pin more than the budget: a, the older, is released
	if !pinned("b", b) || pinned("a", a) {
		t.Fatalf("after converting a then b: pinned a=%v b=%v; want only b", pinned("a", a), pinned("b", b))
	}
	if got := n.Store().Stats().PinnedBytes; got > budget {
		t.Errorf("pinned %d bytes; budget %d", got, budget)
	}

	// A mounted image keeps its pins even as the least recently used.
	m, err := n.Mount(ctx, b, "")
	if err != nil {
		t.Fatal(err)
	}
	c := resolve("c")
	if !pinned("b", b) || !pinned("c", c) {
		t.Errorf("with b mounted, converting c: pinned b=%v c=%v; want both", pinned("b", b), pinned("c", c))
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}

	// Using a again pins its cached blocks, without a pull, and releases
	// b, then c, the least recently used, to get back within the budget.
	notices.Reset()
	a = resolve("a")
	if notices.Len() != 0 {
		t.Errorf("using a released image converted it again: %q", notices.String())
	}
	if !pinned("a", a) || pinned("b", b) || pinned("c", c) {
		t.Errorf("after using a again: pinned a=%v b=%v c=%v; want only a", pinned("a", a), pinned("b", b), pinned("c", c))
	}
	if got := n.Store().Stats().PinnedBytes; got > budget {
		t.Errorf("pinned %d bytes; budget %d", got, budget)
	}
	// All three images are cached and fill most of the quota; an ordinary
	// block still fits (eviction takes unpinned blocks of b and c).
	blk := make([]byte, size)
	_, _ = rand.NewChaCha8([32]byte{9}).Read(blk)
	if err := n.Store().Put(ctx, flat.Sum(blk), blk); err != nil {
		t.Errorf("Put of an ordinary block with three local images cached: %v", err)
	}
}
