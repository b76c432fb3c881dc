package mirror

import (
	"bytes"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/p2p"
)

// blobBytes returns a layer's blob (its compressed bytes) and digest.
func blobBytes(t *testing.T, l v1.Layer) ([]byte, string) {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b, digestOf(b)
}

// swarmName is the name a private blob goes by in the swarm, from its
// bytes, as a holder derives it.
func swarmName(t *testing.T, b []byte) string {
	t.Helper()
	d := digestOf(b)
	w, err := windowOf(bytes.NewReader(b), d, int64(len(b)))
	if err != nil {
		t.Fatalf("window of %s: %v", d, err)
	}
	name, _ := p2p.PrivateBlob(d, w)
	return name
}

// TestPrivateBlobsFromPeers: two mirrors on real p2p nodes in front of a
// real docker-registry behind htpasswd (through a byte-counting proxy),
// their clients with the registry's credentials. A pulls a private image
// of two 3 MiB gzip layers; B pulls it after A, and each layer's bytes
// come from A over the swarm, under the layer's name: the registry sends
// B only each layer's 4 KiB window, the small config whole (under the
// 1 MiB rule) and the manifest. The DHT holds A's record under each
// layer's name, none under its digest. An outsider node that knows the
// digests, the names (the DHT shows them) and every block ID gets nothing
// from A: no recipe and no block, under the digest or the name (DENIED).
func TestPrivateBlobsFromPeers(t *testing.T) {
	t.Parallel()
	reg := testenv.StartRegistry(t, testenv.WithBasicAuth(alice, alicePass))
	proxy := reg.Proxy(t)
	img := pushRandom(t, reg, "team/app:v1", 2, 3<<20)
	want, _ := img.Digest()
	creds := &authn.Basic{Username: alice, Password: alicePass}

	start := func(boot []string) (*rig, *p2p.Node) {
		store := openStore(t, "")
		n := swarmNode(t, store, boot)
		r := startMirror(t, nil, store, SwarmPeers(n), func(c *Config) {
			c.Upstreams = []Upstream{{Host: proxy.Host, PlainHTTP: true, Default: true}}
		})
		n.ServeRecipes(r.m)
		return r, n
	}
	a, na := start(nil)
	b, nb := start(na.Addrs())

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	type layer struct {
		data         []byte
		digest, name string
	}
	var ls []layer
	var layerTotal int64
	for _, l := range layers {
		data, d := blobBytes(t, l)
		ls = append(ls, layer{data, d, swarmName(t, data)})
		layerTotal += int64(len(data))
	}
	pull := func(r *rig) {
		t.Helper()
		got, err := crane.Pull(r.host+"/team/app:v1", crane.Insecure, crane.WithAuth(creds), crane.WithContext(t.Context()))
		if err != nil {
			t.Fatalf("crane pull with credentials: %v", err)
		}
		if d, _ := got.Digest(); d != want {
			t.Fatalf("pulled %s, want %s", d, want)
		}
		checkImage(t, got)
		r.settle(t)
	}

	pull(a)
	eventually(t, 10*time.Second, "A to name and announce its private layers", func() bool {
		st := a.m.Stats()
		return st.Named == 2 && st.Provided >= 2
	})
	if st := a.m.Stats(); st.KeptPublic != 0 || st.Provided != 2 {
		t.Errorf("A: %d public blobs kept, %d records announced; want 0 and the 2 layers' names", st.KeptPublic, st.Provided)
	}
	for _, l := range ls {
		eventually(t, 20*time.Second, "B to find A under the layer's name", func() bool {
			ps, _ := nb.BlobProviders(t.Context(), l.name, 4)
			return slices.Contains(ps, na.ID())
		})
		if ps, _ := nb.BlobProviders(t.Context(), l.digest, 4); len(ps) != 0 {
			t.Errorf("the DHT has providers of private %s under its digest: %v", l.digest, ps)
		}
	}

	proxy.Reset()
	pull(b)
	var windowBytes, layerUpstream, otherBlobs int64
	for _, req := range proxy.Requests() {
		if req.Method != "GET" || !strings.Contains(req.Path, "/blobs/") {
			continue
		}
		isLayer := false
		for _, l := range ls {
			if strings.Contains(req.Path, l.digest) {
				isLayer = true
				layerUpstream += req.Bytes
				if req.Range != "" {
					windowBytes += req.Bytes
				}
			}
		}
		if !isLayer {
			otherBlobs += req.Bytes
		}
	}
	st := b.m.Stats()
	t.Logf("B: layers %d bytes, %d from peers; upstream sent %d layer bytes (%d of them windows, %d window reads) and %d bytes of other blobs (the config)",
		layerTotal, st.FetchedPeers, layerUpstream, windowBytes, st.Windows, otherBlobs)
	if layerUpstream != 2*windowLen || windowBytes != 2*windowLen {
		t.Errorf("upstream sent B %d layer bytes (%d in windows), want only the two windows (%d)", layerUpstream, windowBytes, 2*windowLen)
	}
	if st.FetchedPeers != layerTotal {
		t.Errorf("B fetched %d bytes from peers, want both layers (%d)", st.FetchedPeers, layerTotal)
	}
	for _, l := range ls {
		resp, body, err := do(t, "GET", b.srv.URL+"/v2/team/app/blobs/"+l.digest, map[string]string{"Authorization": basic(alice, alicePass)})
		if err != nil || resp.StatusCode != 200 || !bytes.Equal(body, l.data) {
			t.Errorf("B's layer %s: %d, %d bytes, equal %v, %v", l.digest, resp.StatusCode, len(body), bytes.Equal(body, l.data), err)
		}
	}

	t.Run("outsider", func(t *testing.T) {
		e := swarmNode(t, openStore(t, ""), na.Addrs())
		for _, l := range ls {
			r, err := cut(l.digest, l.data)
			if err != nil {
				t.Fatal(err)
			}
			blocks := make([]flat.Block, len(r.ids))
			for i := range r.ids {
				id, _, n := r.block(i)
				blocks[i] = flat.Block{ID: id, ULen: uint32(n)}
			}
			ps, _ := e.BlobProviders(t.Context(), l.name, 4)
			if !slices.Contains(ps, na.ID()) {
				t.Errorf("the outsider does not see A under %s in the DHT: %v", l.name, ps)
			}
			for _, key := range []string{l.digest, l.name} {
				if raw, err := e.FetchRecipe(t.Context(), na.ID(), key); !errors.Is(err, p2p.ErrNoRecipe) || len(raw) != 0 {
					t.Errorf("outsider's recipe under %s: %d bytes, %v; want ErrNoRecipe", key, len(raw), err)
				}
				got, err := e.FetchBlobBlocks(t.Context(), na.ID(), key, blocks)
				if len(got) != 0 {
					t.Errorf("outsider: %d blocks under %s", len(got), key)
				}
				if key == l.name && !errors.Is(err, p2p.ErrDenied) {
					t.Errorf("outsider's blocks under the name: %v, want DENIED", err)
				}
			}
		}
		if st := e.Stats(); st.BytesDownloaded != 0 || st.BlocksFetched != 0 || st.DeniedReceived == 0 {
			t.Errorf("outsider: %d bytes, %d blocks, %d DENIED", st.BytesDownloaded, st.BlocksFetched, st.DeniedReceived)
		}
	})
}

