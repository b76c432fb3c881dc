package mirror

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

const (
	alice, alicePass = "alice", "wonderland-7"
)

func basic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// pushRandom pushes a random image of layers × size bytes to repoTag in
// reg (with its account, if it has one).
func pushRandom(t *testing.T, reg *testenv.Registry, repoTag string, layers int, size int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, int64(layers))
	if err != nil {
		t.Fatal(err)
	}
	pushImage(t, reg, repoTag, img)
	return img
}

// pushImage pushes img to repoTag in reg, with its account if it has one.
func pushImage(t *testing.T, reg *testenv.Registry, repoTag string, img v1.Image) {
	t.Helper()
	ref, err := name.ParseReference(reg.Ref(repoTag), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context()), remote.WithAuth(reg.Auth())); err != nil {
		t.Fatalf("push %s: %v", repoTag, err)
	}
}

// brief is a response body for a message: an error body, or its size.
func brief(b []byte) string {
	if len(b) > 0 && b[0] == '{' && len(b) < 2048 {
		return string(b)
	}
	return fmt.Sprintf("%d bytes", len(b))
}

// recordingPeers is a swarm that has nothing and records what the mirror
// asks of it: which digests it looked up and which it announced.
type recordingPeers struct {
	mu               sync.Mutex
	looked, provided []string
}

func (p *recordingPeers) Providers(_ context.Context, d string) ([]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.looked = append(p.looked, d)
	return nil, nil
}

func (p *recordingPeers) Recipe(context.Context, string, string) ([]byte, error) {
	return nil, ErrNoPeers
}

func (p *recordingPeers) Blocks(context.Context, string, string, []flat.Block) (map[flat.BlockID][]byte, error) {
	return nil, ErrNoPeers
}

func (p *recordingPeers) Strike(string) {}

func (p *recordingPeers) Provide(_ context.Context, d string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.provided = append(p.provided, d)
	return nil
}

func (p *recordingPeers) saw(d string) (looked, provided bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Contains(p.looked, d), slices.Contains(p.provided, d)
}

// authRig is a mirror in front of two real registries: priv, behind
// htpasswd (every repository private; the default upstream), and pub,
// anonymous (every repository public).
type authRig struct {
	*rig
	priv, pub *testenv.Registry
	peers     *recordingPeers
}

func startAuthRig(t *testing.T, tweak func(*Config)) *authRig {
	t.Helper()
	a := &authRig{
		priv:  testenv.StartRegistry(t, testenv.WithBasicAuth(alice, alicePass)),
		pub:   testenv.StartRegistry(t),
		peers: &recordingPeers{},
	}
	a.rig = a.restart(t, nil, tweak)
	return a
}

// restart starts a mirror on the rig's registries: on dir and store when
// given (a restart of the same node), else fresh ones.
func (a *authRig) restart(t *testing.T, old *rig, tweak func(*Config)) *rig {
	t.Helper()
	return startMirror(t, nil, storeOf(old), a.peers, func(c *Config) {
		c.Upstreams = []Upstream{
			{Host: a.priv.Host, PlainHTTP: true, Default: true},
			{Host: a.pub.Host, PlainHTTP: true},
		}
		if old != nil {
			c.Dir = old.dir
		}
		if tweak != nil {
			tweak(c)
		}
	})
}

func storeOf(r *rig) *blockstore.Store {
	if r == nil {
		return nil
	}
	return r.store
}

// get sends one request to the mirror with an Authorization header (""
// for none) and returns the status, the challenge and the body.
func (a *authRig) get(t *testing.T, method, path, authz string) (int, string, []byte) {
	t.Helper()
	hdr := map[string]string{}
	if authz != "" {
		hdr["Authorization"] = authz
	}
	resp, b, err := do(t, method, a.srv.URL+path, hdr)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), b
}

// cranePull pulls ref through the mirror with crane (as a client that uses
// the mirror as its registry), reads every blob and returns the image.
func (a *authRig) cranePull(t *testing.T, ref string, auth authn.Authenticator) (v1.Image, error) {
	t.Helper()
	img, err := crane.Pull(a.host+"/"+ref, crane.Insecure, crane.WithAuth(auth), crane.WithContext(t.Context()))
	if err != nil {
		return nil, err
	}
	checkImage(t, img)
	a.settle(t)
	return img, nil
}

