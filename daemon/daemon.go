// Package daemon is Shoal's node daemon: one long-running process per
// machine that owns the state directory, the block cache and every lazy
// mount, and serves a local API on a unix socket (mount, unmount, status)
// and Prometheus metrics on a TCP address.
//
// The CLI talks to it when its socket exists and does the work in-process
// otherwise, so every command works with or without a daemon. The API is
// JSON over HTTP on the socket: HTTP gives deadlines, cancellation and a
// curl-able interface for free, and the socket's file mode (0660, root)
// is the access control. Mounts belong to the daemon: a client that dies
// does not take its mount down; SIGTERM unmounts everything and exits.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/sync/errgroup"
	"gopkg.in/yaml.v3"

	"github.com/shoal-project/shoal/cri"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/mirror"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
	"github.com/shoal-project/shoal/trace"
)

// Config is the daemon's configuration; a YAML file with the same keys can
// supply it (flags override the file).
type Config struct {
	StateDir    string            `yaml:"state_dir"`
	Socket      string            `yaml:"socket"`       // default <state_dir>/shoal.sock
	MetricsAddr string            `yaml:"metrics_addr"` // "" disables; e.g. 127.0.0.1:9464
	PlainHTTP   bool              `yaml:"plain_http"`
	CacheQuota  int64             `yaml:"cache_quota"`
	Labels      map[string]string `yaml:"labels"`   // zone, rack: used to prefer near peers
	Registry    RegistryConfig    `yaml:"registry"` // credentials, public repositories (credentials.go)
	P2P         P2PConfig         `yaml:"p2p"`
	Seeding     SeedingConfig     `yaml:"seeding"`     // trace prefetch, fill, recording, keep-warm (seeding.go)
	Snapshotter SnapshotterConfig `yaml:"snapshotter"` // containerd remote snapshotter (snapshotter.go)
	Mirror      MirrorConfig      `yaml:"mirror"`      // registry mirror (mirror.go, docs/mirror.md)
	// KeeperSocket is the socket of `shoal keeper`, which holds the
	// mounts' FUSE connections so that they outlive the daemon
	// (handoff.go, docs/deploy.md); "" runs without one.
	KeeperSocket string    `yaml:"keeper_socket"`
	CRI          CRIConfig `yaml:"cri"` // CRI image service proxy for pull credentials (cri.go)
}

// P2PConfig configures the swarm.
type P2PConfig struct {
	Disabled          bool     `yaml:"disabled"`             // registry only
	Listen            []string `yaml:"listen"`               // multiaddrs; default /ip4/0.0.0.0/tcp/4701
	Bootstrap         []string `yaml:"bootstrap"`            // multiaddrs ending in /p2p/<id>
	PSKFile           string   `yaml:"psk_file"`             // private network key: only holders can join
	UploadStreams     int      `yaml:"upload_streams"`       // concurrent block uploads (default 4)
	UploadBytesPerSec int64    `yaml:"upload_bytes_per_sec"` // 0: unlimited
	// UploadShare caps a node's uploads of an image at this many times
	// what it holds of it (at least 16 MiB held is assumed); 0 or
	// negative (the default): no cap. See p2p.Config.UploadShare.
	UploadShare float64 `yaml:"upload_share"`
	// Fair uploads (p2p.Config): the upload slots one peer may hold
	// (0: half of upload_streams), the slowest a peer may take a
	// response (0: 256 KiB/s; negative: no minimum), and the longest a
	// response may hold its slot (0: 60s).
	UploadStreamsPerPeer int           `yaml:"upload_streams_per_peer"`
	UploadMinBytesPerSec int64         `yaml:"upload_min_bytes_per_sec"`
	UploadTimeout        time.Duration `yaml:"upload_timeout"`
	// Limits are libp2p's resource-manager limits; 0 means the default.
	Limits P2PLimits `yaml:"limits"`
}