// namingPeers is a swarm that has nothing and records what the mirror
// does with private blobs: the names it registers (and with which
// window), looks up and announces.
type namingPeers struct {
	recordingPeers
	mu         sync.Mutex
	registered map[string]string // name → digest, while registered
	windows    map[string][]byte // digest → the window it was registered with
}

func newNamingPeers() *namingPeers {
	return &namingPeers{registered: map[string]string{}, windows: map[string][]byte{}}
}

func (p *namingPeers) AddPrivate(digest string, window []byte) string {
	name, _ := p2p.PrivateBlob(digest, window)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.registered[name] = digest
	p.windows[digest] = append([]byte(nil), window...)
	return name
}

func (p *namingPeers) RemovePrivate(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.registered, name)
}

func (p *namingPeers) names() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.registered)
}

func (p *namingPeers) provides() []string {
	p.recordingPeers.mu.Lock()
	defer p.recordingPeers.mu.Unlock()
	return slices.Clone(p.provided)
}

// forget empties what was registered and announced (a restart).
func (p *namingPeers) forget() {
	p.mu.Lock()
	p.registered = map[string]string{}
	p.mu.Unlock()
	p.recordingPeers.mu.Lock()
	p.provided = nil
	p.recordingPeers.mu.Unlock()
}

// TestPrivateWindowRule: of a private image's blobs, only those of at
// least 1 MiB that start with gzip's or zstd's magic get a swarm name;
// the name, never the digest, is announced and looked up. A 300 kB gzip
// layer, a 2 MiB uncompressed one, the config and the manifest get no
// name and are not announced. The asker's window, read upstream with the
// client's credentials, is the holder's, read from its kept copy. After a
// restart the names are derived again from the kept copies and announced
// again. Recipe and BlobBlocks answer a name, not the digest.
func TestPrivateWindowRule(t *testing.T) {
	t.Parallel()
	peers := newNamingPeers()
	a := startAuthRig(t, func(c *Config) { c.Peers = peers })
	randomBytes := func(n int, head ...byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rand.Uint32())
		}
		copy(b, head)
		return b
	}
	gzBig, err := random.Layer(3<<20, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	gzSmall, err := random.Layer(300_000, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	zstd := static.NewLayer(randomBytes(2<<20, 0x28, 0xb5, 0x2f, 0xfd), types.OCILayerZStd)
	raw := static.NewLayer(randomBytes(2<<20, 'b', 'i', 'n', '/'), types.OCIUncompressedLayer)
	img, err := mutate.AppendLayers(empty.Image, gzBig, gzSmall, zstd, raw)
	if err != nil {
		t.Fatal(err)
	}
	pushImage(t, a.priv, "team/app:v1", img)

	data := map[string][]byte{}
	var named, unnamed []string
	for i, l := range []v1.Layer{gzBig, gzSmall, zstd, raw} {
		b, d := blobBytes(t, l)
		data[d] = b
		if i == 0 || i == 2 {
			named = append(named, d)
		} else {
			unnamed = append(unnamed, d)
		}
	}
	for _, d := range append(append([]string(nil), named...), unnamed...) {
		if status, _, body := a.get(t, "GET", "/v2/team/app/blobs/"+d, basic(alice, alicePass)); status != 200 || !bytes.Equal(body, data[d]) {
			t.Fatalf("GET %s: %d %s", d, status, brief(body))
		}
	}
	if status, _, _ := a.get(t, "GET", "/v2/team/app/manifests/v1", basic(alice, alicePass)); status != 200 {
		t.Fatalf("manifest: %d", status)
	}
	a.settle(t)
	wantNames := map[string]string{}
	for _, d := range named {
		wantNames[swarmName(t, data[d])] = d
	}
	others := append(slices.Clone(testenv.ImageBlobs(t, img)[:2]), unnamed...) // manifest, config, small, raw
	check := func(r *rig, when string) {
		t.Helper()
		eventually(t, 5*time.Second, "the names to be announced", func() bool {
			return len(peers.provides()) >= len(wantNames)
		})
		if got := peers.names(); !maps.Equal(got, wantNames) {
			t.Errorf("%s: names registered %v, want %v", when, got, wantNames)
		}
		if got := r.m.Stats().Named; got != len(wantNames) {
			t.Errorf("%s: %d blobs named, want %d", when, got, len(wantNames))
		}
		for _, key := range peers.provides() {
			if _, ok := wantNames[key]; !ok {
				t.Errorf("%s: announced %s, not one of the names", when, key)
			}
		}
		for name, d := range wantNames {
			if _, err := r.m.Recipe(t.Context(), name); err != nil {
				t.Errorf("%s: Recipe under the name of %s: %v", when, d, err)
			}
			if _, ok := r.m.BlobBlocks(t.Context(), name); !ok {
				t.Errorf("%s: BlobBlocks under the name of %s: none", when, d)
			}
		}
		for _, d := range append(append([]string(nil), named...), others...) {
			if _, err := r.m.Recipe(t.Context(), d); err == nil {
				t.Errorf("%s: Recipe returned private %s by digest", when, d)
			}
			if _, ok := r.m.BlobBlocks(t.Context(), d); ok {
				t.Errorf("%s: BlobBlocks returned private %s by digest", when, d)
			}
		}
	}
	check(a.rig, "kept")
	// The asker looked the named blobs up under their names, with the
	// holder's window; no digest of the image was looked up or announced.
	for name, d := range wantNames {
		if looked, _ := peers.saw(name); !looked {
			t.Errorf("%s was not looked up under its name", d)
		}
		off := windowOffset(d, int64(len(data[d])))
		peers.mu.Lock()
		w := peers.windows[d]
		peers.mu.Unlock()
		if !bytes.Equal(w, data[d][off:off+windowLen]) {
			t.Errorf("the window registered for %s is not its bytes at %d", d, off)
		}
	}
	for _, d := range testenv.ImageBlobs(t, img) {
		if looked, provided := peers.saw(d); looked || provided {
			t.Errorf("private %s: looked up by digest %v, announced %v", d, looked, provided)
		}
	}
	if st := a.m.Stats(); st.Windows != 3 || st.WindowBytes != 3*windowLen {
		t.Errorf("window reads: %d (%d bytes), want 3: the two named layers and the 2 MiB uncompressed one (the asker cannot see the magic)", st.Windows, st.WindowBytes)
	}

	// A restart names the kept blobs again from their kept copies.
	a.srv.Close()
	_ = a.m.Close()
	peers.forget()
	check(a.restart(t, a.rig, func(c *Config) { c.Peers = peers }), "after a restart")
}

// TestWindowOf: the rule's edges (1 MiB exactly named, a byte less not;
// gzip and zstd magic named, anything else not), and the window whole
// inside the blob, at the same offset each time.
func TestWindowOf(t *testing.T) {
	t.Parallel()
	gz := []byte{0x1f, 0x8b, 8, 0}
	zst := []byte{0x28, 0xb5, 0x2f, 0xfd}
	for _, tc := range []struct {
		name  string
		size  int
		head  []byte
		named bool
	}{
		{"gzip, 1 MiB", minNamedSize, gz, true},
		{"gzip, a byte under 1 MiB", minNamedSize - 1, gz, false},
		{"zstd, 5 MiB", 5 << 20, zst, true},
		{"tar, 5 MiB", 5 << 20, []byte("bin/"), false},
		{"zeros, 2 MiB", 2 << 20, nil, false},
		{"gzip magic cut short", 2 << 20, gz[:1], false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := make([]byte, tc.size)
			for i := len(tc.head); i < len(b) && tc.head != nil; i++ {
				b[i] = byte(i * 131)
			}
			copy(b, tc.head)
			d := digestOf(b)
			w, err := windowOf(bytes.NewReader(b), d, int64(len(b)))
			if !tc.named {
				if !errors.Is(err, errUnnamed) {
					t.Fatalf("named (%v), want errUnnamed", err)
				}
				return
			}
			off := windowOffset(d, int64(len(b)))
			if err != nil || off < 0 || off+windowLen > int64(len(b)) || !bytes.Equal(w, b[off:off+windowLen]) {
				t.Fatalf("window at %d of %d bytes: %v", off, len(b), err)
			}
			if again := windowOffset(d, int64(len(b))); again != off {
				t.Errorf("offset %d, then %d", off, again)
			}
		})
	}
	if off := windowOffset(digestOf(nil), windowLen); off != 0 {
		t.Errorf("a blob of one window: offset %d", off)
	}
}

