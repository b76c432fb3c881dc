package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
)

const layerSize = 5<<19 + 12345 // 2.5 MiB and a bit: two whole chunks and a partial one

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// do sends one request to the mirror and returns the response and body
// (the body error is returned, not fatal: cut-short bodies are tested).
func do(t *testing.T, method, url string, hdr map[string]string) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

// ociCode returns the first error code of an OCI error body.
func ociCode(t *testing.T, b []byte) string {
	t.Helper()
	var e struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(b, &e); err != nil || len(e.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q (%v)", b, err)
	}
	return e.Errors[0].Code
}

func layerDigests(t *testing.T, img v1.Image) []v1.Descriptor {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return m.Layers
}

// TestPullThroughMirror: a first pull fetches each blob from upstream once
// and keeps it; a second pull gets every blob from the kept copy, while
// the tag is still resolved upstream (a moved tag is seen at once).
func TestPullThroughMirror(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "app/x:v1", 3, layerSize)
	want, _ := img.Digest()
	r := startMirror(t, up, nil, nil, nil)

	if got := r.pull(t, "app/x:v1"); got != want {
		t.Fatalf("pulled %s, want %s", got, want)
	}
	total := layerBytes(t, img)
	if got := up.blobBytes.Load(); got != total {
		t.Errorf("upstream served %d blob bytes, want each blob once: %d", got, total)
	}
	st := r.m.Stats()
	if st.ServedUpstream < total || st.Kept != 5 { // 3 layers, config, manifest
		t.Errorf("after the first pull: %+v", st)
	}

	gets, manifests := up.blobGets.Load(), up.manifestGets.Load()
	if got := r.pull(t, "app/x:v1"); got != want {
		t.Fatalf("second pull: %s, want %s", got, want)
	}
	if up.blobGets.Load() != gets {
		t.Errorf("second pull asked upstream for %d blobs, want none", up.blobGets.Load()-gets)
	}
	if up.manifestGets.Load() == manifests {
		t.Error("second pull did not resolve the tag upstream")
	}
	// A response is counted once its handler returns, which can be just
	// after the client has read it all.
	eventually(t, 5*time.Second, "the second pull's bytes to be counted as local", func() bool { return r.m.Stats().ServedLocal >= total })

	// The tag moves upstream: the mirror follows at once.
	img2 := up.push(t, "app/x:v1", 1, 1000)
	want2, _ := img2.Digest()
	if got := r.pull(t, "app/x:v1"); got != want2 {
		t.Errorf("after the tag moved: pulled %s, want %s", got, want2)
	}
}

