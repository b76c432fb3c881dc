package lazyfs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/flat"
)

// Fetcher returns the bytes of one block. It is all lazyfs needs from the
// resolution chain behind it (local cache, peers, registry).
type Fetcher interface {
	// Fetch returns the uncompressed bytes of b, verified against b.ID. The
	// returned slice belongs to lazyfs from then on and must not be
	// modified. Fetch must return when ctx is done: lazyfs cancels it at
	// Unmount and after the fetch timeout (WithFetchTimeout). Fetch is
	// called concurrently, but never twice at once for the same block of
	// one mount.
	Fetch(ctx context.Context, b flat.Block) ([]byte, error)
}

// Prefetcher is an optional extension of a Fetcher. When a file is read
// sequentially, lazyfs passes the next blocks to Prefetch instead of fetching
// them itself, so the chain can merge them into fewer, larger requests and
// keep them where the following Fetch calls will find them. Prefetch is a
// hint: it must not block, and its ctx ends at Unmount.
type Prefetcher interface {
	Prefetch(ctx context.Context, blocks []flat.Block)
}

// Errors of this package.
var (
	// ErrClosed is returned for work asked of a mount that is unmounting.
	ErrClosed = errors.New("lazyfs: mount closed")
	// ErrCorrupt is returned when a Fetcher hands back bytes that do not
	// match the block (wrong length, or wrong hash when verifying).
	ErrCorrupt = errors.New("lazyfs: fetched block does not match its id")
)

// Option configures a mount.
type Option func(*config) error

type config struct {
	log             *slog.Logger
	readahead       int
	fetchTimeout    time.Duration
	cacheBytes      int64
	allowOther      bool
	fsName          string
	verify          bool
	kernelReadahead int
	debug           bool
	backingDir      string
	backingMax      int64
	passthroughMin  int64
	observer        AccessObserver
	handoff         func(Handoff) error

	// noKernelPassthrough keeps passthrough out of the FUSE handshake, as
	// on a kernel without it: for tests of the fallback.
	noKernelPassthrough bool
	// released, if set, is called when lazyfs has handled the release of
	// a handle of regular file i, materialize check included: for tests
	// that must know a file was not queued for materializing, without
	// sleeping.
	released func(i int32)
}

func defaults() config {
	return config{
		log:             slog.Default(),
		readahead:       4,
		fetchTimeout:    time.Minute,
		cacheBytes:      64 << 20,
		fsName:          "shoal",
		verify:          true,
		kernelReadahead: 1 << 20,
		passthroughMin:  256 << 10,
	}
}

// WithLogger sets the logger (default: slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.log = l
		return nil
	}
}

// WithReadahead sets how many blocks past the current one a sequential
// reader keeps requested ahead of it (default 4; 0 disables).
func WithReadahead(blocks int) Option {
	return func(c *config) error {
		if blocks < 0 || blocks > 64 {
			return fmt.Errorf("readahead %d blocks: want 0 to 64", blocks)
		}
		c.readahead = blocks
		return nil
	}
}

// WithFetchTimeout bounds each Fetch call (default 1 minute). A read waiting
// for a block that takes longer fails with EIO.
func WithFetchTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("fetch timeout %v: want a positive duration", d)
		}
		c.fetchTimeout = d
		return nil
	}
}

// WithCacheBytes bounds the in-memory cache of decompressed blocks
// (default 64 MiB). It needs to hold only the blocks being read right now
// and a readahead window per sequential reader: the kernel's page cache
// keeps what was read. A block larger than the bound is never cached, so a
// bound below the image's block size (0, say) makes every read that misses
// the page cache fetch again.
func WithCacheBytes(n int64) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("cache of %d bytes: want 0 or more", n)
		}
		c.cacheBytes = n
		return nil
	}
}

// WithAllowOther lets users other than the one that mounted access the file
// system (default: off). Permissions are checked by the kernel against the
// modes and owners in the index either way.
func WithAllowOther(on bool) Option {
	return func(c *config) error { c.allowOther = on; return nil }
}

// WithFSName sets the source shown in /proc/mounts and df (default "shoal");
// the type is always fuse.shoal.
func WithFSName(name string) Option {
	return func(c *config) error {
		if name == "" {
			return errors.New("empty file system name")
		}
		c.fsName = name
		return nil
	}
}