// TestSharedBlobNamed: a blob of a shared repository (read with the
// daemon's credentials for every client) goes to the swarm like a private
// one: its window is read with the daemon's credentials, and it is kept
// as shared under its name, which alone is announced.
func TestSharedBlobNamed(t *testing.T) {
	t.Parallel()
	peers := newNamingPeers()
	a := startAuthRig(t, func(c *Config) {
		c.Peers = peers
		c.Keychain = staticKeychain{&authn.Basic{Username: alice, Password: alicePass}}
		c.Upstreams[0].SharedRepositories = []string{"shared/*"}
	})
	img := pushRandom(t, a.priv, "shared/tools:v1", 1, 2<<20)
	l := layerDigests(t, img)[0].Digest.String()
	status, _, body := a.get(t, "GET", "/v2/shared/tools/blobs/"+l, "") // anonymous: the daemon's credentials
	if status != 200 || digestOf(body) != l {
		t.Fatalf("shared layer: %d %s", status, brief(body))
	}
	a.settle(t)
	name := swarmName(t, body)
	eventually(t, 5*time.Second, "the name to be announced", func() bool { return len(peers.provides()) == 1 })
	if c := a.m.keep.class(l); c != classShared {
		t.Errorf("kept as %s, want shared", c)
	}
	if got := peers.provides(); got[0] != name {
		t.Errorf("announced %v, want the name %s", got, name)
	}
	if looked, _ := peers.saw(name); !looked || a.m.Stats().Windows != 1 {
		t.Errorf("looked up under the name: %v; %d window reads", looked, a.m.Stats().Windows)
	}
	if _, err := a.m.Recipe(t.Context(), name); err != nil {
		t.Errorf("Recipe under the name: %v", err)
	}
}
