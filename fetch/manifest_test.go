package fetch

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// manifestCounter serves a registry handler and records every manifest
// request (method and path) and every whole-blob GET; with failHead set it
// answers manifest HEADs 500.
type manifestCounter struct {
	Host     string
	h        http.Handler
	failHead bool

	mu        sync.Mutex
	manifests []string // "GET /v2/app/manifests/v1-shoal", ...
	blobGETs  []string // paths of blob GETs without a Range
}

func newManifestCounter(t *testing.T, h http.Handler, failHead bool) *manifestCounter {
	t.Helper()
	c := &manifestCounter{h: h, failHead: failHead}
	s := httptest.NewServer(c)
	t.Cleanup(s.Close)
	c.Host = strings.TrimPrefix(s.URL, "http://")
	return c
}

func (c *manifestCounter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	switch {
	case strings.Contains(r.URL.Path, "/manifests/"):
		c.manifests = append(c.manifests, r.Method+" "+r.URL.Path)
	case strings.Contains(r.URL.Path, "/blobs/") && r.Method == http.MethodGet && r.Header.Get("Range") == "":
		c.blobGETs = append(c.blobGETs, r.URL.Path)
	}
	c.mu.Unlock()
	if c.failHead && r.Method == http.MethodHead && strings.Contains(r.URL.Path, "/manifests/") {
		http.Error(w, "injected failure", http.StatusInternalServerError)
		return
	}
	c.h.ServeHTTP(w, r)
}

// requests returns the manifest requests with the given method.
func (c *manifestCounter) requests(method string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, m := range c.manifests {
		if p, ok := strings.CutPrefix(m, method+" "); ok {
			out = append(out, p)
		}
	}
	return out
}

func (c *manifestCounter) blobs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.blobGETs)
}

// peerSource stands in for the swarm: an IndexSource and ManifestSource
// that serves what it is given, and records what it was asked and when
// OpenImage's manifest hook ran relative to the index request.
type peerSource struct {
	manifest func(v1.Descriptor) ([]byte, error)
	index    []byte

	mu              sync.Mutex
	asked           []v1.Descriptor
	indexAsked      int
	keptBeforeIndex bool
	kept            [][]byte
	keptPublic      []bool
	indexFor        []Manifest // the manifests FetchIndex was called with
}

func (p *peerSource) FetchManifest(_ context.Context, desc v1.Descriptor) ([]byte, error) {
	p.mu.Lock()
	p.asked = append(p.asked, desc)
	p.mu.Unlock()
	return p.manifest(desc)
}

func (p *peerSource) FetchIndex(_ context.Context, m Manifest, _ v1.Descriptor) ([]byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.indexAsked++
	p.indexFor = append(p.indexFor, m)
	p.keptBeforeIndex = len(p.kept) > 0
	if p.index == nil {
		return nil, errors.New("no peer holds it")
	}
	return p.index, nil
}

func (p *peerSource) keep(_ context.Context, m Manifest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.kept = append(p.kept, slices.Clone(m.Raw))
	p.keptPublic = append(p.keptPublic, m.Public)
}

// opts opens with p as the swarm, the test registries being public (they
// serve anonymous reads, which the visibility probe finds).
func (p *peerSource) opts() []Option {
	return []Option{WithPlainHTTP(true), WithLogger(quiet()), WithRetries(DefaultAttempts, 0),
		WithIndexSource(p), WithOnManifest(p.keep), WithVisibility(mustVisibility(nil, true))}
}

func mustVisibility(public []string, probe bool) *Visibility {
	v, err := NewVisibility(public, probe, 0)
	if err != nil {
		panic(err)
	}
	return v
}

// flatBlobs opens the fixture's flat image from the registry alone and
// returns its manifest and index blobs.
func flatBlobs(t *testing.T, f *fixture) (mdesc v1.Descriptor, manifest, index []byte) {
	t.Helper()
	im := f.open(t)
	mdesc, manifest = im.ManifestBlob()
	_, index = im.IndexBlob()
	if im.ManifestFromPeers() || len(manifest) == 0 || mdesc.Digest.String() != f.res.Digest || mdesc.Size != int64(len(manifest)) {
		t.Fatalf("registry-only open: manifest %+v (%d bytes, from peers %v)", mdesc, len(manifest), im.ManifestFromPeers())
	}
	return mdesc, manifest, index
}

