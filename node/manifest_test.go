package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// blobPeers is a stand-in swarm (Peers, fetch.IndexSource and
// fetch.ManifestSource) whose peers are one other node's block cache, or
// nobody (from nil). At the index request it notes whether the asking node
// already keeps the manifest.
type blobPeers struct {
	from *Node // the peer's cache; nil: no peer holds anything
	self *Node // the node that asks

	mu              sync.Mutex
	manifests       int
	indexes         int
	manifestAtIndex bool
	manifestsAsked  []v1.Descriptor
	servedFromPeers int
	joined, sourced []string // the names JoinImage and PeerSource were called with
}

// ImageName names a public image by its digest, a private one by a name
// that is not its digest, as the swarm does.
func (p *blobPeers) ImageName(m fetch.Manifest) string {
	if m.Public {
		return m.Desc.Digest.String()
	}
	return "private-" + m.Desc.Digest.Hex
}

func (p *blobPeers) JoinImage(_ context.Context, image string, _ *flat.Index) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.joined = append(p.joined, image)
	return nil
}

func (p *blobPeers) PeerSource(image string) fetch.Source {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sourced = append(p.sourced, image)
	return noPeers{}
}

func (p *blobPeers) Announce(...flat.BlockID) {}

func (p *blobPeers) get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	if p.from == nil {
		return nil, errors.New("no peer holds it")
	}
	d, err := p.from.Store().Get(ctx, id)
	if err == nil {
		p.mu.Lock()
		p.servedFromPeers++
		p.mu.Unlock()
	}
	return d, err
}

func (p *blobPeers) FetchManifest(ctx context.Context, desc v1.Descriptor) ([]byte, error) {
	p.mu.Lock()
	p.manifests++
	p.manifestsAsked = append(p.manifestsAsked, desc)
	p.mu.Unlock()
	id, err := idOf(desc.Digest.String())
	if err != nil {
		return nil, err
	}
	return p.get(ctx, id)
}

func (p *blobPeers) FetchIndex(ctx context.Context, m fetch.Manifest, index v1.Descriptor) ([]byte, error) {
	mid, err := idOf(m.Desc.Digest.String())
	if err != nil {
		return nil, err
	}
	has, _ := p.self.Store().Has(ctx, mid)
	p.mu.Lock()
	p.indexes++
	p.manifestAtIndex = has
	p.mu.Unlock()
	id, err := idOf(index.Digest.Hex)
	if err != nil {
		return nil, err
	}
	return p.get(ctx, id)
}

// noPeers is a PeerSource with no peers.
type noPeers struct{}

func (noPeers) Name() string { return "peers" }
func (noPeers) FetchMany(context.Context, []flat.Block) (map[flat.BlockID][]byte, error) {
	return nil, errors.New("no peers")
}

// idOf returns the block ID of a "sha256:<hex>" digest (or bare hex).
func idOf(digest string) (flat.BlockID, error) {
	var id flat.BlockID
	raw, err := hex.DecodeString(strings.TrimPrefix(digest, "sha256:"))
	if err != nil || len(raw) != len(id) {
		return id, fmt.Errorf("digest %q: not sha256", digest)
	}
	return flat.BlockID(raw), nil
}

