package mirror

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/p2p"
)

// upstreamRig is go-containerregistry's in-memory registry on loopback,
// counting blob GETs and their body bytes, with switches to corrupt blob
// bytes, hold blob answers, or answer 503 to everything.
type upstreamRig struct {
	srv  *httptest.Server
	host string

	blobGets, blobBytes, manifestGets atomic.Int64
	corrupt                           atomic.Bool            // flip a byte of every blob body
	lieDigest                         atomic.Bool            // state a wrong Docker-Content-Digest for manifests
	down                              atomic.Bool            // 503 for everything
	noLength                          atomic.Bool            // blob answers without Content-Length (chunked)
	token                             atomic.Pointer[string] // non-nil: every request needs "Bearer <token>"

	mu   sync.Mutex
	gate chan struct{} // non-nil: blob GETs wait for it to close
}

func startUpstream(t *testing.T) *upstreamRig {
	t.Helper()
	u := &upstreamRig{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u.down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if tok := u.token.Load(); tok != nil {
			if r.URL.Path == "/token" { // anonymous clients' token: it opens nothing
				_, _ = w.Write([]byte(`{"token":"anonymous"}`))
				return
			}
			if r.Header.Get("Authorization") != "Bearer "+*tok {
				w.Header().Set("WWW-Authenticate", `Bearer realm="`+u.srv.URL+`/token",service="rig"`)
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
		}
		if u.noLength.Load() && strings.Contains(r.URL.Path, "/blobs/") {
			w = &lengthDropper{ResponseWriter: w}
		}
		blob := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/") {
			u.manifestGets.Add(1)
			if u.lieDigest.Load() {
				w = &headerRewriter{ResponseWriter: w}
			}
		}
		if !blob {
			inner.ServeHTTP(w, r)
			return
		}
		u.blobGets.Add(1)
		u.mu.Lock()
		gate := u.gate
		u.mu.Unlock()
		if gate != nil {
			<-gate
		}
		cw := &countWriter{ResponseWriter: w, corrupt: u.corrupt.Load()}
		inner.ServeHTTP(cw, r)
		u.blobBytes.Add(cw.n)
	}))
	u.host = strings.TrimPrefix(u.srv.URL, "http://")
	t.Cleanup(u.srv.Close)
	return u
}

// hold makes blob GETs wait until the returned func is called.
func (u *upstreamRig) hold() (release func()) {
	ch := make(chan struct{})
	u.mu.Lock()
	u.gate = ch
	u.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			u.mu.Lock()
			u.gate = nil
			u.mu.Unlock()
			close(ch)
		})
	}
}

type countWriter struct {
	http.ResponseWriter
	n       int64
	corrupt bool
}

func (w *countWriter) Write(b []byte) (int, error) {
	if w.corrupt && len(b) > 0 {
		b = append([]byte(nil), b...)
		b[len(b)/2] ^= 0xff
		w.corrupt = false
	}
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

// headerRewriter states a wrong digest for whatever it answers.
type headerRewriter struct{ http.ResponseWriter }

func (h *headerRewriter) WriteHeader(code int) {
	if h.Header().Get("Docker-Content-Digest") != "" {
		h.Header().Set("Docker-Content-Digest", "sha256:"+strings.Repeat("ab", 32))
	}
	h.ResponseWriter.WriteHeader(code)
}

func (h *headerRewriter) Write(b []byte) (int, error) { return h.ResponseWriter.Write(b) }

// lengthDropper answers without a Content-Length: chunked for a GET, no
// size for a HEAD.
type lengthDropper struct{ http.ResponseWriter }

func (l *lengthDropper) WriteHeader(code int) {
	l.Header().Del("Content-Length")
	l.ResponseWriter.WriteHeader(code)
}

func (l *lengthDropper) Write(b []byte) (int, error) { return l.ResponseWriter.Write(b) }

// push pushes a random image of layers × size-byte layers to the upstream.
func (u *upstreamRig) push(t *testing.T, repoTag string, layers int, size int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, int64(layers))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(u.host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context())); err != nil {
		t.Fatal(err)
	}
	return img
}