// TestMirrorAuthAnonymous: an anonymous client gets 401 with a Basic
// challenge for the private repository's manifest and blobs, whatever the
// mirror keeps, and 200 for the public repository's.
func TestMirrorAuthAnonymous(t *testing.T) {
	t.Parallel()
	a := startAuthRig(t, nil)
	privImg := pushRandom(t, a.priv, "team/app:v1", 2, 300000)
	pubImg := pushRandom(t, a.pub, "lib/pub:v1", 1, 300000)
	privLayer := layerDigests(t, privImg)[0].Digest.String()
	privDigest, _ := privImg.Digest()
	pubLayer := layerDigests(t, pubImg)[0].Digest.String()
	pubNS := "?ns=" + a.pub.Host

	check := func(when string) {
		for _, tc := range []struct{ method, path string }{
			{"GET", "/v2/team/app/manifests/v1"},
			{"HEAD", "/v2/team/app/manifests/v1"},
			{"GET", "/v2/team/app/manifests/" + privDigest.String()},
			{"GET", "/v2/team/app/blobs/" + privLayer},
			{"HEAD", "/v2/team/app/blobs/" + privLayer},
		} {
			status, chal, body := a.get(t, tc.method, tc.path, "")
			if status != http.StatusUnauthorized || chal != `Basic realm="`+a.priv.Host+` via shoal mirror"` {
				t.Errorf("%s: anonymous %s %s: %d, challenge %q, want 401 with a Basic challenge (%s)", when, tc.method, tc.path, status, chal, body)
			}
			if tc.method == "GET" && ociCode(t, body) != "UNAUTHORIZED" {
				t.Errorf("%s: %s: code %s", when, tc.path, ociCode(t, body))
			}
		}
		for _, path := range []string{"/v2/lib/pub/manifests/v1" + pubNS, "/v2/lib/pub/blobs/" + pubLayer + pubNS} {
			if status, _, body := a.get(t, "GET", path, ""); status != http.StatusOK {
				t.Errorf("%s: anonymous GET %s: %d %s, want 200", when, path, status, body)
			}
		}
	}
	check("nothing kept")
	if _, err := a.cranePull(t, "team/app:v1", &authn.Basic{Username: alice, Password: alicePass}); err != nil {
		t.Fatalf("alice's pull: %v", err)
	}
	check("private image kept")

	// /v2/ challenges clients without credentials, so that those that ping
	// first send theirs.
	if status, chal, _ := a.get(t, "GET", "/v2/", ""); status != http.StatusUnauthorized || !strings.HasPrefix(chal, "Basic ") {
		t.Errorf("anonymous /v2/: %d %q", status, chal)
	}
	// An anonymous client pulls the whole public image.
	a.fetchAll(t, pubImg, "lib/pub", "v1", "?ns="+a.pub.Host, "")
}

// fetchAll reads an image through the mirror as containerd does (its tag,
// then each blob, with ?ns=), checking every digest.
func (a *authRig) fetchAll(t *testing.T, img v1.Image, repo, tag, ns, authz string) {
	t.Helper()
	want, _ := img.Digest()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	status, _, body := a.get(t, "GET", "/v2/"+repo+"/manifests/"+tag+ns, authz)
	if status != 200 || digestOf(body) != want.String() {
		t.Fatalf("%s:%s: %d, digest %s, want %s", repo, tag, status, digestOf(body), want)
	}
	for _, d := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		status, _, body := a.get(t, "GET", "/v2/"+repo+"/blobs/"+d.Digest.String()+ns, authz)
		if status != 200 || digestOf(body) != d.Digest.String() {
			t.Fatalf("%s blob %s: %d, digest %s", repo, d.Digest, status, digestOf(body))
		}
	}
	a.settle(t)
}

