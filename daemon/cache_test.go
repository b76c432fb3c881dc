package daemon

import (
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/shoal-project/shoal/blockstore"
)

// logRecords keeps the messages a daemon logs at warning level or above.
type logRecords struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecords) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (r *logRecords) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Message)
	return nil
}
func (r *logRecords) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecords) WithGroup(string) slog.Handler      { return r }

func (r *logRecords) matching(substr string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, m := range r.msgs {
		if strings.Contains(m, substr) {
			out = append(out, m)
		}
	}
	return out
}

// startCacheDaemon runs a daemon on state with the swarm off and returns a
// client once its socket answers, and a stop function that cancels Run and
// returns its error and how long it took to return.
func startCacheDaemon(t *testing.T, state string, logs slog.Handler) (*Client, func() (time.Duration, error)) {
	t.Helper()
	d, err := New(Config{StateDir: state, PlainHTTP: true, P2P: P2PConfig{Disabled: true}}, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	var runErr error
	var took time.Duration
	stop := func() (time.Duration, error) {
		once.Do(func() {
			start := time.Now()
			cancel()
			runErr = <-done
			took = time.Since(start)
		})
		return took, runErr
	}
	t.Cleanup(func() { stop() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		select {
		case err := <-done:
			t.Fatalf("daemon exited on start: %v", err)
		default:
		}
		c, err := Dial(t.Context(), SocketPath(state))
		if err == nil {
			return c, stop
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDaemonDamagedCache starts a daemon on a state directory whose block
// cache holds garbage: it starts, says so once, and serves a mount whose
// blocks go into a fresh cache.
func TestDaemonDamagedCache(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	ref := pushAndConvert(t, strings.TrimPrefix(srv.URL, "http://"))

	state := t.TempDir()
	blocks := filepath.Join(state, "blocks")
	if err := os.MkdirAll(blocks, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"MANIFEST", "000001.vlog", "000002.sst", "KEYREGISTRY", "junk"} {
		if err := os.WriteFile(filepath.Join(blocks, name), []byte(strings.Repeat("garbage ", 1000)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	logs := &logRecords{}
	c, stop := startCacheDaemon(t, state, logs)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if _, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || len(b) != 600000 {
		t.Fatalf("read through the daemon's mount: %d bytes, %v", len(b), err)
	}
	if st, err := c.Status(t.Context()); err != nil || st.Cache.Blocks == 0 {
		t.Errorf("status after a read: %+v, %v; want blocks in the cache", st.Cache, err)
	}
	if got := logs.matching("damaged"); len(got) != 1 {
		t.Errorf("lines about the damaged cache: %q; want one", got)
	}
	if m, _ := filepath.Glob(blocks + ".damaged-*"); len(m) != 1 {
		t.Errorf("damaged copies: %q; want one", m)
	}
	if _, err := stop(); err != nil {
		t.Errorf("daemon Run: %v", err)
	}
}

// TestDaemonShutdownCacheGone removes the block cache's directory under a
// running daemon, as a failed disk or a mistaken cleanup does, and checks
// that the daemon still stops within 10 s, with an error and one line
// saying why.
func TestDaemonShutdownCacheGone(t *testing.T) {
	state := t.TempDir()
	logs := &logRecords{}
	c, stop := startCacheDaemon(t, state, logs)
	// Blocks in the memtable: badger must flush them on close.
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	ref := pushAndConvert(t, strings.TrimPrefix(srv.URL, "http://"))
	if _, err := c.Prefetch(t.Context(), ref, true, nil); err != nil {
		t.Fatal(err)
	}
	if st, err := c.Status(t.Context()); err != nil || st.Cache.Blocks == 0 {
		t.Fatalf("status after prefetch: %+v, %v; want blocks in the cache", st.Cache, err)
	}
	if err := os.RemoveAll(filepath.Join(state, "blocks")); err != nil {
		t.Fatal(err)
	}
	took, err := stop()
	t.Logf("daemon stopped in %v: %v", took.Round(time.Millisecond), err)
	if took > 10*time.Second {
		t.Errorf("daemon took %v to stop; want at most 10 s", took)
	}
	if !errors.Is(err, blockstore.ErrCloseTimeout) {
		t.Errorf("daemon Run: %v; want ErrCloseTimeout", err)
	}
	if got := logs.matching("did not close in time"); len(got) != 1 {
		t.Errorf("lines about the abandoned cache: %q; want one (all: %q)", got, logs.matching(""))
	}
}
