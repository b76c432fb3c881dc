package node

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/shoal-project/shoal/converter"
)

// corrupting proxies a registry and, while on, flips a byte in every
// partial (Range) blob response: block reads, not the index.
type corrupting struct {
	on    atomic.Bool
	proxy *httputil.ReverseProxy
}

func (c *corrupting) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !c.on.Load() || r.Header.Get("Range") == "" {
		c.proxy.ServeHTTP(w, r)
		return
	}
	rec := httptest.NewRecorder()
	c.proxy.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	if len(body) > 0 {
		body[len(body)/2] ^= 0xff
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(body)
}

// TestCorruptRegistryGivesEIO: when the registry serves corrupted blocks,
// a read through the mount fails with EIO after the retries, and no wrong
// byte ever reaches the reader; once the registry heals, the same read works.
func TestCorruptRegistryGivesEIO(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	reg := memRegistry(t)
	body := strings.Repeat("0123456789", 200000)
	pushImage(t, reg+"/app:v1", map[string]string{"big": body})
	if _, err := converter.Convert(t.Context(), reg+"/app:v1", "", converter.WithPlainHTTP(true), converter.WithLogger(quiet)); err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("http://" + reg)
	c := &corrupting{proxy: httputil.NewSingleHostReverseProxy(u)}
	front := httptest.NewServer(c)
	t.Cleanup(front.Close)
	ref := strings.TrimPrefix(front.URL, "http://") + "/app:v1"

	n, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	img, err := n.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	m, err := n.Mount(t.Context(), img, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })

	c.on.Store(true)
	f, err := os.Open(filepath.Join(m.Dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	nr, err := f.ReadAt(buf, 0)
	f.Close()
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read over a corrupting registry: %d bytes, err %v; want EIO", nr, err)
	}
	if nr > 0 && string(buf[:nr]) != body[:nr] {
		t.Fatal("wrong bytes reached the reader")
	}
	if st := img.Registry.Stats(); st.CorruptBlocks == 0 {
		t.Errorf("registry stats saw no corrupt blocks: %+v", st)
	}

	c.on.Store(false)
	got, err := os.ReadFile(filepath.Join(m.Dir, "big"))
	if err != nil || string(got) != body {
		t.Fatalf("after the registry healed: %d bytes, %v", len(got), err)
	}
}