// TestMirrorAuthKeptPrivateBlob: a kept private blob is served only to a
// client the upstream gives it to, under a repository that contains it:
// not to an anonymous client, not with a wrong password, not under a
// public repository's name, not under another private repository the
// client may read. crane with the right credentials pulls the image; the
// second pull's blobs come from the kept copy.
func TestMirrorAuthKeptPrivateBlob(t *testing.T) {
	t.Parallel()
	a := startAuthRig(t, nil)
	img := pushRandom(t, a.priv, "team/app:v1", 2, layerSize)
	pushRandom(t, a.priv, "team/other:v1", 1, 1000)
	pushRandom(t, a.pub, "lib/pub:v1", 1, 1000)
	want, _ := img.Digest()
	layer := layerDigests(t, img)[0].Digest.String()
	creds := basic(alice, alicePass)

	got, err := a.cranePull(t, "team/app:v1", &authn.Basic{Username: alice, Password: alicePass})
	if err != nil {
		t.Fatalf("crane pull with credentials: %v", err)
	}
	if d, _ := got.Digest(); d != want {
		t.Fatalf("pulled %s, want %s", d, want)
	}
	served := a.m.Stats().ServedUpstream
	if _, err := a.cranePull(t, "team/app:v1", &authn.Basic{Username: alice, Password: alicePass}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the second pull's bytes to be counted", func() bool { return a.m.Stats().ServedLocal >= layerBytes(t, img) })
	if st := a.m.Stats(); st.ServedUpstream-served > 4096 { // the manifest by tag, resolved upstream
		t.Errorf("second pull: %d bytes from upstream, want the blobs from the kept copy", st.ServedUpstream-served)
	}
	if _, _, ok := a.m.keep.recipe(t.Context(), layer, 1<<30); !ok {
		t.Fatal("the layer is not kept")
	}

	for _, tc := range []struct {
		name, path, authz string
		status            int
	}{
		{"alice, its repository", "/v2/team/app/blobs/" + layer, creds, 200},
		{"anonymous", "/v2/team/app/blobs/" + layer, "", 401},
		{"wrong password", "/v2/team/app/blobs/" + layer, basic(alice, "guess"), 401},
		{"unknown user", "/v2/team/app/blobs/" + layer, basic("mallory", alicePass), 401},
		{"alice, another private repository", "/v2/team/other/blobs/" + layer, creds, 404},
		{"anonymous, a public repository", "/v2/lib/pub/blobs/" + layer + "?ns=" + a.pub.Host, "", 404},
		{"alice, a public repository", "/v2/lib/pub/blobs/" + layer + "?ns=" + a.pub.Host, creds, 404},
		{"anonymous, the manifest under a public name", "/v2/lib/pub/manifests/" + want.String() + "?ns=" + a.pub.Host, "", 404},
	} {
		for _, method := range []string{"GET", "HEAD"} {
			status, _, body := a.get(t, method, tc.path, tc.authz)
			if status != tc.status {
				t.Errorf("%s: %s: %d, want %d (%s)", tc.name, method, status, tc.status, brief(body))
			}
			if method == "GET" && status == 200 && digestOf(body) != layer {
				t.Errorf("%s: body hashes to %s", tc.name, digestOf(body))
			}
		}
	}
	if st := a.m.Stats(); st.Denied == 0 || st.Checks == 0 {
		t.Errorf("stats: %+v", st)
	}
}

// TestMirrorPrivateNotShared: blobs fetched with a client's credentials
// from a private repository are never announced, never looked up among
// peers, and Recipe refuses them — also after a restart; public ones are
// announced and served to peers. A blob kept before classes were
// recorded counts as private.
func TestMirrorPrivateNotShared(t *testing.T) {
	t.Parallel()
	a := startAuthRig(t, nil)
	privImg := pushRandom(t, a.priv, "team/app:v1", 1, 300000)
	pubImg := pushRandom(t, a.pub, "lib/pub:v1", 1, 300000)
	if _, err := a.cranePull(t, "team/app:v1", &authn.Basic{Username: alice, Password: alicePass}); err != nil {
		t.Fatal(err)
	}
	a.fetchAll(t, pubImg, "lib/pub", "v1", "?ns="+a.pub.Host, "")

	blobs := func(img v1.Image) []string { return testenv.ImageBlobs(t, img) }
	check := func(r *rig, when string) {
		for _, d := range blobs(privImg) {
			looked, provided := a.peers.saw(d)
			if looked || provided {
				t.Errorf("%s: private %s: looked up among peers %v, announced %v", when, d, looked, provided)
			}
			if _, err := r.m.Recipe(t.Context(), d); err == nil {
				t.Errorf("%s: Recipe returned private %s", when, d)
			}
			if c := r.m.keep.class(d); c != classPrivate {
				t.Errorf("%s: private %s kept as %s", when, d, c)
			}
		}
		for _, d := range blobs(pubImg) {
			if _, err := r.m.Recipe(t.Context(), d); err != nil {
				t.Errorf("%s: Recipe of public %s: %v", when, d, err)
			}
		}
		if st := r.m.Stats(); st.Kept != 6 || st.KeptPublic != 3 {
			t.Errorf("%s: kept %d, %d public; want 6, 3", when, st.Kept, st.KeptPublic)
		}
	}
	eventually(t, 5*time.Second, "the public blobs to be announced", func() bool {
		for _, d := range blobs(pubImg) {
			if _, provided := a.peers.saw(d); !provided {
				return false
			}
		}
		return true
	})
	for _, d := range blobs(pubImg)[1:] { // the manifest by tag is not looked up
		if looked, _ := a.peers.saw(d); !looked {
			t.Errorf("public %s was not looked up among peers", d)
		}
	}
	check(a.rig, "kept")

	// A restart re-provides public blobs only.
	a.srv.Close()
	_ = a.m.Close()
	a.peers.mu.Lock()
	a.peers.provided = nil
	a.peers.mu.Unlock()
	r2 := a.restart(t, a.rig, nil)
	eventually(t, 5*time.Second, "the public blobs to be provided again", func() bool {
		a.peers.mu.Lock()
		defer a.peers.mu.Unlock()
		return len(a.peers.provided) == 3
	})
	check(r2, "after a restart")

	// A recipe with no class record (kept by an older daemon) is private.
	pubLayer := blobs(pubImg)[2]
	if err := os.Remove(r2.m.keep.classPath(pubLayer)); err != nil {
		t.Fatal(err)
	}
	r2.srv.Close()
	_ = r2.m.Close()
	r3 := a.restart(t, r2, nil)
	if _, err := r3.m.Recipe(t.Context(), pubLayer); err == nil {
		t.Error("Recipe returned a blob kept without a class record")
	}
	// An anonymous read of it from its public repository makes it public.
	if status, _, _ := a.getFrom(t, r3, "/v2/lib/pub/blobs/"+pubLayer+"?ns="+a.pub.Host); status != 200 {
		t.Fatalf("anonymous public blob: %d", status)
	}
	if _, err := r3.m.Recipe(t.Context(), pubLayer); err != nil {
		t.Errorf("Recipe after an anonymous read: %v", err)
	}
}

func (a *authRig) getFrom(t *testing.T, r *rig, path string) (int, string, []byte) {
	t.Helper()
	resp, b, err := do(t, "GET", r.srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), b
}

// TestMirrorSharedRepositories: the daemon's own credentials serve the
// repositories the config shares, to every client, and no other; shared
// blobs are not announced either.
func TestMirrorSharedRepositories(t *testing.T) {
	t.Parallel()
	a := startAuthRig(t, func(c *Config) {
		c.Keychain = staticKeychain{&authn.Basic{Username: alice, Password: alicePass}}
		c.Upstreams[0].SharedRepositories = []string{"shared/*"}
	})
	shared := pushRandom(t, a.priv, "shared/tools:v1", 1, 1000)
	pushRandom(t, a.priv, "team/app:v1", 1, 1000)
	layer := layerDigests(t, shared)[0].Digest.String()

	for _, authz := range []string{"", basic("mallory", "x")} {
		if status, _, body := a.get(t, "GET", "/v2/shared/tools/manifests/v1", authz); status != 200 {
			t.Errorf("shared manifest, Authorization %q: %d %s", authz, status, body)
		}
		if status, _, body := a.get(t, "GET", "/v2/shared/tools/blobs/"+layer, authz); status != 200 || digestOf(body) != layer {
			t.Errorf("shared blob, Authorization %q: %d", authz, status)
		}
	}
	if status, _, _ := a.get(t, "GET", "/v2/team/app/manifests/v1", ""); status != 401 {
		t.Errorf("a repository not shared, anonymous: %d, want 401 (the daemon's credentials are not lent)", status)
	}
	a.settle(t)
	if c := a.m.keep.class(layer); c != classShared {
		t.Errorf("shared blob kept as %s", c)
	}
	if _, err := a.m.Recipe(t.Context(), layer); err == nil {
		t.Error("Recipe returned a shared blob")
	}
	if _, provided := a.peers.saw(layer); provided {
		t.Error("a shared blob was announced")
	}
}

type staticKeychain struct{ auth authn.Authenticator }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k.auth, nil }