// WithVerify sets whether lazyfs checks every fetched block against its ID
// before using it (default: on). The Fetcher contract already promises
// verified bytes; the second check costs one SHA-256 per fetched block and
// turns a bug anywhere in the chain into EIO instead of wrong file contents.
func WithVerify(on bool) Option {
	return func(c *config) error { c.verify = on; return nil }
}

// WithKernelReadahead sets the kernel's readahead for the mount in bytes
// (default 1 MiB; 0 leaves the kernel's default, usually 128 KiB). A larger
// window means fewer, larger FUSE reads for sequential access. Setting it
// needs root; without, the kernel's default stays and a debug line says so.
func WithKernelReadahead(bytes int) Option {
	return func(c *config) error {
		if bytes < 0 || bytes > 64<<20 {
			return fmt.Errorf("kernel readahead %d: want 0 to 64 MiB", bytes)
		}
		c.kernelReadahead = bytes
		return nil
	}
}

// WithFUSEDebug logs every FUSE request and reply at debug level (default:
// off). Very verbose.
func WithFUSEDebug(on bool) Option {
	return func(c *config) error { c.debug = on; return nil }
}

// WithBackingDir serves files whose blocks are all local from plain files
// in dir, through FUSE passthrough where the kernel supports it (default:
// off). lazyfs materializes a file there, in the background and only from
// blocks the Fetcher has locally (it must be a LocalChecker, or nothing is
// written), once it is opened or closed with all its blocks local; later
// opens hand the kernel the materialized file, and reads no longer reach
// lazyfs at all. maxBytes bounds the directory's size (0 turns the feature
// off); past it, the least recently opened files are removed to make room.
// The directory is created if needed. Mounts of one process may share it;
// processes may not (a process that starts using it removes what looks
// half written). See the package documentation.
func WithBackingDir(dir string, maxBytes int64) Option {
	return func(c *config) error {
		if maxBytes < 0 {
			return fmt.Errorf("backing directory budget %d: want 0 or more", maxBytes)
		}
		if dir == "" && maxBytes > 0 {
			return errors.New("backing directory: empty path")
		}
		c.backingDir, c.backingMax = dir, maxBytes
		return nil
	}
}

// WithPassthroughMinSize sets the smallest file that is materialized into
// the backing directory (default 256 KiB). Smaller files are read through
// lazyfs, where the blocks they share with their neighbours are fetched
// once and kept in memory; a backing file of their own would cost an inode
// and an open per file for little gain.
func WithPassthroughMinSize(bytes int64) Option {
	return func(c *config) error {
		if bytes < 0 {
			return fmt.Errorf("passthrough minimum size %d: want 0 or more", bytes)
		}
		c.passthroughMin = bytes
		return nil
	}
}

// AccessObserver learns which blocks the application reads: Touch is
// called for every block a read of a regular file needs, with the time the
// read arrived and how long it waited for the block (0 when it was in
// memory). Readahead, prefetch and reads the kernel serves from its page
// cache or from passthrough files do not appear. Touch must be quick and
// safe for concurrent use. trace.Recorder is one.
type AccessObserver interface {
	Touch(block uint32, at time.Time, wait time.Duration)
}

// WithAccessObserver reports the blocks reads touch to o (see
// AccessObserver); nil turns it off. A recording of the first touches is
// only complete if no file was materialized for passthrough before it
// started: record on a mount without WithBackingDir to be sure.
func WithAccessObserver(o AccessObserver) Option {
	return func(c *config) error { c.observer = o; return nil }
}

// Handoff is what a process needs, beside the connection itself, to go on
// serving a mount another process made (Attach): the kernel backing IDs of
// the files it passes through, by inode number. The kernel allows one
// backing file per inode, so the next process must open those files with
// the very same IDs.
type Handoff struct {
	Backing map[uint64]int32 `json:"backing,omitempty"`
}

// WithHandoff has lazyfs report every change of its Handoff to save, before
// the kernel can learn of it: a backing ID is saved before an open uses it,
// and forgotten before it is unregistered. save must be quick (it runs
// while opens of large files wait) and must fail when it did not record
// the state; the open then reads through the block path instead.
func WithHandoff(save func(Handoff) error) Option {
	return func(c *config) error { c.handoff = save; return nil }
}

