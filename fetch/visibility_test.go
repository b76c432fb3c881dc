package fetch

import (
	"bytes"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/internal/testenv"
)

// The probe: a registry that serves anonymous reads makes a repository
// public, one that asks for credentials private; both answers are kept for
// the TTL, an error is not. Listed patterns need no probe.
func TestVisibility(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	var refused atomic.Int64
	open := newManifestCounter(t, shared.handler, false)
	locked := newManifestCounter(t, testenv.BasicAuth(shared.handler, "u", "p", &refused), false)
	broken := newManifestCounter(t, shared.handler, true) // HEADs answer 500
	v := mustVisibility([]string{broken.Host + "/listed/*"}, true)
	ref := func(host, repo string) name.Reference {
		r, err := name.ParseReference(host+"/"+repo+"@"+f.res.Digest, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for i := range 2 {
		pub, head, err := v.Public(t.Context(), ref(open.Host, "app"), http.DefaultTransport)
		if !pub || (i == 0) != (head != nil) || err != nil {
			t.Errorf("anonymous registry, call %d: public %v, head %v; want public, a head on the first call only", i, pub, head)
		}
		if head != nil && head.Digest.String() != f.res.Digest {
			t.Errorf("probe's head %s, want %s", head.Digest, f.res.Digest)
		}
		if pub, _, err := v.Public(t.Context(), ref(locked.Host, "app"), http.DefaultTransport); pub || err != nil {
			t.Errorf("registry behind basic auth, call %d: public", i)
		}
		if pub, _, err := v.Public(t.Context(), ref(broken.Host, "app"), http.DefaultTransport); pub || err == nil {
			t.Errorf("registry failing HEADs, call %d: public %v, error %v; want private and the probe's error", i, pub, err)
		}
	}
	if n := len(open.requests(http.MethodHead)); n != 1 {
		t.Errorf("anonymous registry probed %d times, want 1 (kept)", n)
	}
	if n := len(locked.requests(http.MethodHead)); n != 1 || refused.Load() == 0 {
		t.Errorf("locked registry probed %d times (%d requests refused), want 1 (kept), refused", n, refused.Load())
	}
	if n := len(broken.requests(http.MethodHead)); n != 2 {
		t.Errorf("failing registry probed %d times, want 2 (an error is not kept)", n)
	}
	before := len(broken.requests(http.MethodHead))
	if pub, _, _ := v.Public(t.Context(), ref(broken.Host, "listed/app"), http.DefaultTransport); !pub || len(broken.requests(http.MethodHead)) != before {
		t.Errorf("a listed repository: public %v after %d probes; want public, no probe", pub, len(broken.requests(http.MethodHead))-before)
	}
	if pub, _, _ := (*Visibility)(nil).Public(t.Context(), ref(open.Host, "app"), http.DefaultTransport); pub {
		t.Error("no Visibility: public")
	}
	for _, bad := range []string{"", "noslash", "host/[/x"} {
		if _, err := NewVisibility([]string{bad}, false, 0); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
}

// A private image (its registry refuses anonymous reads): the manifest
// comes from the registry with the node's credentials, never from the
// swarm, and the swarm is handed the manifest's bytes and told it is
// private, for the index and the hook alike.
func TestOpenImagePrivate(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	_, manifest, index := flatBlobs(t, f)
	var refused atomic.Int64
	reg := newManifestCounter(t, testenv.BasicAuth(shared.handler, "u", "p", &refused), false)
	src := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) { return manifest, nil }, index: index}
	opts := append(src.opts(), WithKeychain(staticKeychain{&authn.Basic{Username: "u", Password: "p"}}))
	im, err := OpenImage(t.Context(), reg.Host+"/app:v1-shoal", opts...)
	if err != nil {
		t.Fatal(err)
	}
	if im.Public() || im.Manifest().Public {
		t.Error("an image behind credentials opened as public")
	}
	if len(src.asked) != 0 || im.ManifestFromPeers() {
		t.Errorf("the swarm was asked for a private manifest %d times", len(src.asked))
	}
	if gets := reg.requests(http.MethodGet); !slices.Equal(gets, []string{"/v2/app/manifests/v1-shoal"}) {
		t.Errorf("registry manifest GETs %v, want the tag's", gets)
	}
	if !im.IndexFromPeers() || len(src.indexFor) != 1 || src.indexFor[0].Public || !bytes.Equal(src.indexFor[0].Raw, manifest) {
		t.Errorf("index from peers %v; FetchIndex saw %d manifests; want one, private, with its bytes", im.IndexFromPeers(), len(src.indexFor))
	}
	if len(src.keptPublic) != 1 || src.keptPublic[0] {
		t.Errorf("the hook saw public %v, want one private manifest", src.keptPublic)
	}
	// Without credentials the same open fails, and no peer is asked.
	nocreds := &peerSource{manifest: src.manifest, index: index}
	_, err = OpenImage(t.Context(), reg.Host+"/app:v1-shoal", append(nocreds.opts(), WithKeychain(authn.NewMultiKeychain()))...)
	if err == nil || len(nocreds.asked) != 0 || nocreds.indexAsked != 0 {
		t.Errorf("without credentials: %v; the swarm asked for the manifest %d times and the index %d times", err, len(nocreds.asked), nocreds.indexAsked)
	}
}

// A registry that fails for a moment while a node probes it: the probe is
// retried as any registry request, and the image opens public, as on
// every other node; taken for private it would put this node in a swarm of
// its own.
func TestOpenImageVisibilityRetried(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	_, manifest, index := flatBlobs(t, f)
	var failed atomic.Int64
	flaky := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead && failed.Add(1) <= 2 {
			http.Error(w, "a moment", http.StatusServiceUnavailable)
			return
		}
		shared.handler.ServeHTTP(w, r)
	})
	reg := newManifestCounter(t, flaky, false)
	src := &peerSource{manifest: func(v1.Descriptor) ([]byte, error) { return manifest, nil }, index: index}
	im, err := OpenImage(t.Context(), reg.Host+"/app:v1-shoal", src.opts()...)
	if err != nil {
		t.Fatal(err)
	}
	if !im.Public() || !im.ManifestFromPeers() {
		t.Errorf("public %v, manifest from peers %v after two failed probes; want both", im.Public(), im.ManifestFromPeers())
	}
}
