package daemon

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
)

// requestLog is an in-memory registry on loopback that records every
// request as "METHOD path".
type requestLog struct {
	host string
	mu   sync.Mutex
	reqs []string
}

func newRequestLog(t *testing.T) *requestLog {
	t.Helper()
	l := &requestLog{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		l.mu.Lock()
		l.reqs = append(l.reqs, r.Method+" "+r.URL.Path)
		l.mu.Unlock()
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	l.host = strings.TrimPrefix(srv.URL, "http://")
	return l
}

func (l *requestLog) count(method, suffix string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.reqs {
		if strings.HasPrefix(r, method+" ") && strings.HasSuffix(r, suffix) {
			n++
		}
	}
	return n
}

// swarmNode is a node wired to a p2p node as the daemon wires them, on
// loopback, without the API or FUSE.
func startSwarmNode(t *testing.T, boot []string) (*node.Node, *p2p.Node) {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	blocks := &lateStore{}
	sw, err := p2p.New(t.Context(), p2p.Config{
		ListenAddrs:    []string{"/ip4/127.0.0.1/tcp/0"},
		BootstrapPeers: boot,
		Blocks:         blocks,
		Logger:         quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	vis, err := RegistryConfig{}.visibility()
	if err != nil {
		t.Fatal(err)
	}
	n, err := node.Open(t.Context(), t.TempDir(), node.WithPlainHTTP(true), node.WithLogger(quiet),
		node.WithPeers(swarm{sw}), node.WithoutTraceLookup(), node.WithVisibility(vis))
	if err != nil {
		t.Fatal(err)
	}
	blocks.p.Store(n.Store())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sw.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("swarm: %v", err)
		}
		_ = n.Close()
	})
	return n, sw
}

// Six nodes whose swarm knows the image (their records are out) resolve
// it at the same moment: the registry serves its manifest and its index
// once each — to their designated fetchers — and a HEAD per node; every
// other node has both from the swarm.
func TestResolveManifestAndIndexFromSwarm(t *testing.T) {
	t.Parallel()
	const k = 6
	reg := newRequestLog(t)
	ref := pushAndConvertFile(t, reg.host+"/app:v1", "data/file", []byte("hello from the swarm\n"))
	flatRef, err := fetch.FlatRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	im, err := fetch.OpenImage(t.Context(), flatRef, fetch.WithPlainHTTP(true), fetch.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	digest := im.Digest()
	index, _ := im.IndexBlob()

	nodes := make([]*node.Node, k)
	sws := make([]*p2p.Node, k)
	for i := range k {
		var boot []string
		if i > 0 {
			boot = sws[0].Addrs()
		}
		nodes[i], sws[i] = startSwarmNode(t, boot)
	}
	key, err := p2p.ImageKey(digest)
	if err != nil {
		t.Fatal(err)
	}
	for i, sw := range sws {
		for deadline := time.Now().Add(15 * time.Second); sw.ProvideBlob(t.Context(), digest) != nil; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("node %d could not provide the image record", i)
			}
		}
	}
	for i, sw := range sws {
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if provs, err := sw.FindProviders(t.Context(), key, 100); err == nil && len(provs) == k-1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d does not find the %d others", i, k-1)
			}
		}
	}
	manifestGETs := func() int {
		return reg.count(http.MethodGet, "/manifests/"+digest) + reg.count(http.MethodGet, "/manifests/v1-shoal")
	}
	indexGETs := func() int { return reg.count(http.MethodGet, "/blobs/"+index.Digest.String()) }
	m0, i0, h0 := manifestGETs(), indexGETs(), reg.count(http.MethodHead, "/manifests/v1-shoal")

	var wg sync.WaitGroup
	start := make(chan struct{})
	took := make([]time.Duration, k)
	for i, n := range nodes {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			img, err := n.Resolve(t.Context(), ref)
			took[i] = time.Since(t0)
			if err != nil || img.Digest != digest {
				t.Errorf("node %d: %v, %v", i, img, err)
			}
		})
	}
	close(start)
	wg.Wait()
	var manifests, indexes, notMember int64
	for i, sw := range sws {
		st := sw.Stats()
		manifests += st.ManifestsFetched
		indexes += st.IndexesFetched
		notMember += st.NotMemberReceived
		t.Logf("node %d: resolved in %v; manifest from peers %d, index from peers %d, NOT_MEMBER answers %d", i, took[i], st.ManifestsFetched, st.IndexesFetched, st.NotMemberReceived)
	}
	m, x, h := manifestGETs()-m0, indexGETs()-i0, reg.count(http.MethodHead, "/manifests/v1-shoal")-h0
	t.Logf("registry: %d manifest GETs, %d index GETs, %d HEADs", m, x, h)
	// The records are out before any node opens the image: a node that
	// asks a blob's designated fetcher before that one has begun to open
	// it is told, truthfully, NOT_MEMBER (as by a restarted daemon), and
	// may then read the blob from the registry itself. Each such answer
	// may cost one registry copy; without one, the registry serves each
	// blob once.
	if m > 1+int(notMember) || x > 1+int(notMember) || m+int(manifests) != k || x+int(indexes) != k || h != k {
		t.Errorf("registry served %d manifests and %d indexes (want 1 each, plus one per NOT_MEMBER answer: %d) and %d HEADs (want %d); peers served %d manifests and %d indexes (want the rest of %d each)",
			m, x, notMember, h, k, manifests, indexes, k)
	}
	for i, d := range took {
		if d > 2*time.Second {
			t.Errorf("node %d took %v to resolve", i, d)
		}
	}
}