// TestProtocol checks the distribution API details: HEAD, Range, errors.
func TestProtocol(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "lib/y:v1", 1, layerSize)
	r := startMirror(t, up, nil, nil, nil)
	layer := layerDigests(t, img)[0]
	d, size := layer.Digest.String(), layer.Size
	base := r.srv.URL + "/v2/lib/y"
	ns := "?ns=" + up.host

	// The first request for the blob is a Range request: served from the
	// fetch in progress.
	resp, b, err := do(t, "GET", base+"/blobs/"+d+ns, map[string]string{"Range": "bytes=100-199"})
	if err != nil || resp.StatusCode != http.StatusPartialContent || len(b) != 100 ||
		resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", size) {
		t.Fatalf("first range request: %d %q %d bytes %v", resp.StatusCode, resp.Header.Get("Content-Range"), len(b), err)
	}
	_, whole, err := do(t, "GET", base+"/blobs/"+d+ns, nil)
	if err != nil || digestOf(whole) != d {
		t.Fatalf("whole blob: %d bytes hashing to %s, %v", len(whole), digestOf(whole), err)
	}
	if string(b) != string(whole[100:200]) {
		t.Error("range bytes differ from the blob's")
	}
	mresp, mbody, _ := do(t, "GET", base+"/manifests/v1"+ns, nil)
	mdigest := mresp.Header.Get("Docker-Content-Digest")

	cases := []struct {
		name, method, path string
		hdr                map[string]string
		status             int
		code               string            // OCI error code, if an error
		headers            map[string]string // expected headers
		body               func([]byte) bool
	}{
		{name: "base", method: "GET", path: "/v2/", status: 401, code: "UNAUTHORIZED",
			headers: map[string]string{"Docker-Distribution-API-Version": "registry/2.0", "WWW-Authenticate": `Basic realm="shoal mirror"`}},
		{name: "base with credentials", method: "GET", path: "/v2/", hdr: map[string]string{"Authorization": "Basic dTpw"}, status: 200,
			headers: map[string]string{"Docker-Distribution-API-Version": "registry/2.0"}},
		{name: "malformed credentials", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Authorization": "Basic !!"}, status: 401, code: "UNAUTHORIZED",
			headers: map[string]string{"WWW-Authenticate": `Basic realm="` + up.host + ` via shoal mirror"`}},
		{name: "unknown scheme", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Authorization": "Negotiate abc"}, status: 401, code: "UNAUTHORIZED",
			body: func(b []byte) bool { return strings.Contains(string(b), "Negotiate") }},
		{name: "head blob", method: "HEAD", path: "/v2/lib/y/blobs/" + d + ns, status: 200,
			headers: map[string]string{"Content-Length": fmt.Sprint(size), "Docker-Content-Digest": d, "Content-Type": "application/octet-stream"},
			body:    func(b []byte) bool { return len(b) == 0 }},
		{name: "range kept", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Range": "bytes=1048570-1048589"}, status: 206,
			headers: map[string]string{"Content-Range": fmt.Sprintf("bytes 1048570-1048589/%d", size), "Content-Length": "20"},
			body:    func(b []byte) bool { return string(b) == string(whole[1048570:1048590]) }},
		{name: "suffix range", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Range": "bytes=-7"}, status: 206,
			body: func(b []byte) bool { return string(b) == string(whole[len(whole)-7:]) }},
		{name: "open range", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Range": fmt.Sprintf("bytes=%d-", size-3)}, status: 206,
			body: func(b []byte) bool { return string(b) == string(whole[len(whole)-3:]) }},
		{name: "unsatisfiable range", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Range": fmt.Sprintf("bytes=%d-", size)}, status: 416, code: "RANGE_INVALID",
			headers: map[string]string{"Content-Range": fmt.Sprintf("bytes */%d", size)}},
		{name: "several ranges: whole blob", method: "GET", path: "/v2/lib/y/blobs/" + d + ns, hdr: map[string]string{"Range": "bytes=0-1,5-6"}, status: 200,
			body: func(b []byte) bool { return digestOf(b) == d }},
		{name: "manifest by digest", method: "GET", path: "/v2/lib/y/manifests/" + mdigest + ns, status: 200,
			headers: map[string]string{"Content-Type": mresp.Header.Get("Content-Type"), "Docker-Content-Digest": mdigest},
			body:    func(b []byte) bool { return string(b) == string(mbody) }},
		{name: "head manifest tag", method: "HEAD", path: "/v2/lib/y/manifests/v1" + ns, status: 200,
			headers: map[string]string{"Docker-Content-Digest": mdigest, "Content-Length": fmt.Sprint(len(mbody))}},
		{name: "unknown blob", method: "GET", path: "/v2/lib/y/blobs/sha256:" + strings.Repeat("0", 64) + ns, status: 404, code: "BLOB_UNKNOWN"},
		{name: "unknown tag", method: "GET", path: "/v2/lib/y/manifests/nope" + ns, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "unknown upstream refused", method: "GET", path: "/v2/lib/y/manifests/v1?ns=registry.example.com", status: 403, code: "DENIED",
			body: func(b []byte) bool { return strings.Contains(string(b), "registry.example.com") }},
		{name: "push refused", method: "POST", path: "/v2/lib/y/blobs/uploads/" + ns, status: 405, code: "UNSUPPORTED"},
		{name: "bad digest", method: "GET", path: "/v2/lib/y/blobs/sha512:abc" + ns, status: 400, code: "DIGEST_INVALID"},
		{name: "bad name", method: "GET", path: "/v2/Lib/Y/manifests/v1" + ns, status: 400, code: "NAME_INVALID"},
		{name: "bad tag", method: "GET", path: "/v2/lib/y/manifests/-v1" + ns, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "not the API", method: "GET", path: "/v1/_ping", status: 404, code: "UNSUPPORTED"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, b, err := do(t, tc.method, r.srv.URL+tc.path, tc.hdr)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d (%s)", resp.StatusCode, tc.status, b)
			}
			if tc.code != "" {
				if got := ociCode(t, b); got != tc.code {
					t.Errorf("code %s, want %s", got, tc.code)
				}
			}
			for k, v := range tc.headers {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
			if tc.body != nil && !tc.body(b) {
				t.Errorf("unexpected body (%d bytes)", len(b))
			}
		})
	}
}

