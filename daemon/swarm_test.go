package daemon

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// startDaemon runs a daemon with p2p on loopback until the test ends.
func startDaemon(t *testing.T, cfg Config) (*Daemon, *Client) {
	t.Helper()
	cfg.PlainHTTP = true
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	d, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon exit: %v", err)
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; {
		c, err := Dial(t.Context(), SocketPath(cfg.StateDir))
		if err == nil {
			return d, c
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPeersServeBlocks: node B reads a file after node A read it: every
// block comes from A, none from the registry — even once the registry is
// down.
func TestPeersServeBlocks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	var down atomic.Bool
	var blobBytes atomic.Int64
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		if strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") != "" {
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, r)
			blobBytes.Add(int64(rec.Body.Len()))
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	ref := pushAndConvert(t, strings.TrimPrefix(srv.URL, "http://"))

	_, ca := startDaemon(t, Config{StateDir: t.TempDir()})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	_, cb := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})

	read := func(c *Client, name string) MountInfo {
		t.Helper()
		mnt := filepath.Join(t.TempDir(), name)
		mi, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
		if err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || len(b) != 600000 {
			t.Fatalf("%s: read %d bytes, %v", name, len(b), err)
		}
		fin, err := c.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
		if err != nil {
			t.Fatal(err)
		}
		return fin
	}
	a := read(ca, "a")
	if a.Fetch.BytesFromRegistry == 0 {
		t.Fatalf("A did not fetch from the registry: %+v", a.Fetch)
	}
	// Give A's announcements time to reach B's view (batched every 250 ms).
	time.Sleep(time.Second)
	before := blobBytes.Load()
	b := read(cb, "b")
	if b.Fetch.BytesFromPeers == 0 || b.Fetch.BytesFromRegistry != 0 || blobBytes.Load() != before {
		t.Errorf("B: peers %d bytes, registry %d bytes (blob bytes served %d), want everything from A",
			b.Fetch.BytesFromPeers, b.Fetch.BytesFromRegistry, blobBytes.Load()-before)
	}

	// With the registry down, a third node that had mounted the image before
	// still reads it from the swarm.
	_, cc := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})
	mnt := filepath.Join(t.TempDir(), "c")
	mi, err := cc.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	down.Store(true)
	if got, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || len(got) != 600000 {
		t.Fatalf("with the registry down: %d bytes, %v", len(got), err)
	}
	fin, err := cc.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
	if err != nil || fin.Fetch.BytesFromPeers == 0 || fin.Fetch.BytesFromRegistry != 0 {
		t.Errorf("C: %+v, %v", fin.Fetch, err)
	}
	st, _ := ca.Status(t.Context())
	if st.Swarm == nil || st.Swarm.BytesUploaded == 0 {
		t.Errorf("A uploaded nothing: %+v", st.Swarm)
	}
}