// The manifest and the index come from the peers: the registry answers one
// HEAD and serves neither, for a tag and for a digest reference.
func TestOpenImageManifestFromPeers(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	mdesc, manifest, index := flatBlobs(t, f)
	for _, tc := range []struct{ name, ref, head, wantRef string }{
		{"tag", "/app:v1-shoal", "/v2/app/manifests/v1-shoal", "/app:v1-shoal@" + f.res.Digest},
		{"digest", "/app@" + f.res.Digest, "/v2/app/manifests/" + f.res.Digest, "/app@" + f.res.Digest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			reg := newManifestCounter(t, shared.handler, false)
			src := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) { return slices.Clone(manifest), nil }, index: index}
			im, err := OpenImage(t.Context(), reg.Host+tc.ref, src.opts()...)
			if err != nil {
				t.Fatal(err)
			}
			if !im.ManifestFromPeers() || !im.IndexFromPeers() {
				t.Errorf("manifest from peers %v, index from peers %v; want both", im.ManifestFromPeers(), im.IndexFromPeers())
			}
			if gets, heads := reg.requests(http.MethodGet), reg.requests(http.MethodHead); len(gets) != 0 || !slices.Equal(heads, []string{tc.head}) {
				t.Errorf("registry manifest requests: GET %v, HEAD %v; want no GET and one HEAD of %s", gets, heads, tc.head)
			}
			if b := reg.blobs(); len(b) != 0 {
				t.Errorf("registry served whole blobs %v", b)
			}
			if len(src.asked) != 1 || src.asked[0].Digest != mdesc.Digest || src.asked[0].Size != mdesc.Size || src.asked[0].MediaType != mdesc.MediaType {
				t.Errorf("the source was asked for %+v, want %+v", src.asked, mdesc)
			}
			if im.Digest() != f.res.Digest || im.Ref() != reg.Host+tc.wantRef || !reflect.DeepEqual(im.Index(), f.res.Index) {
				t.Errorf("opened %s (%s), want %s (%s), index equal %v", im.Ref(), im.Digest(), reg.Host+tc.wantRef, f.res.Digest, reflect.DeepEqual(im.Index(), f.res.Index))
			}
			if d, raw := im.ManifestBlob(); d.Digest != mdesc.Digest || !bytes.Equal(raw, manifest) {
				t.Errorf("ManifestBlob %+v, %d bytes", d, len(raw))
			}
			if len(src.kept) != 1 || !bytes.Equal(src.kept[0], manifest) || !src.keptBeforeIndex {
				t.Errorf("manifest hook: %d calls, before the index was asked for: %v", len(src.kept), src.keptBeforeIndex)
			}
		})
	}
}

// Peers that fail, or send the wrong bytes, leave the manifest to the
// registry — fetched by the HEAD's digest — and the image is the right one.
func TestOpenImageManifestPeersFail(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	mdesc, manifest, _ := flatBlobs(t, f)
	for _, tc := range []struct {
		name string
		give func(v1.Descriptor) ([]byte, error)
	}{
		{"flipped byte", func(v1.Descriptor) ([]byte, error) {
			b := slices.Clone(manifest)
			b[len(b)/2] ^= 1
			return b, nil
		}},
		{"short", func(v1.Descriptor) ([]byte, error) { return manifest[:len(manifest)-1], nil }},
		{"another manifest", func(v1.Descriptor) ([]byte, error) { return []byte(`{"schemaVersion":2}`), nil }},
		{"error", func(v1.Descriptor) ([]byte, error) { return nil, errors.New("no peer holds it") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			reg := newManifestCounter(t, shared.handler, false)
			src := &peerSource{manifest: tc.give}
			im, err := OpenImage(t.Context(), reg.Host+"/app:v1-shoal", src.opts()...)
			if err != nil {
				t.Fatal(err)
			}
			if im.ManifestFromPeers() || im.IndexFromPeers() {
				t.Errorf("manifest from peers %v, index from peers %v; want neither", im.ManifestFromPeers(), im.IndexFromPeers())
			}
			if gets := reg.requests(http.MethodGet); !slices.Equal(gets, []string{"/v2/app/manifests/" + mdesc.Digest.String()}) {
				t.Errorf("registry manifest GETs %v, want one, by digest", gets)
			}
			if d, raw := im.ManifestBlob(); im.Digest() != f.res.Digest || d.Digest != mdesc.Digest || !bytes.Equal(raw, manifest) || !reflect.DeepEqual(im.Index(), f.res.Index) {
				t.Errorf("opened %s with a manifest of %d bytes: not the image", im.Digest(), len(raw))
			}
			if len(src.kept) != 1 || !bytes.Equal(src.kept[0], manifest) {
				t.Errorf("manifest hook got %d manifests, want the registry's", len(src.kept))
			}
		})
	}
}