// cacheTimeout is the entry, attribute and negative-lookup timeout handed to
// the kernel. The tree never changes while mounted, so the kernel may keep
// all three as long as it likes; an hour makes revalidation rare.
const cacheTimeout = time.Hour

// maxBackgroundFetches bounds the readahead fetches lazyfs runs itself when
// the Fetcher is not a Prefetcher. Hints beyond it are dropped, not queued.
const maxBackgroundFetches = 8

// FS is a mounted flat image.
type FS struct {
	dir  string
	x    *flat.Index
	t    *tree
	f    Fetcher
	pf   Prefetcher   // f, if it is one
	lc   LocalChecker // f, if it is one
	cfg  config
	log  *slog.Logger
	conn *os.File // the /dev/fuse connection
	raw  *rawFS

	// attached: the mount was made by another process (Attach).
	attached bool
	// detached: handing over (Detach); reads are no longer answered.
	detached atomic.Bool

	// ctx is the parent of every fetch; Unmount cancels it. It is the
	// mount's lifetime, not a request's.
	ctx    context.Context
	cancel context.CancelFunc

	sf    singleflight.Group
	cache *blockCache
	sem   chan struct{} // background readahead fetches in flight

	mu     sync.Mutex // guards closed and bg.Add
	closed bool
	bg     sync.WaitGroup // fetches and readahead goroutines
	done   chan struct{}  // closed when the server has exited and bg is drained

	unmountOnce sync.Once
	unmountErr  error

	// With a backing directory: materializing, and the open handles of
	// large files by kind (see openState).
	mat   *materializer
	omu   sync.Mutex
	opens map[int32]*openState
	// backing is the Handoff's map, kept under omu when WithHandoff is set.
	backing       map[uint64]int32
	noPassthrough atomic.Bool // the kernel refused a backing file

	stats stats
}

type stats struct {
	fetches, fetchErrors, fetchedBytes atomic.Int64
	hits, misses                       atomic.Int64
	readahead                          atomic.Int64
	readBytes, readErrors              atomic.Int64
	waiting                            atomic.Int64
	passthroughOpens, backingReads     atomic.Int64
	materialized, materializedBytes    atomic.Int64
	materializeErrors                  atomic.Int64
}

// Stats are a mount's counters since it was mounted.
type Stats struct {
	Fetches      int64 `json:"fetches"`       // Fetch calls made
	FetchErrors  int64 `json:"fetch_errors"`  // of which failed (error, timeout, corrupt)
	FetchedBytes int64 `json:"fetched_bytes"` // uncompressed bytes fetched
	CacheHits    int64 `json:"cache_hits"`    // block lookups of reads served from memory
	CacheMisses  int64 `json:"cache_misses"`  // block lookups of reads that waited for a fetch
	Readahead    int64 `json:"readahead"`     // blocks hinted or fetched ahead of sequential readers
	ReadBytes    int64 `json:"read_bytes"`    // bytes returned to the kernel
	ReadErrors   int64 `json:"read_errors"`   // reads answered with EIO
	Waiting      int64 `json:"waiting"`       // reads waiting for a block right now
	CachedBytes  int64 `json:"cached_bytes"`  // decompressed bytes held in memory

	// With a backing directory (WithBackingDir):
	PassthroughOpens  int64 `json:"passthrough_opens"`  // opens answered with a materialized file
	BackingReads      int64 `json:"backing_reads"`      // reads of those that came to lazyfs (the kernel did not pass them through)
	Materialized      int64 `json:"materialized"`       // files this mount materialized
	MaterializedBytes int64 `json:"materialized_bytes"` // and their bytes
	MaterializeErrors int64 `json:"materialize_errors"` // materializations abandoned (disk, cache, unmount)
	BackingFiles      int64 `json:"backing_files"`      // files in the backing directory now, as far as this process knows
	BackingBytes      int64 `json:"backing_bytes"`      // and their bytes
	BackingEvicted    int64 `json:"backing_evicted"`    // files removed from it to stay in budget, by this process
}