// TestHostileUpstream: an upstream that sends wrong bytes gets a client a
// cut-short response, never a complete wrong blob, and nothing is kept; a
// manifest whose stated digest is wrong is refused.
func TestHostileUpstream(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "bad/z:v1", 1, layerSize)
	r := startMirror(t, up, nil, nil, nil)
	d := layerDigests(t, img)[0].Digest.String()
	url := r.srv.URL + "/v2/bad/z/blobs/" + d

	up.corrupt.Store(true)
	resp, b, err := do(t, "GET", url, nil)
	if err == nil && resp.StatusCode == http.StatusOK && digestOf(b) != d {
		t.Fatalf("client got a complete wrong blob (%d bytes)", len(b))
	}
	if err == nil && resp.StatusCode == http.StatusOK {
		t.Fatalf("client got a complete blob from a corrupting upstream")
	}
	t.Logf("corrupt upstream: status %d, %d bytes, read error %v", resp.StatusCode, len(b), err)
	r.settle(t)
	if st := r.m.Stats(); st.UpstreamMismatches != 1 || st.Kept != 0 {
		t.Errorf("after a corrupt blob: %+v", st)
	}
	if _, err := r.m.Recipe(t.Context(), d); !errors.Is(err, ErrNotFound) {
		t.Errorf("a corrupt blob was kept: %v", err)
	}
	if n := r.store.Stats().Blocks; n != 0 {
		t.Errorf("%d blocks kept from a corrupt blob", n)
	}

	up.corrupt.Store(false)
	if resp, b, err := do(t, "GET", url, nil); err != nil || resp.StatusCode != 200 || digestOf(b) != d {
		t.Fatalf("after upstream healed: %d, %d bytes, %v", resp.StatusCode, len(b), err)
	}
	r.settle(t)

	up.lieDigest.Store(true)
	resp, b, err = do(t, "GET", r.srv.URL+"/v2/bad/z/manifests/v1", nil)
	if err != nil || resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(b), "digest") {
		t.Fatalf("manifest with a wrong stated digest: %d %s %v", resp.StatusCode, b, err)
	}
	if st := r.m.Stats(); st.Kept != 1 { // the healed blob only
		t.Errorf("kept %d, want only the healed blob", st.Kept)
	}
}

// TestConcurrentRequestsShareOneFetch: requests for a blob while it is
// being fetched join that fetch: upstream serves it once.
func TestConcurrentRequestsShareOneFetch(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "c/w:v1", 1, layerSize)
	r := startMirror(t, up, nil, nil, nil)
	d := layerDigests(t, img)[0].Digest.String()
	release := up.hold()
	defer release()
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			hdr := map[string]string{}
			if i%2 == 1 {
				hdr["Range"] = fmt.Sprintf("bytes=%d-%d", i*1000, i*1000+999)
			}
			resp, b, err := do(t, "GET", r.srv.URL+"/v2/c/w/blobs/"+d, hdr)
			switch {
			case err != nil:
				errs <- err
			case i%2 == 0 && (resp.StatusCode != 200 || digestOf(b) != d):
				errs <- fmt.Errorf("request %d: %d, %d bytes", i, resp.StatusCode, len(b))
			case i%2 == 1 && (resp.StatusCode != 206 || len(b) != 1000):
				errs <- fmt.Errorf("range request %d: %d, %d bytes", i, resp.StatusCode, len(b))
			}
		})
	}
	eventually(t, 10e9, "every request to reach the mirror", func() bool { return r.m.Stats().Requests == n })
	release()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := up.blobGets.Load(); got != 1 {
		t.Errorf("upstream got %d blob GETs, want 1", got)
	}
	if st := r.m.Stats(); st.Fetches != 1 {
		t.Errorf("%d fetches, want 1", st.Fetches)
	}
}