// P2PLimits are p2p.Limits, in the config file: the connections, streams
// and stream memory peers may take of the node.
type P2PLimits struct {
	Connections         int   `yaml:"connections"`            // in and out (4096)
	ConnectionsInbound  int   `yaml:"connections_inbound"`    // opened by peers (3072)
	ConnectionsPerPeer  int   `yaml:"connections_per_peer"`   // (8)
	StreamsPerPeer      int   `yaml:"streams_per_peer"`       // one peer's, all protocols (256)
	BlockStreams        int   `yaml:"block_streams"`          // block requests open at once (2048)
	BlockStreamsPerPeer int   `yaml:"block_streams_per_peer"` // (32)
	HaveStreams         int   `yaml:"have_streams"`           // have sessions from peers (2048)
	HaveStreamsPerPeer  int   `yaml:"have_streams_per_peer"`  // (64)
	Memory              int64 `yaml:"memory"`                 // stream buffers, all peers (1 GiB)
	MemoryPerPeer       int64 `yaml:"memory_per_peer"`        // (64 MiB)
}

func (l P2PLimits) p2p() p2p.Limits {
	return p2p.Limits{
		Conns: l.Connections, ConnsInbound: l.ConnectionsInbound, ConnsPerPeer: l.ConnectionsPerPeer,
		StreamsPerPeer: l.StreamsPerPeer, BlockStreams: l.BlockStreams, BlockStreamsPerPeer: l.BlockStreamsPerPeer,
		HaveStreams: l.HaveStreams, HaveStreamsPerPeer: l.HaveStreamsPerPeer,
		Memory: l.Memory, MemoryPerPeer: l.MemoryPerPeer,
	}
}

// LoadConfig reads a YAML config file strictly: unknown keys are errors.
func LoadConfig(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		// yaml lists every bad field on a line of its own; keep it one line.
		return c, fmt.Errorf("config %s: %s", path, strings.Join(strings.Fields(err.Error()), " "))
	}
	return c, nil
}

// SocketPath is where a daemon with state directory dir listens by default.
func SocketPath(stateDir string) string { return filepath.Join(stateDir, "shoal.sock") }

// Daemon is a configured daemon; Run runs it.
type Daemon struct {
	cfg     Config
	base    *slog.Logger // for the packages below, which add their own component
	log     *slog.Logger
	metrics *metrics
	// swarmKey is the private-network key read from p2p.psk_file; nil
	// for an open network.
	swarmKey []byte
	public   *publicNames // hides private images on the TCP port's views

	// keychain holds the registry credentials the daemon reads images
	// with (Config.Registry), set by Run.
	keychain authn.Keychain
	// criCreds holds the credentials of CRI pulls (Config.CRI); nil when
	// the CRI proxy is off. With it, the snapshotter reads registries
	// with them instead of keychain.
	criCreds *cri.Credentials

	// runCtx is Run's context: done once the daemon is stopping.
	runCtx context.Context

	mu         sync.Mutex
	node       *node.Node
	swarm      *p2p.Node              // nil with p2p disabled
	mirrorAddr string                 // registry mirror's address, "" when off
	mirror     *mirror.Mirror         // nil when off
	mounts     map[string]*mountEntry // by id
	jobs       *jobs                  // background prefetches (seeding.go)
	seq        int
}

type mountEntry struct {
	id      string
	m       *node.Mount
	started time.Time
	rec     *trace.Recorder // nil when not recording
	// saveTimer keeps the recording when its window ends (seeding.go).
	saveTimer *time.Timer
	// kept is the mount's entry in the keeper; nil without one.
	kept *keptMount
}

// New checks the configuration, reads the swarm's key, and wires the
// daemon; it starts nothing. It logs a warning when the swarm would listen
// beyond loopback without a key.
func New(cfg Config, log *slog.Logger) (*Daemon, error) {
	if cfg.StateDir == "" {
		cfg.StateDir = node.DefaultStateDir()
	}
	if cfg.Socket == "" {
		cfg.Socket = SocketPath(cfg.StateDir)
	}
	if log == nil {
		log = slog.Default()
	}
	d := &Daemon{cfg: cfg, base: log, log: log.With("component", "daemon"), metrics: newMetrics(), mounts: map[string]*mountEntry{}, jobs: newJobs(), public: newPublicNames()}
	if !cfg.P2P.Disabled {
		k, err := loadSwarmKey(cfg.P2P.PSKFile, d.log)
		if err != nil {
			return nil, err
		}
		d.swarmKey = k
		warnOpenNetwork(d.log, cfg.P2P.Listen, k)
	}
	return d, nil
}

