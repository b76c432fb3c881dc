package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/seeder"
)

// DefaultBackingBytes bounds files/ in the state directory: the files of
// mounted images materialized from the block cache, which lazy mounts hand
// to the kernel to read directly (lazyfs.WithBackingDir). Pass that option
// to Mount to change it; a budget of 0 turns materializing off.
const DefaultBackingBytes = 4 << 30

// localChain is the fetch chain plus what lazyfs asks before materializing
// a file: whether a block is in the block cache, so that materializing
// never reaches the network. Embedding keeps the chain's Prefetch.
type localChain struct {
	*fetch.Chain
	store  *blockstore.Store
	demand *DemandStats
}

// DemandStats counts the blocks reads of a mount waited on (lazyfs demand
// fetches, not readahead) by whether they were already in the block cache
// when asked: how well prefetch ran ahead of the application.
type DemandStats struct {
	Local  atomic.Int64 // in the cache when the read asked
	Remote atomic.Int64 // fetched (or joined a fetch in flight) for the read
}

// Fetch counts demand fetches, and gives readahead loads prefetch priority.
func (c localChain) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	if lazyfs.IsReadahead(ctx) {
		return c.Chain.Fetch(fetch.WithPriority(ctx, fetch.Prefetch), b)
	}
	if ok, err := c.store.Has(ctx, b.ID); err == nil && ok {
		c.demand.Local.Add(1)
	} else {
		c.demand.Remote.Add(1)
	}
	return c.Chain.Fetch(ctx, b)
}

// Prefetch passes readahead hints on at prefetch priority.
func (c localChain) Prefetch(ctx context.Context, blocks []flat.Block) {
	c.Chain.Prefetch(fetch.WithPriority(ctx, fetch.Prefetch), blocks)
}

var _ lazyfs.LocalChecker = localChain{}

// HasLocal asks the block cache's in-memory index; no disk read.
func (c localChain) HasLocal(ctx context.Context, b flat.Block) bool {
	ok, err := c.store.Has(ctx, b.ID)
	return err == nil && ok
}

// Mount is a lazy mount of an image, owned by this process.
type Mount struct {
	FS      *lazyfs.FS
	Image   *Image
	Dir     string // where the image is mounted
	RunDir  string // runs/<id>: lock, and for `run` the overlay's upper and work
	Elapsed time.Duration
	// Seeder prefetches the start-up trace and fills the image in the
	// background, when the node's Seeding asks for it; nil otherwise.
	Seeder *seeder.Seeder
	// Demand counts the blocks reads waited on, by where they were.
	Demand *DemandStats
	lock   *os.File
	unuse  func() // ends the image's use (a local image's pins may go)
}

// Mount mounts img read-only at dir, or at a fresh runs/<id>/lower when dir
// is "". The run directory's lock is held until Close, so a later Open knows
// this mount is alive.
func (n *Node) Mount(ctx context.Context, img *Image, dir string, opts ...lazyfs.Option) (m *Mount, err error) {
	start := time.Now()
	rd := filepath.Join(n.dir, "runs", runID(img.Ref))
	lock, err := lockRunDir(rd)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			lock.Close()
			os.RemoveAll(rd)
		}
	}()
	if dir == "" {
		dir = filepath.Join(rd, "lower")
	} else if dir, err = filepath.Abs(dir); err != nil {
		return nil, err
	} else if err := writeFileAtomic(filepath.Join(rd, "mountpoint"), []byte(dir)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	clearDeadMount(dir)
	demand := &DemandStats{}
	fs, err := lazyfs.Mount(ctx, dir, img.Index, localChain{img.Chain, n.store, demand}, n.mountOptions(opts)...)
	if err != nil {
		return nil, fmt.Errorf("mount %s at %s: %w", img.Source, dir, err)
	}
	return n.newMount(ctx, img, fs, dir, rd, lock, demand, start), nil
}