// A registry whose manifest HEADs fail: the visibility probe says nothing
// (retried as any registry request), so the image counts as private; the
// peers are not asked (there is no digest to ask for, and a private
// manifest never comes from them) and the manifest comes from a GET of the
// tag.
func TestOpenImageManifestHeadFails(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	_, manifest, _ := flatBlobs(t, f)
	reg := newManifestCounter(t, shared.handler, true)
	src := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) { return manifest, nil }}
	im, err := OpenImage(t.Context(), reg.Host+"/app:v1-shoal", src.opts()...)
	if err != nil {
		t.Fatal(err)
	}
	if len(src.asked) != 0 || im.ManifestFromPeers() {
		t.Errorf("the source was asked %d times (from peers %v) without a HEAD", len(src.asked), im.ManifestFromPeers())
	}
	if heads, gets := reg.requests(http.MethodHead), reg.requests(http.MethodGet); len(heads) != DefaultAttempts || !slices.Equal(gets, []string{"/v2/app/manifests/v1-shoal"}) {
		t.Errorf("HEADs %v (want the probe's, retried %d times), GETs %v (want the tag)", heads, DefaultAttempts, gets)
	}
	if im.Public() || len(src.keptPublic) != 1 || src.keptPublic[0] {
		t.Errorf("public %v, hook saw public %v; want private", im.Public(), src.keptPublic)
	}
	if im.Digest() != f.res.Digest || !reflect.DeepEqual(im.Index(), f.res.Index) {
		t.Errorf("opened %s, want %s", im.Digest(), f.res.Digest)
	}
}

// The tag moves to another image between the HEAD and the registry GET that
// follows the peers' failure: the GET by digest still opens the image the
// HEAD named, never a mix of the two.
func TestOpenImageManifestTagMoves(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	mdesc, _, _ := flatBlobs(t, f)
	reg := newManifestCounter(t, shared.handler, false)
	src, err := name.ParseReference(reg.Host+"/app:v1-shoal", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(src)
	if err != nil {
		t.Fatal(err)
	}
	moving, _ := name.ParseReference(reg.Host+"/moving:v1-shoal", name.Insecure)
	if err := remote.Write(moving, img); err != nil {
		t.Fatal(err)
	}
	layers, _ := testLayers()
	ps := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) {
		push(t, reg.Host+"/moving:v1-shoal", imageOf(t, layers[2:])) // a plain image now
		return nil, errors.New("no peer holds it")
	}}
	im, err := OpenImage(t.Context(), reg.Host+"/moving:v1-shoal", ps.opts()...)
	if err != nil {
		t.Fatal(err)
	}
	if im.Digest() != mdesc.Digest.String() || !reflect.DeepEqual(im.Index(), f.res.Index) {
		t.Errorf("opened %s, want the image the HEAD named, %s", im.Digest(), mdesc.Digest)
	}
	// The tag did move: without the HEAD the same open fails.
	if _, err := OpenImage(t.Context(), reg.Host+"/moving:v1-shoal", WithPlainHTTP(true), WithLogger(quiet())); !errors.Is(err, ErrNotFlat) {
		t.Errorf("after the move: %v, want ErrNotFlat", err)
	}
}

// An image index is refused as before, with the same message, and the
// peers are not asked for it; a missing tag is reported as before.
func TestOpenImageManifestSourceIndexNotFlat(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t)
	layers, _ := testLayers()
	img := imageOf(t, layers[2:])
	ref, _ := name.ParseReference(reg.Host+"/plain:multi", name.Insecure)
	if err := remote.WriteIndex(ref, mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img})); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  string
		want error
		msg  string
	}{
		{"/plain:multi", ErrNotFlat, "image index"},
		{"/plain:missing", ErrNotFound, "not found"},
	} {
		src := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) { return nil, errors.New("not here") }}
		_, withPeers := OpenImage(t.Context(), reg.Host+tc.ref, src.opts()...)
		_, without := OpenImage(t.Context(), reg.Host+tc.ref, WithPlainHTTP(true), WithLogger(quiet()))
		if !errors.Is(withPeers, tc.want) || withPeers.Error() != without.Error() || !strings.Contains(withPeers.Error(), tc.msg) {
			t.Errorf("%s with a manifest source: %v\nwithout: %v\nwant the same error (%v)", tc.ref, withPeers, without, tc.want)
		}
		if len(src.asked) != 0 || len(src.kept) != 0 {
			t.Errorf("%s: the source was asked %d times, the hook called %d times", tc.ref, len(src.asked), len(src.kept))
		}
	}
}
