package fetch

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
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
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
)

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

// fault is what the test registry does to one range request.
type fault int

const (
	faultNone     fault = iota
	fault500            // answer 500
	fault429            // answer 429 with Retry-After: 0
	fault404            // answer 404 (as for a blob that is gone)
	faultDrop           // send half the body, then drop the connection
	faultCorrupt        // flip a byte in the middle of the body
	faultStall          // send half the body, then nothing until the client leaves
	faultHang           // send nothing at all until the client leaves
	faultNoRange        // ignore the Range header: answer 200 with the whole blob
	faultRedirect       // redirect to /storage/..., which serves the range
)

// testRegistry is go-containerregistry's in-memory registry behind a
// middleware that counts blob traffic and injects faults into range requests.
// Range requests are the data-blob reads; the index is fetched without one.
type testRegistry struct {
	Host string

	inner http.Handler
	auth  *[2]string // user, password; nil: no auth

	rangeRequests atomic.Int64 // range requests answered (faulty ones included)
	rangeBytes    atomic.Int64 // body bytes sent in answer to them
	blobRequests  atomic.Int64 // every blob GET, range or not
	delay         atomic.Int64 // nanoseconds to wait before answering a range request

	mu    sync.Mutex
	fault func(n int64) fault // n: 1 for the first range request
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	return serveRegistry(t, registry.New(registry.Logger(log.New(io.Discard, "", 0))), nil)
}

// serveRegistry serves h (a registry.New handler, possibly shared with
// another testRegistry) behind the middleware; with auth set it demands HTTP
// basic auth, as a registry with htpasswd does.
func serveRegistry(t testing.TB, h http.Handler, auth *[2]string) *testRegistry {
	t.Helper()
	r := &testRegistry{inner: h, auth: auth}
	s := httptest.NewServer(r)
	t.Cleanup(s.Close)
	r.Host = strings.TrimPrefix(s.URL, "http://")
	return r
}

func (r *testRegistry) setFault(f func(n int64) fault) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fault = f
}

// always and firstN are fault schedules.
func always(f fault) func(int64) fault { return func(int64) fault { return f } }

func firstN(n int64, f fault) func(int64) fault {
	return func(i int64) fault {
		if i <= n {
			return f
		}
		return faultNone
	}
}

func (r *testRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if r.auth != nil {
		u, p, ok := req.BasicAuth()
		if !ok || u != r.auth[0] || p != r.auth[1] {
			w.Header().Set("WWW-Authenticate", `Basic realm="shoal-test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
			return
		}
	}
	if p, ok := strings.CutPrefix(req.URL.Path, "/storage"); ok {
		// The "object store" a redirected blob GET lands on.
		req = req.Clone(req.Context())
		req.URL.Path = p
		r.serveRange(w, req, faultNone)
		return
	}
	if req.Method != http.MethodGet || !strings.Contains(req.URL.Path, "/blobs/sha256:") {
		r.inner.ServeHTTP(w, req)
		return
	}
	r.blobRequests.Add(1)
	if req.Header.Get("Range") == "" {
		r.inner.ServeHTTP(w, req)
		return
	}
	n := r.rangeRequests.Add(1)
	f := faultNone
	r.mu.Lock()
	if r.fault != nil {
		f = r.fault(n)
	}
	r.mu.Unlock()
	if d := time.Duration(r.delay.Load()); d > 0 {
		time.Sleep(d)
	}
	if f == faultRedirect {
		r.rangeRequests.Add(-1) // counted when /storage serves it
		http.Redirect(w, req, "/storage"+req.URL.Path, http.StatusTemporaryRedirect)
		return
	}
	r.serveRange(w, req, f)
}

// serveRange answers a range request from the inner registry, applying f.
func (r *testRegistry) serveRange(w http.ResponseWriter, req *http.Request, f fault) {
	if strings.HasPrefix(req.URL.Path, "/v2/") && req.Header.Get("Range") == "" {
		http.Error(w, "the redirected request lost its Range header", http.StatusBadRequest)
		return
	}
	switch f {
	case fault500:
		http.Error(w, "injected failure", http.StatusInternalServerError)
		return
	case fault429:
		w.Header().Set("Retry-After", "0")
		http.Error(w, "slow down", http.StatusTooManyRequests)
		return
	case fault404:
		http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}`, http.StatusNotFound)
		return
	case faultHang:
		waitGone(req)
		return
	case faultNoRange:
		req = req.Clone(req.Context())
		req.Header.Del("Range")
	}
	rec := httptest.NewRecorder()
	r.inner.ServeHTTP(rec, req)
	body := rec.Body.Bytes()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	if f == faultCorrupt && len(body) > 0 {
		body = bytes.Clone(body)
		body[len(body)/2] ^= 0x5a
	}
	w.WriteHeader(rec.Code)
	switch f {
	case faultDrop, faultStall:
		half := body[:len(body)/2]
		r.rangeBytes.Add(int64(len(half)))
		w.Write(half)
		w.(http.Flusher).Flush()
		if f == faultStall {
			waitGone(req)
			return
		}
		panic(http.ErrAbortHandler) // closes the connection mid-body
	}
	// Counted before writing: a client may finish reading before Write
	// returns, and tests read the counter as soon as their fetch is done.
	r.rangeBytes.Add(int64(len(body)))
	w.Write(body)
}

// waitGone blocks until the client goes away (or a long time passes, so a
// broken test cannot hang the server's Close).
func waitGone(req *http.Request) {
	select {
	case <-req.Context().Done():
	case <-time.After(20 * time.Second):
	}
}

// testFile is one file of the synthetic image.
type testFile struct {
	name string
	body []byte
}

// testLayers is a synthetic three-layer image: incompressible files that span
// many blocks, compressible ones, small ones that share blocks, an overwrite
// and a whiteout. want is the final tree's regular files.
func testLayers() (layers [][]testFile, want map[string][]byte) {
	rng := rand.New(rand.NewChaCha8([32]byte{'s', 'h', 'o', 'a', 'l'}))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	text := func(n int) []byte {
		var buf bytes.Buffer
		for i := 0; buf.Len() < n; i++ {
			fmt.Fprintf(&buf, "line %d of a compressible file %x\n", i, rng.Uint32()%16)
		}
		return buf.Bytes()[:n]
	}
	l1 := []testFile{
		{"bin/app", random(700 << 10)},
		{"lib/libbig.so", random(500 << 10)},
		{"etc/config.txt", text(200 << 10)},
		{"etc/old", []byte("removed by the next layer")},
	}
	for i := range 20 {
		l1 = append(l1, testFile{fmt.Sprintf("share/small/%02d", i), random(3000 + 500*i)})
	}
	l2 := []testFile{
		{"lib/libbig.so", random(300 << 10)},
		{"etc/.wh.old", nil},
		{"data/blob.bin", random(400 << 10)},
	}
	l3 := []testFile{{"data/notes.txt", text(50 << 10)}}
	layers = [][]testFile{l1, l2, l3}
	want = map[string][]byte{}
	for _, l := range layers {
		for _, f := range l {
			if dir, base, _ := strings.Cut(f.name, ".wh."); base != "" {
				delete(want, dir+base)
				continue
			}
			want[f.name] = f.body
		}
	}
	return layers, want
}

func imageOf(t testing.TB, layers [][]testFile) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, files := range layers {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, f := range files {
			h := &tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.body)),
				ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			if _, err := tw.Write(f.body); err != nil {
				t.Fatal(err)
			}
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		raw := buf.Bytes()
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(raw)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: converter.HostPlatform().Architecture})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