// Mount mounts x read-only at mountpoint and serves it until Unmount.
// Metadata is answered from x, which must not change afterwards; file
// contents come from f, block by block, as they are read. ctx bounds the
// mounting only (its values, not its cancellation, reach every Fetch). The
// mount needs CAP_SYS_ADMIN (root).
func Mount(ctx context.Context, mountpoint string, x *flat.Index, f Fetcher, opts ...Option) (*FS, error) {
	m, err := newFS(ctx, mountpoint, x, f, opts)
	if err != nil {
		return nil, err
	}
	if m.conn, err = mountFUSE(mountpoint, m.cfg); err != nil {
		m.abort()
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	server, err := newServer(m)
	if err != nil {
		_ = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
		m.conn.Close()
		m.abort()
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	m.start(server)
	pollHack(mountpoint)
	if m.cfg.kernelReadahead > 0 {
		m.setKernelReadahead(m.cfg.kernelReadahead)
	}
	m.log.Info("mounted", "entries", len(x.Entries), "blocks", len(x.Blocks), "image_bytes", x.ImageBytes(),
		"prefetcher", m.pf != nil, "backing_dir", m.cfg.backingDir, "backing_budget", m.cfg.backingMax, "local_checker", m.lc != nil)
	return m, nil
}

// Attach serves the mount at mountpoint whose FUSE connection is conn: one
// that another process made with Mount (or Attach) and handed over, alive
// or dead, before it stopped serving. x must be the index that process
// served, and h its last Handoff. The kernel is first told to send again
// every request the other process read but did not answer, so a read that
// was in flight there completes here; the reader sees a pause, not an
// error. Attach takes conn over: Unmount and the end of the file system
// close it.
func Attach(ctx context.Context, conn *os.File, mountpoint string, x *flat.Index, f Fetcher, h Handoff, opts ...Option) (*FS, error) {
	m, err := newFS(ctx, mountpoint, x, f, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	m.conn, m.attached = conn, true
	if m.mat != nil {
		for ino, id := range h.Backing {
			if ino == 0 || ino > uint64(len(x.Entries)) || id <= 0 {
				continue
			}
			i := m.t.canon[ino-1]
			if !m.passthroughCandidate(i) {
				continue
			}
			m.opens[i] = &openState{fd: -1, id: id, inherited: true}
			if m.backing != nil {
				m.backing[ino] = id
			}
		}
	}
	if err := resendPending(conn); err != nil {
		m.abort()
		conn.Close()
		return nil, fmt.Errorf("attach %s: %w", mountpoint, err)
	}
	// go-fuse reads the first request of a connection as its INIT, before
	// it serves; on a connection already initialized that is an ordinary
	// request, served as such. It waits for one to arrive, so a statfs of
	// the mount (a request the kernel never answers from its caches)
	// makes sure one does.
	type result struct {
		s   *fuse.Server
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := newServer(m)
		done <- result{s, err}
	}()
	go func() {
		var st syscall.Statfs_t
		_ = syscall.Statfs(mountpoint, &st)
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		// The statfs may be stuck behind a dead mount point; give up, and
		// let the server goroutine end with the connection.
		conn.Close()
		m.abort()
		return nil, fmt.Errorf("attach %s: %w", mountpoint, ctx.Err())
	}
	if r.err != nil {
		conn.Close()
		m.abort()
		return nil, fmt.Errorf("attach %s: %w", mountpoint, r.err)
	}
	if m.cfg.handoff != nil {
		m.omu.Lock()
		err := m.cfg.handoff(m.handoffState())
		m.omu.Unlock()
		if err != nil {
			m.log.Warn("handoff state not saved", "err", err)
		}
	}
	m.start(r.s)
	pollHack(mountpoint)
	m.log.Info("attached", "entries", len(x.Entries), "inherited_backing_ids", len(h.Backing))
	return m, nil
}

// newFS checks the options and sets up everything but the connection.
func newFS(ctx context.Context, mountpoint string, x *flat.Index, f Fetcher, opts []Option) (*FS, error) {
	c := defaults()
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, err
		}
	}
	if f == nil {
		return nil, errors.New("lazyfs: nil Fetcher")
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := x.Validate(); err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	t, err := newTree(x)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	m := &FS{
		dir:   mountpoint,
		x:     x,
		t:     t,
		f:     f,
		cfg:   c,
		log:   c.log.With("component", "lazyfs", "mountpoint", mountpoint),
		cache: newBlockCache(c.cacheBytes),
		sem:   make(chan struct{}, maxBackgroundFetches),
		done:  make(chan struct{}),
	}
	m.raw = newRawFS(m)
	m.pf, _ = f.(Prefetcher)
	m.ctx, m.cancel = context.WithCancel(context.WithoutCancel(ctx))
	if c.backingDir != "" && c.backingMax > 0 {
		d, err := acquireBackingDir(c.backingDir, c.backingMax)
		if err != nil {
			m.cancel()
			return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
		}
		m.mat = newMaterializer(d)
		m.opens = map[int32]*openState{}
		m.lc, _ = f.(LocalChecker)
		if c.handoff != nil {
			m.backing = map[uint64]int32{}
		}
	}
	if m.mat == nil || c.noKernelPassthrough {
		m.noPassthrough.Store(true)
	}
	return m, nil
}

// abort undoes newFS for a mount that never served.
func (m *FS) abort() {
	m.cancel()
	if m.mat != nil {
		m.mat.d.release()
	}
}

// newServer starts go-fuse on the mount's connection.
func newServer(m *FS) (*fuse.Server, error) {
	p, err := connPath(m.conn)
	if err != nil {
		return nil, err
	}
	s, err := fuse.NewServer(m.raw, p, m.serverOptions())
	if err != nil {
		return nil, err
	}
	return s, nil
}

// serverOptions are go-fuse's options for the mount's server.
func (m *FS) serverOptions() *fuse.MountOptions {
	c := m.cfg
	fuseLog := slog.NewLogLogger(m.log.Handler(), slog.LevelWarn)
	if c.debug {
		fuseLog = slog.NewLogLogger(m.log.Handler(), slog.LevelDebug)
	}
	o := &fuse.MountOptions{
		// One READ may carry up to 1 MiB, the kernel's limit.
		MaxWrite:     fuse.MAX_KERNEL_WRITE,
		MaxReadAhead: fuse.MAX_KERNEL_WRITE,
		// Kernel readahead goes out as background requests; let enough of
		// them be in flight for several sequential readers.
		MaxBackground: 64,
		// Replies are slices of cached blocks sent with writev; there is
		// no file descriptor to splice from.
		DisableSplice: true,
		// Nothing changes under the kernel, so it never needs to drop
		// cached pages because an mtime moved, and it may cache symlinks.
		ExplicitDataCacheControl: true,
		EnableSymlinkCaching:     true,
		Debug:                    c.debug,
		Logger:                   fuseLog,
	}
	if m.mat == nil || c.noKernelPassthrough {
		// Negotiated, passthrough makes the kernel count this mount as a
		// level of file system stacking (see the package documentation):
		// not worth it with nothing to pass through.
		o.DisabledCapabilities = fuse.CAP_PASSTHROUGH
	}
	return o
}

// start serves the connection until the file system goes away, however it
// does (Unmount, umount(8), the kernel aborting the connection), then
// stops fetching and drains.
func (m *FS) start(server *fuse.Server) {
	if m.mat != nil && m.lc != nil && m.track() {
		go m.materializeLoop()
	}
	go func() {
		server.Serve()
		m.stop()
		m.bg.Wait()
		if m.mat != nil {
			m.closeBackingFiles()
			m.mat.d.release()
		}
		m.conn.Close()
		close(m.done)
	}()
}

// Conn returns a duplicate of the mount's FUSE connection, to hand to a
// process that may serve the mount after this one (Attach). The caller
// owns it.
func (m *FS) Conn() (*os.File, error) {
	fd, err := unix.FcntlInt(m.conn.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicate FUSE connection: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}

// Dir returns the mount point.
func (m *FS) Dir() string { return m.dir }

// Stats returns the mount's counters.
func (m *FS) Stats() Stats {
	s := &m.stats
	st := Stats{
		Fetches: s.fetches.Load(), FetchErrors: s.fetchErrors.Load(), FetchedBytes: s.fetchedBytes.Load(),
		CacheHits: s.hits.Load(), CacheMisses: s.misses.Load(), Readahead: s.readahead.Load(),
		ReadBytes: s.readBytes.Load(), ReadErrors: s.readErrors.Load(), Waiting: s.waiting.Load(),
		CachedBytes:      m.cache.bytes(),
		PassthroughOpens: s.passthroughOpens.Load(), BackingReads: s.backingReads.Load(),
		Materialized: s.materialized.Load(), MaterializedBytes: s.materializedBytes.Load(),
		MaterializeErrors: s.materializeErrors.Load(),
	}
	if m.mat != nil {
		st.BackingFiles, st.BackingBytes, st.BackingEvicted = m.mat.d.usage()
	}
	return st
}

// Wait blocks until the file system is unmounted (by Unmount or from
// outside) and every fetch lazyfs started has returned.
func (m *FS) Wait() { <-m.done }

// unmountTries is how often Unmount retries a busy mount before detaching
// it: a file closed just before Unmount can keep it busy for a moment.
const unmountTries = 6

// Unmount cancels every fetch in flight (reads waiting for them fail with
// EIO), unmounts, and waits for the server and every fetch to finish. If
// files are still open after a few retries, the mount is detached instead
// (umount -l): it disappears from the tree at once, and its server keeps
// answering the open files from memory until the last is closed; Wait
// returns then. Calling Unmount again returns the first call's result.
func (m *FS) Unmount() error {
	m.unmountOnce.Do(func() { m.unmountErr = m.unmount() })
	return m.unmountErr
}

func (m *FS) unmount() error {
	m.stop()
	var err error
	delay := time.Duration(0)
	for try := 1; ; try++ {
		err = syscall.Unmount(m.dir, 0)
		if err == nil || !errors.Is(err, syscall.EBUSY) || try == unmountTries {
			break
		}
		delay = 2*delay + 5*time.Millisecond
		time.Sleep(delay)
	}
	switch {
	case err == nil:
	case errors.Is(err, syscall.EBUSY):
		if err = syscall.Unmount(m.dir, syscall.MNT_DETACH); err == nil {
			m.log.Warn("mount busy: detached; open files are served until closed")
			return nil
		}
	case errors.Is(err, syscall.EINVAL):
		// Not a mount point any more: unmounted from outside.
		m.log.Info("already unmounted")
		return nil
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", m.dir, err)
	}
	select {
	case <-m.done:
	case <-time.After(5 * time.Second):
		// Only a Fetcher that ignores its cancelled context gets here.
		m.log.Warn("unmounted; still waiting for fetches to return")
		<-m.done
	}
	m.log.Info("unmounted")
	return nil
}

// Detach stops answering reads, for a handover to the next process
// (Attach) just before this one exits: the mount stays, fetches in flight
// are cancelled, and every read from now on, or whose fetch fails from now
// on, waits unanswered, so that the kernel sends it again to the next
// server instead of failing it. Metadata is still answered. A detached
// mount cannot be used again in this process.
func (m *FS) Detach() {
	m.detached.Store(true)
	m.stop()
	m.log.Info("detached: reads wait for the next server")
}

// holdIfDetached blocks a read forever once the mount is detached.
func (m *FS) holdIfDetached() {
	if m.detached.Load() {
		select {}
	}
}

// stop refuses new background work and cancels all fetches in flight.
func (m *FS) stop() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
}

// track registers one background goroutine, unless the mount is closing.
// Registering under the same lock that stop takes is what makes bg.Wait safe.
func (m *FS) track() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.bg.Add(1)
	return true
}

// setKernelReadahead raises the readahead of the mount's backing device
// info. The FUSE init reply cannot raise it past the kernel's default of
// 128 KiB, but sysfs can, for files opened from then on.
func (m *FS) setKernelReadahead(bytes int) {
	var st syscall.Stat_t
	if err := syscall.Stat(m.dir, &st); err != nil {
		m.log.Debug("kernel readahead left at default", "err", err)
		return
	}
	major := (st.Dev>>8)&0xfff | (st.Dev>>32)&^0xfff
	minor := st.Dev&0xff | (st.Dev>>12)&^0xff
	path := "/sys/class/bdi/" + strconv.FormatUint(major, 10) + ":" + strconv.FormatUint(minor, 10) + "/read_ahead_kb"
	if err := os.WriteFile(path, []byte(strconv.Itoa(bytes>>10)), 0); err != nil {
		m.log.Debug("kernel readahead left at default", "err", err)
	}
}
