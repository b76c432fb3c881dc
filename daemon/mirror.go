package daemon

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-project/shoal/mirror"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
)

// MirrorConfig configures the registry mirror: the OCI distribution read
// API on a local port, for containerd's hosts.toml (docs/mirror.md).
type MirrorConfig struct {
	Listen    string           `yaml:"listen"` // "" disables; e.g. 127.0.0.1:5001
	Upstreams []MirrorUpstream `yaml:"upstreams"`
	// MaxSpool bounds the bytes of blobs being fetched at once, on top of
	// the cache's quota and free-space guard; 0: 64 GiB. See
	// mirror.Config.MaxSpool.
	MaxSpool int64 `yaml:"max_spool"`
	// CoalesceMin is the smallest blob that the nodes pulling it at the
	// same moment read upstream in ranges, once each, and swap; -1 never;
	// 0: 1 MiB. See mirror.Config.CoalesceMin.
	CoalesceMin int64 `yaml:"coalesce_min"`
}

// MirrorUpstream is a registry the mirror may fetch from; requests for any
// other are refused.
type MirrorUpstream struct {
	Host      string `yaml:"host"`       // as clients name it (containerd's ?ns=), e.g. docker.io
	Endpoint  string `yaml:"endpoint"`   // host[:port] to contact; default host
	PlainHTTP bool   `yaml:"plain_http"` // HTTP instead of HTTPS
	Default   bool   `yaml:"default"`    // for requests without ?ns=
	// SharedRepositories are read with the daemon's own credentials for
	// every client; all others with each client's ("team/app", "team/*",
	// "*"). See mirror.Upstream.
	SharedRepositories []string `yaml:"shared_repositories"`
	// PublicRepositories are declared public (same patterns): shared with
	// peers, and served from public copies while the upstream is down.
	PublicRepositories []string `yaml:"public_repositories"`
}

// startMirror makes the mirror and its listener when one is configured,
// and returns what serves it until ctx ends (nil when none is).
func (d *Daemon) startMirror(n *node.Node, sw *p2p.Node) (func(ctx context.Context) error, error) {
	c := d.cfg.Mirror
	if c.Listen == "" {
		return nil, nil
	}
	if c.MaxSpool < 0 {
		return nil, fmt.Errorf("mirror: max_spool %d: must not be negative", c.MaxSpool)
	}
	cfg := mirror.Config{Dir: filepath.Join(d.cfg.StateDir, "mirror"), Blocks: n.Store(), Keychain: d.keychain, Logger: d.base, MaxSpool: c.MaxSpool, CoalesceMin: c.CoalesceMin}
	for _, u := range c.Upstreams {
		cfg.Upstreams = append(cfg.Upstreams, mirror.Upstream{Host: u.Host, Endpoint: u.Endpoint, PlainHTTP: u.PlainHTTP, Default: u.Default,
			SharedRepositories: u.SharedRepositories, PublicRepositories: u.PublicRepositories})
	}
	if sw != nil {
		cfg.Peers = mirror.SwarmPeers(sw)
	}
	m, err := mirror.New(cfg)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("mirror listener: %w", err)
	}
	if sw != nil {
		sw.ServeRecipes(m)
		sw.ServeRanges(m)
	}
	d.metrics.watchMirror(m)
	d.mu.Lock()
	d.mirrorAddr = ln.Addr().String()
	d.mirror = m
	d.mu.Unlock()
	d.log.Info("serving registry mirror", "addr", ln.Addr().String(), "upstreams", len(cfg.Upstreams))
	return func(ctx context.Context) error {
		done := make(chan error, 1)
		go func() { done <- m.Run(ctx) }()
		srv := &http.Server{Handler: m, ReadHeaderTimeout: 10 * time.Second}
		err := serve(ctx, srv, ln)
		<-done
		return err
	}, nil
}

// MirrorAddr is the registry mirror's listen address ("" when it is off).
func (d *Daemon) MirrorAddr() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mirrorAddr
}