// TestUpstreamDown: with upstream unreachable, a kept tag, manifests by
// digest and blobs are served from the kept copies; a tag never seen is
// UNAVAILABLE, and a tag upstream does not have is 404 once it is back.
func TestUpstreamDown(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "d/v:v1", 2, 300000)
	want, _ := img.Digest()
	r := startMirror(t, up, nil, nil, nil)
	r.pull(t, "d/v:v1")

	up.down.Store(true)
	if got := r.pull(t, "d/v:v1"); got != want {
		t.Errorf("with upstream down: %s, want %s", got, want)
	}
	if got := r.pull(t, "d/v@"+want.String()); got != want {
		t.Errorf("by digest with upstream down: %s, want %s", got, want)
	}
	resp, b, _ := do(t, "GET", r.srv.URL+"/v2/d/v/manifests/other", nil)
	if resp.StatusCode != http.StatusServiceUnavailable || ociCode(t, b) != "UNAVAILABLE" {
		t.Errorf("unseen tag with upstream down: %d %s", resp.StatusCode, b)
	}
	up.down.Store(false)
	resp, b, _ = do(t, "GET", r.srv.URL+"/v2/d/v/manifests/other", nil)
	if resp.StatusCode != http.StatusNotFound || ociCode(t, b) != "MANIFEST_UNKNOWN" {
		t.Errorf("missing tag: %d %s", resp.StatusCode, b)
	}
}

// TestPeersServeBlobs: node B pulls after node A (real p2p nodes on
// loopback): every blob byte comes from A, none from upstream. With
// upstream down, node C, which never reached the upstream, cannot tell
// whether the repository is public and serves nothing; once the config
// declares it public, C pulls by digest — manifests included — from the
// swarm.
func TestPeersServeBlobs(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "p/q:v1", 3, layerSize)
	want, _ := img.Digest()
	total := layerBytes(t, img)

	start := func(boot []string, tweak func(*Config)) (*rig, []string) {
		store := openStore(t, "")
		n := swarmNode(t, store, boot)
		r := startMirror(t, up, store, SwarmPeers(n), tweak)
		n.ServeRecipes(r.m)
		return r, n.Addrs()
	}
	a, addrA := start(nil, nil)
	b, _ := start(addrA, nil)

	a.pull(t, "p/q:v1")
	eventually(t, 30e9, "A to announce what it kept", func() bool {
		st := a.m.Stats()
		return st.Provided >= int64(st.Kept) && st.Kept == 5
	})
	before := up.blobBytes.Load()
	if got := b.pull(t, "p/q:v1"); got != want {
		t.Fatalf("B pulled %s, want %s", got, want)
	}
	if got := up.blobBytes.Load() - before; got != 0 {
		t.Errorf("upstream served %d blob bytes to B, want 0", got)
	}
	eventually(t, 5*time.Second, "B's bytes to be counted", func() bool { return b.m.Stats().ServedPeers >= total })
	if st := b.m.Stats(); st.FetchedPeers != total || st.ServedUpstream > 2000 {
		t.Errorf("B: %+v, want every blob byte (%d) from peers", st, total)
	}

	up.down.Store(true)
	undeclared, _ := start(addrA, nil)
	resp, body, _ := do(t, "GET", undeclared.srv.URL+"/v2/p/q/manifests/"+want.String(), nil)
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("upstream down, repository not declared public: %d %s, want 503", resp.StatusCode, body)
	}
	c, _ := start(addrA, func(c *Config) { c.Upstreams[0].PublicRepositories = []string{"p/*"} })
	if got := c.pull(t, "p/q@"+want.String()); got != want {
		t.Fatalf("C pulled %s, want %s", got, want)
	}
	eventually(t, 5*time.Second, "C's bytes to be counted", func() bool { return c.m.Stats().ServedPeers >= total })
	if st := c.m.Stats(); st.FetchedPeers <= total || st.ServedUpstream != 0 || st.FetchedUpstream != 0 { // the manifest came from peers too
		t.Errorf("C: %+v", st)
	}
}

