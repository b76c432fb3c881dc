package daemon

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shoal-project/shoal/fetch"
)

// metrics are the daemon's Prometheus metrics, on a registry of their own
// (no global state, so tests can run several daemons in one process).
type metrics struct {
	reg         *prometheus.Registry
	bytes       *prometheus.CounterVec
	blocks      *prometheus.CounterVec
	latency     *prometheus.HistogramVec
	fetchErrors *prometheus.CounterVec
	mounts      prometheus.Gauge

	hitBytes, allBytes atomic.Int64 // for the hit ratio
	registryBytes      atomic.Int64 // with the two above, bytes by source for the status page
}

var _ fetch.Observer = (*metrics)(nil)

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_block_bytes_total", Help: "Uncompressed block bytes served to mounts, by source (cache, peers, registry).",
		}, []string{"source"}),
		blocks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_blocks_total", Help: "Blocks served to mounts, by source.",
		}, []string{"source"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "shoal_fetch_seconds", Help: "Time to resolve a batch of blocks, by source (cache hits and misses to peers or the registry).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"source"}),
		fetchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shoal_fetch_errors_total", Help: "Fetch batches from a source that did not deliver every block.",
		}, []string{"source"}),
		mounts: prometheus.NewGauge(prometheus.GaugeOpts{Name: "shoal_mounts", Help: "Lazy mounts held."}),
	}
	m.reg.MustRegister(m.bytes, m.blocks, m.latency, m.fetchErrors, m.mounts,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "shoal_cache_hit_ratio", Help: "Share of block bytes served to mounts from the local cache, since start.",
	}, func() float64 {
		if all := m.allBytes.Load(); all > 0 {
			return float64(m.hitBytes.Load()) / float64(all)
		}
		return 0
	}))
	for _, s := range []string{"cache", "peers", "registry"} {
		m.bytes.WithLabelValues(s)
		m.blocks.WithLabelValues(s)
	}
	return m
}

// Fetched implements fetch.Observer.
func (m *metrics) Fetched(source string, blocks int, bytes int64, d time.Duration, err error) {
	if source != "cache" && source != fetch.RegistryName {
		source = "peers"
	}
	m.bytes.WithLabelValues(source).Add(float64(bytes))
	m.allBytes.Add(bytes)
	switch source {
	case "cache":
		m.hitBytes.Add(bytes)
	case fetch.RegistryName:
		m.registryBytes.Add(bytes)
	}
	m.blocks.WithLabelValues(source).Add(float64(blocks))
	m.latency.WithLabelValues(source).Observe(d.Seconds())
	if err != nil {
		m.fetchErrors.WithLabelValues(source).Inc()
	}
}

// watchNode exports the cache's size as gauges read at scrape time.
func (m *metrics) watchNode(d *Daemon) {
	gauge := func(name, help string, f func() float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	gauge("shoal_cache_bytes", "Bytes held in the block cache.", func() float64 { return float64(d.Status().Cache.Bytes) })
	gauge("shoal_cache_blocks", "Blocks held in the block cache.", func() float64 { return float64(d.Status().Cache.Blocks) })
}

func (m *metrics) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return mux
}