// watchMirror exports the mirror's counters, read at scrape time.
func (m *metrics) watchMirror(mi *mirror.Mirror) {
	counter := func(name, help string, labels prometheus.Labels, f func(mirror.Stats) int64) {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels},
			func() float64 { return float64(f(mi.Stats())) }))
	}
	const served = "Blob and manifest bytes the registry mirror sent to clients, by source (local, peers, upstream)."
	counter("shoal_mirror_served_bytes_total", served, prometheus.Labels{"source": mirror.SourceLocal}, func(s mirror.Stats) int64 { return s.ServedLocal })
	counter("shoal_mirror_served_bytes_total", served, prometheus.Labels{"source": mirror.SourcePeers}, func(s mirror.Stats) int64 { return s.ServedPeers })
	counter("shoal_mirror_served_bytes_total", served, prometheus.Labels{"source": mirror.SourceUpstream}, func(s mirror.Stats) int64 { return s.ServedUpstream })
	const fetched = "Bytes the registry mirror fetched to keep, by source (peers, upstream)."
	counter("shoal_mirror_fetched_bytes_total", fetched, prometheus.Labels{"source": mirror.SourcePeers}, func(s mirror.Stats) int64 { return s.FetchedPeers })
	counter("shoal_mirror_fetched_bytes_total", fetched, prometheus.Labels{"source": mirror.SourceUpstream}, func(s mirror.Stats) int64 { return s.FetchedUpstream })
	counter("shoal_mirror_requests_total", "Requests to the registry mirror.", nil, func(s mirror.Stats) int64 { return s.Requests })
	counter("shoal_mirror_errors_total", "Registry mirror requests answered with an error or cut short.", nil, func(s mirror.Stats) int64 { return s.Errors })
	counter("shoal_mirror_fetches_total", "Blob fetches the mirror ran (concurrent requests for a blob share one).", nil, func(s mirror.Stats) int64 { return s.Fetches })
	counter("shoal_mirror_bad_peer_blobs_total", "Blob recipes or assembled blobs from peers that failed verification.", nil, func(s mirror.Stats) int64 { return s.BadPeerBlobs })
	counter("shoal_mirror_announced_total", "Blob provider records the mirror announced to the swarm (at keep, and re-provides).", nil, func(s mirror.Stats) int64 { return s.Provided })
	counter("shoal_mirror_upstream_mismatches_total", "Upstream content that did not match its digest.", nil, func(s mirror.Stats) int64 { return s.UpstreamMismatches })
	counter("shoal_mirror_access_checks_total", "Access checks the mirror sent upstream (HEADs with a client's credentials, and anonymous probes for public repositories).", nil, func(s mirror.Stats) int64 { return s.Checks })
	counter("shoal_mirror_denied_total", "Mirror requests the upstream refused for the client's credentials (401, 403).", nil, func(s mirror.Stats) int64 { return s.Denied })
	counter("shoal_mirror_spool_refused_total", "Blob fetches the mirror could not spool (past max_spool, the cache's quota or its free-space guard); those blobs were streamed from upstream and not kept.", nil, func(s mirror.Stats) int64 { return s.SpoolRefused })
	counter("shoal_mirror_pulls_total", "Blobs no peer held whole that the mirror pulled in ranges with the other nodes pulling them at the same moment, each range read upstream by one node.", nil, func(s mirror.Stats) int64 { return s.Pulls })
	const ranges = "Ranges of blobs pulled with other nodes, by where they came from (peers, upstream)."
	counter("shoal_mirror_ranges_total", ranges, prometheus.Labels{"source": mirror.SourcePeers}, func(s mirror.Stats) int64 { return s.RangesPeers })
	counter("shoal_mirror_ranges_total", ranges, prometheus.Labels{"source": mirror.SourceUpstream}, func(s mirror.Stats) int64 { return s.RangesUpstream })
	counter("shoal_mirror_bad_ranges_total", "Blob ranges from peers that differed from the upstream's bytes (found after the blob failed its digest; the peers were struck).", nil, func(s mirror.Stats) int64 { return s.RangesBad })
	counter("shoal_mirror_window_reads_total", "Windows of private blobs the mirror read upstream with a client's credentials (4 KiB Range GETs), to ask peers for the blob under its swarm name.", nil, func(s mirror.Stats) int64 { return s.Windows })
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_mirror_spool_bytes", Help: "Room reserved by the mirror's spool files (blobs being fetched), counted against the cache's quota and free space."},
		func() float64 { return float64(mi.Stats().SpoolBytes) }))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_mirror_kept_blobs", Help: "Blobs and manifests the mirror keeps (recipes on disk)."},
		func() float64 { return float64(mi.Stats().Kept) }))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_mirror_kept_public_blobs", Help: "Kept blobs and manifests of public repositories: announced by digest and served to any peer."},
		func() float64 { return float64(mi.Stats().KeptPublic) }))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "shoal_mirror_named_blobs", Help: "Kept private and shared blobs held under a swarm name: announced by that name and served only to peers that proved they read the blob."},
		func() float64 { return float64(mi.Stats().Named) }))
}