// Resolve keeps the flat manifest in the block cache beside the index
// blob, and keeps it before it asks for the index (so the swarm's
// designated fetcher of the manifest serves it while it waits for the
// index); a second node has both from the first one's cache and keeps them
// too.
func TestResolveKeepsManifestForPeers(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	pushImage(t, reg+"/app:v1", map[string]string{"hello": "manifest"})
	res, err := converter.Convert(t.Context(), reg+"/app:v1", "", converter.WithPlainHTTP(true), converter.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	open := func(p *blobPeers) *Node {
		t.Helper()
		n, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithPeers(p), WithVisibility(probePublic(t)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = n.Close() })
		p.self = n
		return n
	}
	manifestID, err := idOf(res.Digest)
	if err != nil {
		t.Fatal(err)
	}

	// A: nobody holds anything; both blobs come from the registry.
	pa := &blobPeers{}
	a := open(pa)
	img, err := a.Resolve(t.Context(), reg+"/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != res.Digest {
		t.Fatalf("resolved %s, want %s", img.Digest, res.Digest)
	}
	manifest, err := a.Store().Get(t.Context(), manifestID)
	if err != nil || !manifestID.Verify(manifest) {
		t.Fatalf("A's cache does not keep the manifest %s: %v", res.Digest, err)
	}
	if pa.manifests != 1 || pa.indexes != 1 || !pa.manifestAtIndex {
		t.Errorf("A: %d manifest and %d index requests to peers; manifest kept before the index was asked for: %v",
			pa.manifests, pa.indexes, pa.manifestAtIndex)
	}
	if pa.manifestsAsked[0].Digest.String() != res.Digest || pa.manifestsAsked[0].Size != int64(len(manifest)) {
		t.Errorf("A asked the peers for %+v, want %s of %d bytes", pa.manifestsAsked[0], res.Digest, len(manifest))
	}

	// B: A is its peer; both blobs come from A's cache, and B keeps them.
	pb := &blobPeers{from: a}
	b := open(pb)
	imgB, err := b.Resolve(t.Context(), reg+"/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	if imgB.Digest != res.Digest || pb.servedFromPeers != 2 {
		t.Errorf("B resolved %s with %d blobs from A, want %s and 2", imgB.Digest, pb.servedFromPeers, res.Digest)
	}
	if got, err := b.Store().Get(t.Context(), manifestID); err != nil || !bytes.Equal(got, manifest) {
		t.Errorf("B does not keep the manifest it had from A: %v", err)
	}
}

// probePublic is a Visibility that probes registries for anonymous reads.
func probePublic(t *testing.T) *fetch.Visibility {
	t.Helper()
	v, err := fetch.NewVisibility(nil, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// staticKeychain hands out one account for every registry.
type staticKeychain struct{ user, pass string }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return &authn.Basic{Username: k.user, Password: k.pass}, nil
}

// A private image (its registry refuses anonymous reads): Resolve reads
// the manifest from the registry with the node's credentials, never asks
// the swarm for it nor keeps it for peers, joins the image's swarm under
// the name the swarm gives it (not its digest), and says it is private.
func TestResolvePrivateImage(t *testing.T) {
	t.Parallel()
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	open := httptest.NewServer(h)
	t.Cleanup(open.Close)
	locked := httptest.NewServer(testenv.BasicAuth(h, "u", "p", nil))
	t.Cleanup(locked.Close)
	pushImage(t, strings.TrimPrefix(open.URL, "http://")+"/app:v1", map[string]string{"hello": "private"})
	if _, err := converter.Convert(t.Context(), strings.TrimPrefix(open.URL, "http://")+"/app:v1", "", converter.WithPlainHTTP(true), converter.WithLogger(quiet)); err != nil {
		t.Fatal(err)
	}
	ref := strings.TrimPrefix(locked.URL, "http://") + "/app:v1"
	p := &blobPeers{}
	n, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithPeers(p),
		WithVisibility(probePublic(t)), WithKeychain(staticKeychain{"u", "p"}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	p.self = n
	img, err := n.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	want := "private-" + strings.TrimPrefix(img.Digest, "sha256:")
	if !img.Private || img.SwarmName != want {
		t.Errorf("private %v, swarm name %q; want private, %q", img.Private, img.SwarmName, want)
	}
	if p.manifests != 0 {
		t.Errorf("the swarm was asked for a private manifest %d times", p.manifests)
	}
	if len(p.joined) != 1 || p.joined[0] != want || len(p.sourced) != 1 || p.sourced[0] != want {
		t.Errorf("joined %v, peer source for %v; want the swarm name", p.joined, p.sourced)
	}
	id, _ := idOf(img.Digest)
	if has, _ := n.Store().Has(t.Context(), id); has {
		t.Error("the private manifest was kept for peers")
	}

	// The same image from the open registry is public, named by digest.
	pp := &blobPeers{}
	m, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithPeers(pp), WithVisibility(probePublic(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	pp.self = m
	pub, err := m.Resolve(t.Context(), strings.TrimPrefix(open.URL, "http://")+"/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	if pub.Private || pub.SwarmName != pub.Digest || pub.Digest != img.Digest {
		t.Errorf("public: private %v, swarm name %q, digest %s; want public, named %s", pub.Private, pub.SwarmName, pub.Digest, img.Digest)
	}
}
