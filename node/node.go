// Package node is one Shoal node's runtime on a machine: its state
// directory, its block cache, and the lazy mounts it serves. The CLI (and,
// later, the daemon) wire commands to it; it wires the packages below it
// together: fetch (the resolution chain), lazyfs (the mount), converter (the
// local fallback for images with no flat form) and blockstore (the cache).
//
// State directory layout:
//
//	blocks/          the block cache (badger)
//	indexes/<hex>    indexes of images converted locally, by source digest
//	files/<key>      files materialized from cached blocks for FUSE passthrough
//	identity/        the daemon's libp2p key
//	runs/<id>/       one per mount: lower/ (the FUSE mount), upper/, work/,
//	                 and lock, flocked by the owning process while it lives
//
// A crash leaves a run directory whose lock nobody holds and, perhaps, a dead
// FUSE mount. Open finds those, detaches their mounts and removes them, so a
// crash never blocks the next start.
package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// EnvStateDir names the environment variable that overrides the default
// state directory.
const EnvStateDir = "SHOAL_STATE_DIR"

// DefaultStateDir is $SHOAL_STATE_DIR, else /var/lib/shoal for root, else
// $XDG_STATE_HOME/shoal (~/.local/state/shoal).
func DefaultStateDir() string {
	if d := os.Getenv(EnvStateDir); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/shoal"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "shoal")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "shoal")
}

// Option configures a Node.
type Option func(*config) error

type config struct {
	peers      Peers
	onEvict    func(flat.BlockID)
	observer   fetch.Observer
	log        *slog.Logger
	quota      int64
	plainHTTP  bool
	notice     io.Writer
	noFallback bool
	seeding    *Seeding
	noTraces   bool
	keychain   authn.Keychain
	visibility *fetch.Visibility
	kept       map[string]bool // run directories of mounts handed over
}

// WithKeptRuns names the run directories of mounts a previous process
// handed over (see Attach): Open leaves them and their mounts alone
// instead of clearing them as a crash's leftovers.
func WithKeptRuns(dirs ...string) Option {
	return func(c *config) error {
		if c.kept == nil {
			c.kept = map[string]bool{}
		}
		for _, d := range dirs {
			c.kept[filepath.Clean(d)] = true
		}
		return nil
	}
}

// WithLogger sets the logger (default: slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *config) error { c.log = l; return nil } }

// WithCacheQuota caps the block cache in bytes (default 0: unlimited).
func WithCacheQuota(n int64) Option {
	return func(c *config) error {
		if n < 0 {
			return errors.New("cache quota must not be negative")
		}
		c.quota = n
		return nil
	}
}

// WithPlainHTTP talks plain HTTP to registries (default: HTTPS only).
func WithPlainHTTP(on bool) Option { return func(c *config) error { c.plainHTTP = on; return nil } }

// WithNotices writes one-line notices for people (the local conversion
// fallback) to w (default: none).
func WithNotices(w io.Writer) Option { return func(c *config) error { c.notice = w; return nil } }

// WithFetchObserver reports every batch of blocks fetched, by source, to o
// (the daemon's metrics).
func WithFetchObserver(o fetch.Observer) Option {
	return func(c *config) error { c.observer = o; return nil }
}

// WithOnEvict is called for every block the cache drops (the swarm
// withdraws it).
func WithOnEvict(f func(flat.BlockID)) Option {
	return func(c *config) error { c.onEvict = f; return nil }
}

// WithKeychain sets the registry credentials the node reads images with
// (default authn.DefaultKeychain: the Docker config and credential helpers
// of the user running it).
func WithKeychain(k authn.Keychain) Option {
	return func(c *config) error {
		if k == nil {
			return errors.New("keychain must not be nil")
		}
		c.keychain = k
		return nil
	}
}

// WithVisibility tells the node which repositories are public (default:
// none; every image is private, and peers share it only with nodes that
// prove they could read it themselves).
func WithVisibility(v *fetch.Visibility) Option {
	return func(c *config) error { c.visibility = v; return nil }
}

// WithoutFallback makes a missing flat form an error instead of a local
// conversion (default: convert locally).
func WithoutFallback() Option { return func(c *config) error { c.noFallback = true; return nil } }

// Node is an open state directory.
type Node struct {
	dir   string
	cfg   config
	log   *slog.Logger
	store *blockstore.Store

	// localMu serializes the bookkeeping of local images' pins
	// (localpins.go); inUse counts the mounts of each, by source digest.
	localMu sync.Mutex
	inUse   map[string]int
}

// Open opens (creating) the state directory, clears what crashed runs left
// behind, and opens the block cache.
func Open(ctx context.Context, dir string, opts ...Option) (*Node, error) {
	c := config{log: slog.Default(), keychain: authn.DefaultKeychain}
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, err
		}
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	// blocks/ is left to blockstore.Open, which sets aside whatever damaged
	// thing is found there.
	for _, d := range []string{"", "indexes", "runs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("state directory: %w", err)
		}
	}
	n := &Node{dir: dir, cfg: c, log: c.log.With("component", "node"), inUse: map[string]int{}}
	n.clearStale()
	bopts := []blockstore.Option{blockstore.WithQuota(c.quota), blockstore.WithLogger(c.log)}
	if c.onEvict != nil {
		bopts = append(bopts, blockstore.WithOnEvict(c.onEvict))
	}
	n.store, err = blockstore.Open(ctx, filepath.Join(dir, "blocks"), bopts...)
	if err != nil {
		return nil, fmt.Errorf("block cache in %s: %w", dir, err)
	}
	return n, nil
}

// Close closes the block cache. Mounts must be unmounted first.
func (n *Node) Close() error { return n.store.Close() }

// Dir returns the state directory.
func (n *Node) Dir() string { return n.dir }

// Store returns the block cache.
func (n *Node) Store() *blockstore.Store { return n.store }

// clearStale removes run directories whose owner is gone, detaching any
// mount left under them (a dead FUSE server's mount answers ENOTCONN and
// would block the next start).
func (n *Node) clearStale() {
	runs := filepath.Join(n.dir, "runs")
	entries, err := os.ReadDir(runs)
	if err != nil {
		return
	}
	for _, e := range entries {
		rd := filepath.Join(runs, e.Name())
		if n.cfg.kept[rd] {
			continue
		}
		lock, err := os.OpenFile(filepath.Join(rd, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			continue
		}
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			lock.Close() // alive: its owner holds the lock
			continue
		}
		// A mount point outside the run directory may have been reused by a
		// live mount since: detach it only if it is dead.
		if mp, err := os.ReadFile(filepath.Join(rd, "mountpoint")); err == nil {
			clearDeadMount(string(mp))
		}
		for _, m := range mountsUnder(rd) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
				n.log.Warn("could not detach stale mount", "mount", m, "err", err)
			} else {
				n.log.Info("detached stale mount", "mount", m)
			}
		}
		lock.Close()
		if err := os.RemoveAll(rd); err != nil {
			n.log.Warn("could not remove stale run directory", "dir", rd, "err", err)
		}
	}
}

// mountsUnder lists mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