// TestMirrorAuthUpstreamDown: with the upstream unreachable, kept private
// content is served only on a positive check younger than OfflineGrace for
// the same credentials.
func TestMirrorAuthUpstreamDown(t *testing.T) {
	t.Parallel()
	grace := 3 * time.Second
	a := startAuthRig(t, func(c *Config) { c.CheckTTL, c.OfflineGrace = time.Millisecond, grace })
	img := pushRandom(t, a.priv, "team/app:v1", 1, 300000)
	layer := layerDigests(t, img)[0].Digest.String()
	creds := basic(alice, alicePass)
	if status, _, _ := a.get(t, "GET", "/v2/team/app/blobs/"+layer, creds); status != 200 {
		t.Fatalf("alice: %d", status)
	}
	a.settle(t)
	checked := time.Now() // the check was recorded before this
	a.priv.Stop()
	for _, tc := range []struct {
		name, authz string
		status      int
	}{
		{"alice, checked a moment ago", creds, 200},
		{"anonymous", "", 503},
		{"another password, never checked", basic(alice, "other"), 503},
	} {
		if status, _, body := a.get(t, "GET", "/v2/team/app/blobs/"+layer, tc.authz); status != tc.status {
			t.Errorf("upstream down: %s: %d, want %d (%s)", tc.name, status, tc.status, brief(body))
		}
	}
	time.Sleep(time.Until(checked.Add(grace)))
	if status, _, _ := a.get(t, "GET", "/v2/team/app/blobs/"+layer, creds); status != 503 {
		t.Errorf("upstream down, alice's check older than OfflineGrace: %d, want 503", status)
	}
}