// pushBlob pushes an image of one random layer of about size bytes and
// returns the layer's blob and digest.
func (u *upstreamRig) pushBlob(t *testing.T, repoTag string, size int64) ([]byte, string) {
	t.Helper()
	layers, err := u.push(t, repoTag, 1, size).Layers()
	if err != nil {
		t.Fatal(err)
	}
	return blobBytes(t, layers[0])
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// openStore opens a block cache in dir ("": a temporary one), with small
// badger sizes, no free-space reserve, and opts on top.
func openStore(t *testing.T, dir string, opts ...blockstore.Option) *blockstore.Store {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	base := []blockstore.Option{blockstore.WithMemTableSize(4 << 20), blockstore.WithValueLogFileSize(64 << 20),
		blockstore.WithGCInterval(0), blockstore.WithMinFreeSpace(0), blockstore.WithLogger(testLogger(t))}
	s, err := blockstore.Open(t.Context(), dir, append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// rig is one mirror on loopback with its own block cache.
type rig struct {
	m     *Mirror
	srv   *httptest.Server
	host  string
	store *blockstore.Store
	dir   string
}

func startMirror(t *testing.T, up *upstreamRig, store *blockstore.Store, peers Peers, tweak func(*Config)) *rig {
	t.Helper()
	if store == nil {
		store = openStore(t, "")
	}
	r := &rig{store: store, dir: t.TempDir()}
	cfg := Config{Dir: r.dir, Blocks: r.store, Peers: peers, Logger: testLogger(t)}
	if up != nil {
		cfg.Upstreams = []Upstream{{Host: up.host, PlainHTTP: true, Default: true}}
	}
	if tweak != nil {
		tweak(&cfg)
	}
	r.dir = cfg.Dir
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.m = m
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = m.Run(ctx); close(done) }()
	r.srv = httptest.NewServer(m)
	r.host = strings.TrimPrefix(r.srv.URL, "http://")
	t.Cleanup(func() {
		r.srv.Close()
		cancel()
		<-done
	})
	return r
}

// pull reads every blob of repoTag through the mirror with ggcr (as a
// client that uses the mirror as its registry) and checks each against
// its digest; it returns the image's manifest digest.
func (r *rig) pull(t *testing.T, ref string) v1.Hash {
	t.Helper()
	img := r.image(t, ref)
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, img)
	r.settle(t)
	return d
}

// settle waits for the mirror's fetches to end (kept and announced).
func (r *rig) settle(t *testing.T) {
	t.Helper()
	eventually(t, 10*time.Second, "fetches to end", func() bool {
		r.m.mu.Lock()
		defer r.m.mu.Unlock()
		return len(r.m.flights) == 0
	})
}

func (r *rig) image(t *testing.T, ref string) v1.Image {
	t.Helper()
	pr, err := name.ParseReference(r.host+"/"+ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(pr, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatalf("pull %s through the mirror: %v", ref, err)
	}
	return img
}

// checkImage reads the config and every layer in full; ggcr verifies each
// against its digest at EOF.
func checkImage(t *testing.T, img v1.Image) {
	t.Helper()
	if _, err := img.RawConfigFile(); err != nil {
		t.Fatalf("config: %v", err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("layer: %v", err)
		}
	}
}

// layerBytes is the sum of the image's compressed layer and config sizes.
func layerBytes(t *testing.T, img v1.Image) int64 {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	n := m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}

// swarmNode is a real p2p node on loopback serving a block cache.
func swarmNode(t *testing.T, store *blockstore.Store, boot []string) *p2p.Node {
	t.Helper()
	n, err := p2p.New(t.Context(), p2p.Config{
		ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, BootstrapPeers: boot,
		Blocks: store, Logger: testLogger(t), RefreshInterval: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = n.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return n
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
