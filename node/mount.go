package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/lazyfs"
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
	store *blockstore.Store
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
	lock    *os.File
}

// Mount mounts img read-only at dir, or at a fresh runs/<id>/lower when dir
// is "". The run directory's lock is held until Close, so a later Open knows
// this mount is alive.
func (n *Node) Mount(ctx context.Context, img *Image, dir string, opts ...lazyfs.Option) (m *Mount, err error) {
	start := time.Now()
	rd := filepath.Join(n.dir, "runs", runID(img.Ref))
	if err := os.MkdirAll(rd, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(rd)
		}
	}()
	lock, err := os.OpenFile(filepath.Join(rd, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("lock run directory: %w", err)
	}
	if dir == "" {
		dir = filepath.Join(rd, "lower")
	} else if dir, err = filepath.Abs(dir); err != nil {
		lock.Close()
		return nil, err
	} else if err := writeFileAtomic(filepath.Join(rd, "mountpoint"), []byte(dir)); err != nil {
		lock.Close()
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		lock.Close()
		return nil, err
	}
	clearDeadMount(dir)
	// The chain hands out only verified bytes (the cache re-hashes on every
	// get, sources are checked before use), so lazyfs's own second SHA-256
	// per block would only halve cached read throughput. Files whose blocks
	// are all in the block cache are materialized under files/ and then
	// read by the kernel directly (FUSE passthrough); see lazyfs.
	opts = append([]lazyfs.Option{
		lazyfs.WithLogger(n.cfg.log), lazyfs.WithVerify(false),
		lazyfs.WithBackingDir(filepath.Join(n.dir, "files"), DefaultBackingBytes),
	}, opts...)
	fs, err := lazyfs.Mount(ctx, dir, img.Index, localChain{img.Chain, n.store}, opts...)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("mount %s at %s: %w", img.Source, dir, err)
	}
	return &Mount{FS: fs, Image: img, Dir: dir, RunDir: rd, Elapsed: time.Since(start), lock: lock}, nil
}

// Close unmounts and removes the run directory. It is safe to call twice.
func (m *Mount) Close() error {
	if m.lock == nil {
		return nil
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