// Run opens the state directory, serves the API and metrics until ctx is
// done, then unmounts everything and closes the cache.
func (d *Daemon) Run(ctx context.Context) (err error) {
	if d.keychain, err = d.cfg.Registry.keychain(); err != nil {
		return err
	}
	vis, err := d.cfg.Registry.visibility()
	if err != nil {
		return err
	}
	opts := []node.Option{node.WithLogger(d.base), node.WithPlainHTTP(d.cfg.PlainHTTP),
		node.WithCacheQuota(d.cfg.CacheQuota), node.WithFetchObserver(d.metrics),
		node.WithSeeding(d.cfg.Seeding.nodeSeeding()), node.WithKeychain(d.keychain), node.WithVisibility(vis)}
	if !d.cfg.Seeding.nodeSeeding().Trace {
		opts = append(opts, node.WithoutTraceLookup())
	}
	var sw *p2p.Node
	blocks := &lateStore{}
	if !d.cfg.P2P.Disabled {
		if sw, err = d.newSwarm(ctx, blocks); err != nil {
			return fmt.Errorf("p2p: %w", err)
		}
		opts = append(opts, node.WithPeers(swarm{sw}), node.WithOnEvict(func(id flat.BlockID) { sw.Withdraw(id) }))
	}
	ks := d.takeKept(ctx)
	opts = append(opts, node.WithKeptRuns(keptRuns(ks)...))
	n, err := node.Open(ctx, d.cfg.StateDir, opts...)
	if err != nil {
		for _, k := range ks {
			k.ent.Conn.Close()
		}
		if sw != nil {
			sw.Close()
		}
		return err
	}
	blocks.p.Store(n.Store())
	d.mu.Lock()
	d.node, d.swarm = n, sw
	d.mu.Unlock()
	defer func() { err = errors.Join(err, d.shutdown()) }()
	d.metrics.watchNode(d)

	ln, err := listenUnix(d.cfg.Socket)
	if err != nil {
		return err
	}
	d.runCtx = ctx
	d.takeOver(ctx, n, ks)
	runMirror, err := d.startMirror(n, sw)
	if err != nil {
		ln.Close()
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return d.keepWarm(ctx) })
	if runMirror != nil {
		g.Go(func() error { return runMirror(ctx) })
	}
	if sw != nil {
		d.metrics.watchSwarm(sw)
		g.Go(func() error { return sw.Run(ctx) })
		d.log.Info("swarm up", "peer_id", sw.ID().String(), "addrs", sw.Addrs())
	}
	api := &http.Server{Handler: d.routes(), ReadHeaderTimeout: 10 * time.Second}
	g.Go(func() error { return serve(ctx, api, ln) })
	if err := d.startCRI(ctx, g); err != nil {
		ln.Close()
		return err
	}
	if err := d.startSnapshotter(ctx, g); err != nil {
		ln.Close()
		return err
	}
	if d.cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", d.cfg.MetricsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("metrics listener: %w", err)
		}
		g.Go(func() error { return d.serveWeb(ctx, mln) })
		d.log.Info("serving metrics and the status page", "addr", mln.Addr().String())
	}
	d.log.Info("daemon ready", "socket", d.cfg.Socket, "state_dir", d.cfg.StateDir)
	return g.Wait()
}

// serve runs srv on ln until ctx is done, then shuts it down gracefully.
func serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// listenUnix listens on path, replacing a stale socket a crash left (one
// nobody answers on) but refusing to steal a live daemon's.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another daemon is already serving %s", path)
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// shutdown unmounts everything and closes the node.
func (d *Daemon) shutdown() error {
	d.stopJobs()
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	left := 0
	for id, e := range d.mounts {
		if e.saveTimer != nil {
			e.saveTimer.Stop()
		}
		if e.kept != nil && d.leaving() {
			e.m.Leave()
			left++
		} else if err := e.m.Close(); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", e.m.Dir, err))
		}
		delete(d.mounts, id)
	}
	if left > 0 {
		d.log.Info("left mounts to the keeper: their reads wait for the next daemon", "mounts", left, "keeper", d.cfg.KeeperSocket)
	}
	if d.node != nil {
		errs = append(errs, d.node.Close())
		d.node = nil
	}
	if d.swarm != nil {
		errs = append(errs, d.swarm.Close())
		d.swarm = nil
	}
	_ = os.Remove(d.cfg.Socket)
	d.log.Info("daemon stopped")
	return errors.Join(errs...)
}