// TestMirrorBearerForwarded: a client's Bearer token is forwarded upstream
// as a registry token, and only that client's requests carry it.
func TestMirrorBearerForwarded(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "tok/app:v1", 1, 1000)
	layer := layerDigests(t, img)[0].Digest.String()
	tok := "registry-token-123"
	up.token.Store(&tok)
	r := startMirror(t, up, nil, nil, nil)
	for _, tc := range []struct {
		name, authz string
		status      int
	}{
		{"the token", "Bearer " + tok, 200},
		{"anonymous", "", 401},
		{"another token", "Bearer nope", 401},
		{"the token again", "Bearer " + tok, 200},
	} {
		hdr := map[string]string{}
		if tc.authz != "" {
			hdr["Authorization"] = tc.authz
		}
		for _, path := range []string{"/v2/tok/app/manifests/v1", "/v2/tok/app/blobs/" + layer} {
			resp, body, err := do(t, "GET", r.srv.URL+path, hdr)
			if err != nil || resp.StatusCode != tc.status {
				t.Errorf("%s: %s: %d, want %d (%s, %v)", tc.name, path, resp.StatusCode, tc.status, body, err)
			}
		}
	}
}

// TestRepositoryPatterns: shared_repositories and public_repositories
// accept a name, a name followed by /*, or *, and nothing else.
func TestRepositoryPatterns(t *testing.T) {
	t.Parallel()
	ps, err := parsePatterns("shared repositories", []string{"team/*", "library/debian", "a/b/*"})
	if err != nil {
		t.Fatal(err)
	}
	for repo, want := range map[string]bool{
		"team/app": true, "team/a/b": true, "team": false, "teamx/app": false,
		"library/debian": true, "library/debian2": false, "a/b/c": true, "a/b": false,
	} {
		if got := ps.match(repo); got != want {
			t.Errorf("match(%q) = %v, want %v", repo, got, want)
		}
	}
	if all, _ := parsePatterns("p", []string{"*"}); !all.match("any/thing") {
		t.Error("* does not match everything")
	}
	for _, bad := range [][]string{{""}, {"Team/*"}, {"team/*/x"}, {"te*m"}, {"**"}, {"team/"}, {"/team"}, {"team/*", "team/*"}} {
		if _, err := parsePatterns("p", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	_, err = New(Config{Dir: t.TempDir(), Blocks: openStore(t, ""), Upstreams: []Upstream{{Host: "r.example", SharedRepositories: []string{"team/**"}}}})
	if err == nil || !strings.Contains(err.Error(), `"r.example"`) || !strings.Contains(err.Error(), `"team/**"`) {
		t.Errorf("New with a bad pattern: %v", err)
	}
}
