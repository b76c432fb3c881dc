package daemon

import (
	"context"
	"embed"
	"io/fs"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// The status page is for a person at a browser, next to /metrics for
// Prometheus, on the metrics address: one HTML page with a small script
// that polls /api/status and draws its charts as inline SVG. Everything is
// embedded in the binary and the page loads nothing from elsewhere (nodes
// often have no way out to the internet, and an operator should not need
// one to look at a node). The history the charts draw is a ring of
// per-second samples held by the daemon, so a page opened late still shows
// the last minutes; longer history is Prometheus's job.

//go:embed ui
var uiFiles embed.FS

const (
	sampleEvery = time.Second
	sampleCount = 600 // ten minutes
)

// PageStatus is what /api/status returns: the daemon's Status plus what the
// status page draws.
type PageStatus struct {
	Time int64 `json:"time"` // unix milliseconds
	Status
	Labels     map[string]string `json:"labels,omitempty"`
	Bytes      SourceBytes       `json:"bytes"` // block bytes served to mounts since start, by source
	Peers      []PeerRow         `json:"peers"`
	Pulls      []MirrorPull      `json:"mirror_pulls"` // blobs the mirror pulls in ranges with other nodes, then the last few
	IntervalMS int64             `json:"interval_ms"`
	Series     []Sample          `json:"series"` // oldest first
}

// SourceBytes splits the block bytes served to mounts by where they came
// from.
type SourceBytes struct {
	Cache    int64 `json:"cache"`
	Peers    int64 `json:"peers"`
	Registry int64 `json:"registry"`
}

// MirrorPull is one blob the registry mirror pulls (or lately pulled) in
// ranges with the other nodes pulling it: bytes from peers against bytes
// from upstream. A private or shared blob's digest is not shown.
type MirrorPull struct {
	Digest       string `json:"digest,omitempty"`
	Size         int64  `json:"size"`
	Ranges       int    `json:"ranges"`
	Done         int    `json:"done"`
	FromPeers    int64  `json:"from_peers"`
	FromUpstream int64  `json:"from_upstream"`
	StartedMS    int64  `json:"started"` // unix milliseconds
	EndedMS      int64  `json:"ended,omitempty"`
	Err          string `json:"error,omitempty"`
}

// PeerRow is one peer in the swarm of a mounted image, as this node sees it.
type PeerRow struct {
	ID         string  `json:"id"`
	Zone       string  `json:"zone,omitempty"`
	Rack       string  `json:"rack,omitempty"`
	LatencyMS  float64 `json:"latency_ms"` // moving average to the first byte; 0 until measured
	BlocksRecv int64   `json:"blocks_received"`
	BytesSent  int64   `json:"bytes_sent"` // uploaded to it: blocks and their frames
	BadBlocks  int64   `json:"bad_blocks"`
	InFlight   int     `json:"in_flight"`
	Avoided    bool    `json:"avoided"` // penalised for bad blocks
	Busy       bool    `json:"busy"`    // answered BUSY recently
	Images     int     `json:"images"`  // mounted images it is a peer for
}

// serveWeb serves /metrics, the status page and /api/status on ln until
// ctx is done, and samples the counters for the page's charts meanwhile.
func (d *Daemon) serveWeb(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	s := newSeries(sampleCount)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.run(ctx, sampleEvery, d.sample)
	}()
	defer wg.Wait()
	defer cancel()
	srv := &http.Server{Handler: d.webHandler(s), ReadHeaderTimeout: 10 * time.Second}
	return serve(ctx, srv, ln)
}

func (d *Daemon) webHandler(s *series) http.Handler {
	ui, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	files := http.FileServerFS(ui)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.metrics.handler())
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, d.pageStatus(s))
	})
	mux.Handle("GET /", files)
	// The page's script and styles come from here alone, and nothing may
	// frame it.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		mux.ServeHTTP(w, r)
	})
}

// sourceBytes splits the observed bytes by source. The observer adds to
// the total before it adds to a part, so reading the parts first and the
// total last never makes peers (the rest) negative.
func (m *metrics) sourceBytes() SourceBytes {
	cache, registry := m.hitBytes.Load(), m.registryBytes.Load()
	return SourceBytes{Cache: cache, Registry: registry, Peers: m.allBytes.Load() - cache - registry}
}

// sample reads the counters the charts draw.
func (d *Daemon) sample() Sample {
	b := d.metrics.sourceBytes()
	x := Sample{T: time.Now().UnixMilli(), Cache: b.Cache, Peers: b.Peers, Registry: b.Registry}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.node != nil {
		x.CacheUsed = d.node.Store().Stats().Bytes
	}
	if d.swarm != nil {
		x.Uploaded = d.swarm.Stats().BytesUploaded
	}
	return x
}

func (d *Daemon) pageStatus(s *series) PageStatus {
	st := d.Status()
	sort.Slice(st.Mounts, func(i, j int) bool { return st.Mounts[i].ID < st.Mounts[j].ID })
	var digests []string
	for _, m := range st.Mounts {
		if _, digest, ok := strings.Cut(m.Ref, "@"); ok {
			digests = append(digests, digest)
		}
	}
	// This is served on a TCP port, to anyone: no private image's
	// reference, no environment (publicview.go). The unix socket's status
	// has them.
	for i := range st.Mounts {
		st.Mounts[i] = d.public.mount(st.Mounts[i])
	}
	for i := range st.Jobs {
		st.Jobs[i] = d.public.job(st.Jobs[i])
	}
	ps := PageStatus{
		Time: time.Now().UnixMilli(), Status: st, Labels: d.cfg.Labels, Bytes: d.metrics.sourceBytes(),
		Peers: []PeerRow{}, IntervalMS: sampleEvery.Milliseconds(), Series: s.samples(),
	}
	d.mu.Lock()
	sw, mi := d.swarm, d.mirror
	d.mu.Unlock()
	ps.Pulls = []MirrorPull{}
	if mi != nil {
		for _, p := range mi.Pulls() {
			mp := MirrorPull{Digest: p.Digest, Size: p.Size, Ranges: p.Ranges, Done: p.Done, FromPeers: p.FromPeers,
				FromUpstream: p.FromUpstream, StartedMS: p.Started.UnixMilli(), Err: p.Err}
			if !p.Ended.IsZero() {
				mp.EndedMS = p.Ended.UnixMilli()
			}
			ps.Pulls = append(ps.Pulls, mp)
		}
	}
	if sw == nil {
		return ps
	}
	images := map[peer.ID]int{}
	for _, digest := range digests {
		for _, p := range sw.ImagePeers(digest) {
			images[p]++
		}
	}
	now := time.Now()
	for p, n := range images {
		pi, _ := sw.PeerInfo(p)
		ps.Peers = append(ps.Peers, PeerRow{
			ID: p.String(), Zone: pi.Zone, Rack: pi.Rack, LatencyMS: float64(pi.Latency.Microseconds()) / 1000,
			BlocksRecv: pi.BlocksRecv, BytesSent: pi.BytesSent, BadBlocks: pi.BadBlocks, InFlight: pi.InFlight,
			Avoided: pi.AvoidedUntil.After(now), Busy: pi.BusyUntil.After(now), Images: n,
		})
	}
	// The busiest first, either way.
	sort.Slice(ps.Peers, func(i, j int) bool {
		a, b := ps.Peers[i], ps.Peers[j]
		if a.BlocksRecv != b.BlocksRecv {
			return a.BlocksRecv > b.BlocksRecv
		}
		if a.BytesSent != b.BytesSent {
			return a.BytesSent > b.BytesSent
		}
		return a.ID < b.ID
	})
	return ps
}