// hostileRecipes serves, for one digest, a recipe of blocks the node
// really holds but that do not make up the blob, and those blocks under
// the blob's digest (p2p.RecipeBlocks).
type hostileRecipes struct {
	digest string
	raw    []byte
	ids    []flat.BlockID
}

func (h hostileRecipes) BlobBlocks(_ context.Context, d string) ([]flat.BlockID, bool) {
	return h.ids, d == h.digest
}

func (h hostileRecipes) Recipe(_ context.Context, d string) ([]byte, error) {
	if d != h.digest {
		return nil, ErrNotFound
	}
	return h.raw, nil
}

// TestHostilePeer: a peer whose recipe assembles into the wrong blob is
// struck, and the blob comes from upstream; the client gets the right one.
func TestHostilePeer(t *testing.T) {
	t.Parallel()
	up := startUpstream(t)
	img := up.push(t, "h/i:v1", 1, layerSize)
	layer := layerDigests(t, img)[0]
	d := layer.Digest.String()

	// The hostile node holds random blocks that a forged recipe for d
	// names; each block verifies against its ID, the whole does not.
	hstore := openStore(t, "")
	junk := make([]byte, layer.Size)
	for i := range junk {
		junk[i] = byte(rand.Uint32())
	}
	forged, err := cut(d, junk)
	if err != nil {
		t.Fatal(err)
	}
	for i := range forged.ids {
		id, off, n := forged.block(i)
		if err := hstore.Put(t.Context(), id, junk[off:off+n]); err != nil {
			t.Fatal(err)
		}
	}
	h := swarmNode(t, hstore, nil)
	h.ServeRecipes(hostileRecipes{digest: d, raw: forged.encode(), ids: forged.ids})
	if err := h.ProvideBlob(t.Context(), d); err != nil {
		t.Logf("provide (local record only): %v", err)
	}

	store := openStore(t, "")
	n := swarmNode(t, store, h.Addrs())
	b := startMirror(t, up, store, SwarmPeers(n), nil)
	n.ServeRecipes(b.m)
	eventually(t, 10e9, "B to see the hostile provider", func() bool {
		ps, _ := SwarmPeers(n).Providers(t.Context(), d)
		return len(ps) == 1
	})

	resp, body, err := do(t, "GET", b.srv.URL+"/v2/h/i/blobs/"+d, nil)
	if err != nil || resp.StatusCode != 200 || digestOf(body) != d {
		t.Fatalf("blob through a mirror with a hostile peer: %d, %d bytes hashing to %s, %v", resp.StatusCode, len(body), digestOf(body), err)
	}
	eventually(t, 5*time.Second, "the bytes to be counted", func() bool { return b.m.Stats().ServedUpstream == layer.Size })
	st := b.m.Stats()
	if st.BadPeerBlobs != 1 || st.ServedPeers != 0 {
		t.Errorf("stats: %+v", st)
	}
	if info, ok := n.PeerInfo(h.ID()); !ok || info.BadBlocks == 0 {
		t.Errorf("the hostile peer was not struck: %+v", info)
	}
	// What is kept is the real blob.
	b.settle(t)
	raw, err := b.m.Recipe(t.Context(), d)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := decodeRecipe(raw, d, -1, 1<<30)
	if err != nil || rc.ids[0] == forged.ids[0] {
		t.Errorf("kept recipe: %v (forged: %v)", err, rc.ids[0] == forged.ids[0])
	}
}