// fixture is the converted test image, served by a fresh middleware (own
// counters and faults) over the registry storage all fixtures share.
type fixture struct {
	reg  *testRegistry
	res  *converter.Result
	want map[string][]byte // final tree's regular files
}

// shared holds the one conversion every fixture uses: converting under the
// race detector takes seconds, and the tests only read the result.
var shared struct {
	once    sync.Once
	handler http.Handler
	res     *converter.Result
	want    map[string][]byte
}

// newFixture returns the synthetic image converted with 16 KiB blocks (many
// blocks from little data), in a registry of the test's own.
func newFixture(t testing.TB) *fixture {
	t.Helper()
	shared.once.Do(func() {
		h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
		s := httptest.NewServer(h)
		defer s.Close()
		host := strings.TrimPrefix(s.URL, "http://")
		layers, want := testLayers()
		push(t, host+"/app:v1", imageOf(t, layers))
		res, err := converter.Convert(t.Context(), host+"/app:v1", "",
			converter.WithPlainHTTP(true), converter.WithAvgBlockSize(16<<10), converter.WithLogger(quiet()))
		if err != nil {
			t.Fatal(err)
		}
		shared.handler, shared.res, shared.want = h, res, want
	})
	if shared.res == nil {
		t.Fatal("the shared test image could not be made (see the first test that failed)")
	}
	return &fixture{reg: serveRegistry(t, shared.handler, nil), res: shared.res, want: shared.want}
}

// open opens the fixture's flat image with fast retries and the given options.
func (f *fixture) open(t testing.TB, opts ...Option) *Image {
	t.Helper()
	base := []Option{WithPlainHTTP(true), WithLogger(quiet()), WithRetries(DefaultAttempts, 2*time.Millisecond)}
	im, err := OpenImage(t.Context(), f.reg.Host+"/app:v1-shoal", append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// files rebuilds every regular file of x from the blocks in got.
func files(t testing.TB, x *flat.Index, got map[flat.BlockID][]byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for i := range x.Entries {
		e := &x.Entries[i]
		if e.Type != flat.TypeReg {
			continue
		}
		var buf bytes.Buffer
		for _, ex := range e.Extents {
			data, ok := got[x.Blocks[ex.Block].ID]
			if !ok {
				t.Fatalf("%s: block %d not fetched", e.Path, ex.Block)
			}
			buf.Write(data[ex.Offset : ex.Offset+ex.Length])
		}
		out[e.Path] = buf.Bytes()
	}
	return out
}

func openStore(t testing.TB) (*blockstore.Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := blockstore.Open(t.Context(), dir, blockstore.WithLogger(quiet()), blockstore.WithGCInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s, dir
}