// Attach serves the mount of img at dir, with run directory runDir, that
// a previous process made and handed over: conn is its FUSE connection and
// h its last lazyfs.Handoff (see lazyfs.Attach). img must be the image
// that process mounted, its index unchanged.
func (n *Node) Attach(ctx context.Context, img *Image, dir, runDir string, conn *os.File, h lazyfs.Handoff, opts ...lazyfs.Option) (*Mount, error) {
	start := time.Now()
	lock, err := lockRunDir(runDir)
	if err != nil {
		conn.Close()
		return nil, err
	}
	demand := &DemandStats{}
	fs, err := lazyfs.Attach(ctx, conn, dir, img.Index, localChain{img.Chain, n.store, demand}, h, n.mountOptions(opts)...)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("attach %s at %s: %w", img.Source, dir, err)
	}
	return n.newMount(ctx, img, fs, dir, runDir, lock, demand, start), nil
}

// lockRunDir makes run directory rd if needed and takes its lock.
func lockRunDir(rd string) (*os.File, error) {
	if err := os.MkdirAll(rd, 0o700); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(rd, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("lock run directory: %w", err)
	}
	return lock, nil
}

// mountOptions puts the node's lazyfs options before opts. The chain hands
// out only verified bytes (the cache re-hashes on every get, sources are
// checked before use), so lazyfs's own second SHA-256 per block would only
// halve cached read throughput. Files whose blocks are all in the block
// cache are materialized under files/ and then read by the kernel directly
// (FUSE passthrough); see lazyfs.
func (n *Node) mountOptions(opts []lazyfs.Option) []lazyfs.Option {
	return append([]lazyfs.Option{
		lazyfs.WithLogger(n.cfg.log), lazyfs.WithVerify(false),
		lazyfs.WithBackingDir(filepath.Join(n.dir, "files"), DefaultBackingBytes),
	}, opts...)
}

func (n *Node) newMount(ctx context.Context, img *Image, fs *lazyfs.FS, dir, rd string, lock *os.File, demand *DemandStats, start time.Time) *Mount {
	unuse := func() {}
	if img.localKey != "" {
		unuse = n.useLocal(img.localKey)
	}
	return &Mount{FS: fs, Image: img, Dir: dir, RunDir: rd, Elapsed: time.Since(start), Seeder: n.startSeeder(ctx, img), Demand: demand, lock: lock, unuse: unuse}
}

// Leave stops serving the mount without unmounting it, for the next
// process to take over (lazyfs.FS.Detach): it stays mounted, its run
// directory stays, and its requests wait for that process.
func (m *Mount) Leave() {
	if m.lock == nil {
		return
	}
	if m.Seeder != nil {
		m.Seeder.Stop()
	}
	m.FS.Detach()
	m.lock.Close()
	m.lock = nil
}

// Close unmounts and removes the run directory. It is safe to call twice.
func (m *Mount) Close() error {
	if m.lock == nil {
		return nil
	}
	if m.Seeder != nil {
		m.Seeder.Stop()
	}
	err := m.FS.Unmount()
	if err != nil {
		// Busy (a process still has files open): detach it lazily, the
		// kernel finishes when the last user goes.
		if derr := unix.Unmount(m.Dir, unix.MNT_DETACH); derr == nil {
			err = nil
		}
	}
	rmErr := os.RemoveAll(m.RunDir)
	m.lock.Close()
	m.lock = nil
	if m.unuse != nil {
		m.unuse()
	}
	return errors.Join(err, rmErr)
}

// clearDeadMount detaches mounts at dir whose FUSE server is gone, left by
// a crash (several, if crashes stacked them). stat may still answer from the
// kernel's attribute cache, so liveness is asked with statfs, which always
// reaches the server and fails with ENOTCONN once it is gone.
func clearDeadMount(dir string) {
	for range 16 {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); !errors.Is(err, unix.ENOTCONN) {
			return
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return
		}
	}
}