// TestRecipe round-trips a recipe and refuses damaged ones, and ones that
// disagree with the blob's size.
func TestRecipe(t *testing.T) {
	t.Parallel()
	data := make([]byte, 3*ChunkSize+5)
	for i := range data {
		data[i] = byte(i * 7)
	}
	d := digestOf(data)
	r, err := cut(d, data)
	if err != nil {
		t.Fatal(err)
	}
	raw := r.encode()
	size := int64(len(data))
	if len(raw) != recipeLen(size) {
		t.Errorf("recipe of %d bytes, recipeLen says %d", len(raw), recipeLen(size))
	}
	for _, known := range []int64{-1, size} {
		got, err := decodeRecipe(raw, d, known, 1<<30)
		if err != nil || got.size != size || len(got.ids) != 4 || got.ids[3] != flat.Sum(data[3*ChunkSize:]) {
			t.Fatalf("round trip (size %d): %+v %v", known, got, err)
		}
	}
	flip := func(i int) []byte { b := append([]byte(nil), raw...); b[i] ^= 1; return b }
	other := func(size, chunk int64, ids []flat.BlockID) []byte {
		return (&recipe{digest: r.digest, size: size, chunk: chunk, ids: ids}).encode()
	}
	for _, tc := range []struct {
		name  string
		b     []byte
		known int64
	}{
		{"empty", nil, -1},
		{"truncated", raw[:len(raw)-1], -1},
		{"flipped id", flip(len(raw) - 40), -1},
		{"flipped magic", flip(0), -1},
		{"other chunk size", other(size, 64<<10, make([]flat.BlockID, 49)), -1},
		{"larger than stated", raw, size - 1},
		{"smaller than stated", raw, size + 1},
		{"a block more than stated", raw, size + ChunkSize},
		{"stated size past the limit", raw, 1 << 31},
	} {
		if _, err := decodeRecipe(tc.b, d, tc.known, 1<<30); !errors.Is(err, ErrBadRecipe) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if _, err := decodeRecipe(raw, digestOf([]byte("other")), -1, 1<<30); !errors.Is(err, ErrBadRecipe) {
		t.Errorf("recipe for another blob accepted: %v", err)
	}
	if _, err := decodeRecipe(raw, d, -1, 100); !errors.Is(err, ErrBadRecipe) {
		t.Errorf("oversized blob accepted: %v", err)
	}
}

var _ Blocks = (*blockstore.Store)(nil)

// allocated returns the heap bytes fn allocates, measured up to three
// times while over ceiling: a goroutine of another test may allocate
// during one run.
func allocated(fn func(), ceiling int64) int64 {
	least := int64(math.MaxInt64)
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		fn()
		runtime.ReadMemStats(&after)
		if least = min(least, int64(after.TotalAlloc-before.TotalAlloc)); least <= ceiling {
			break
		}
	}
	return least
}

// FuzzDecodeRecipe: any bytes decode to a consistent recipe or to
// ErrBadRecipe, without panics, and within a memory ceiling: whatever
// size a recipe claims, decoding allocates at most a constant plus the
// recipe's own length, with the blob's size known or not.
func FuzzDecodeRecipe(f *testing.F) {
	data := make([]byte, 2*ChunkSize+1)
	d := digestOf(data)
	r, _ := cut(d, data)
	f.Add(r.encode())
	f.Add([]byte("SHRC1"))
	huge := &recipe{digest: r.digest, size: 1 << 36, chunk: ChunkSize, ids: make([]flat.BlockID, 16)}
	f.Add(huge.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, size := range []int64{-1, int64(len(data))} {
			var got *recipe
			var err error
			ceiling := 4<<10 + int64(len(b))
			if alloc := allocated(func() { got, err = decodeRecipe(b, d, size, 1<<40) }, ceiling); alloc > ceiling {
				t.Fatalf("decoding %d bytes (size %d) allocated %d bytes, ceiling %d", len(b), size, alloc, ceiling)
			}
			if err != nil {
				if !errors.Is(err, ErrBadRecipe) {
					t.Fatalf("error not ErrBadRecipe: %v", err)
				}
				continue
			}
			if got.digestString() != d || got.chunk != ChunkSize || int64(len(got.ids)) != (got.size+got.chunk-1)/got.chunk {
				t.Fatalf("inconsistent recipe: %+v", got)
			}
			if size >= 0 && got.size != size {
				t.Fatalf("recipe of %d bytes accepted for a blob of %d", got.size, size)
			}
			if string(got.encode()) != string(b) {
				t.Fatal("recipe does not re-encode to its bytes")
			}
		}
	})
}
