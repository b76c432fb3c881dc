package daemon

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
)

// pushAndConvert pushes a one-file image (600,000 bytes at data/file) and
// its flat form to host, and returns the source reference.
func pushAndConvert(t *testing.T, host string) string {
	t.Helper()
	return pushAndConvertFile(t, host+"/app:v1", "data/file", []byte(strings.Repeat("shoal ", 100000)))
}

func TestDaemonMountStatusMetricsShutdown(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	ref := pushAndConvert(t, strings.TrimPrefix(srv.URL, "http://"))

	state := t.TempDir()
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ml.Addr().String()
	ml.Close()
	d, err := New(Config{StateDir: state, PlainHTTP: true, MetricsAddr: metricsAddr, P2P: P2PConfig{Disabled: true}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})

	var c *Client
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = Dial(t.Context(), SocketPath(state)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	mi, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(mnt, "data/file"))
	if err != nil || len(b) != 600000 {
		t.Fatalf("read through the daemon's mount: %d bytes, %v", len(b), err)
	}
	st, err := c.Status(t.Context())
	if err != nil || len(st.Mounts) != 1 || st.Mounts[0].Fetch.BytesFromRegistry == 0 || st.Cache.Blocks == 0 {
		t.Errorf("status: %+v, %v", st, err)
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`shoal_block_bytes_total{source="registry"}`, "shoal_mounts 1", "shoal_fetch_seconds_bucket", "shoal_cache_bytes", "shoal_cache_hit_ratio"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	var events int
	p, err := c.Prefetch(t.Context(), ref, true, func(node.Progress) { events++ })
	if err != nil || p.Done != p.Blocks || p.DoneBytes != p.Bytes {
		t.Errorf("prefetch: %+v, %v", p, err)
	}
	if st, _ := c.Status(t.Context()); st.Cache.Blocks < p.Blocks {
		t.Errorf("after prefetch the cache holds %d of %d blocks", st.Cache.Blocks, p.Blocks)
	}
	if _, err := c.Prefetch(t.Context(), ref+"-nope", true, nil); err == nil {
		t.Error("prefetch of a missing image succeeded")
	}
	if _, err := c.Mount(t.Context(), MountRequest{Ref: ref + "-nope"}); err == nil {
		t.Error("mounting a missing image succeeded")
	}
	if _, err := c.Unmount(t.Context(), UnmountRequest{Dir: "/nowhere"}); err == nil || !strings.Contains(err.Error(), "no such mount") {
		t.Errorf("unmount of an unknown dir: %v", err)
	}

	// A second mount stays up until shutdown, which unmounts it.
	mi2, err := c.Mount(t.Context(), MountRequest{Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	if fin, err := c.Unmount(t.Context(), UnmountRequest{ID: mi.ID}); err != nil || fin.FS.ReadBytes != 600000 {
		t.Errorf("unmount: %+v, %v", fin.FS, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("daemon exit: %v", err)
	}
	done <- nil // for the cleanup
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, dir := range []string{mnt, mi2.Dir} {
		if strings.Contains(string(mounts), dir) {
			t.Errorf("%s still mounted after shutdown", dir)
		}
	}
	if _, err := os.Stat(SocketPath(state)); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if _, err := Dial(t.Context(), SocketPath(state)); err == nil {
		t.Error("dialled a stopped daemon")
	}
}

func TestLoadConfigIsStrict(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("state_dir: /var/lib/shoal\nmetrics_addr: 127.0.0.1:9464\nlabels:\n  zone: a\n  rack: r1\ncache_quota: 1000\n"), 0o644)
	c, err := LoadConfig(good)
	if err != nil || c.Labels["zone"] != "a" || c.CacheQuota != 1000 {
		t.Errorf("LoadConfig = %+v, %v", c, err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("state_dri: /x\n"), 0o644)
	if _, err := LoadConfig(bad); err == nil || !strings.Contains(err.Error(), "state_dri") {
		t.Errorf("typo accepted: %v", err)
	}
}

// The swarm's fair-upload settings and resource-manager limits come from
// the config file's p2p section.
func TestP2PConfigFromFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(path, []byte(`p2p:
  listen: [/ip4/127.0.0.1/tcp/0]
  upload_streams: 8
  upload_streams_per_peer: 3
  upload_min_bytes_per_sec: 1048576
  upload_timeout: 30s
  limits:
    connections: 1000
    connections_inbound: 700
    connections_per_peer: 4
    streams_per_peer: 100
    block_streams: 500
    block_streams_per_peer: 16
    have_streams: 600
    have_streams_per_peer: 20
    memory: 536870912
    memory_per_peer: 33554432
`), 0o644)
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(c, testenv.Logger(t, "daemon"))
	if err != nil {
		t.Fatal(err)
	}
	pc := d.p2pConfig(nil)
	want := p2p.Limits{Conns: 1000, ConnsInbound: 700, ConnsPerPeer: 4, StreamsPerPeer: 100, BlockStreams: 500,
		BlockStreamsPerPeer: 16, HaveStreams: 600, HaveStreamsPerPeer: 20, Memory: 512 << 20, MemoryPerPeer: 32 << 20}
	if pc.MaxUploadStreams != 8 || pc.UploadStreamsPerPeer != 3 || pc.UploadMinBytesPerSec != 1<<20 || pc.UploadTimeout != 30*time.Second || pc.Limits != want {
		t.Errorf("p2p config: slots %d, per peer %d, min rate %d, timeout %v, limits %+v; want 8, 3, 1 MiB/s, 30s, %+v",
			pc.MaxUploadStreams, pc.UploadStreamsPerPeer, pc.UploadMinBytesPerSec, pc.UploadTimeout, pc.Limits, want)
	}
}
