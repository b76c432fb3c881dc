package lazyfs

import (
	"bufio"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/shoal-project/shoal/flat"
)

// LocalChecker is an optional extension of a Fetcher. HasLocal reports
// whether Fetch would return b without going to the network (the block is
// in the node's own cache). lazyfs asks it before materializing a file into
// the backing directory (WithBackingDir), which it only does from local
// blocks: materializing must never cost network traffic. HasLocal must be
// cheap (an index lookup) and must not block.
type LocalChecker interface {
	HasLocal(ctx context.Context, b flat.Block) bool
}

// errNotLocal stops a materialization whose block is not in the local cache
// (any more).
var errNotLocal = errors.New("block not in the local cache")

// tmpSuffix marks a backing file being written. Such files are removed when
// a process first uses the directory: they are left by a crash.
const tmpSuffix = ".tmp"

// materializeQueue bounds the files waiting to be materialized by one mount.
// A trigger that finds the queue full is dropped; the next open or release
// of the file tries again.
const materializeQueue = 1024

// backingDirs are the backing directories in use by this process, by path,
// so that every mount of the process sharing one sees one budget and one
// set of files in flight.
var backingDirs = struct {
	sync.Mutex
	m map[string]*backingDir
}{m: map[string]*backingDir{}}

// backingDir is a directory of materialized files, named by content key,
// shared by the mounts of this process that use it.
type backingDir struct {
	path string
	max  int64
	refs int // guarded by backingDirs

	scanOnce sync.Once

	mu      sync.Mutex
	files   map[string]*backingFile // complete files, by key
	busy    map[string]bool         // files being written, by key
	used    int64                   // bytes of files and of those being written
	clock   int64                   // use counter: larger is more recent
	evicted int64
}

type backingFile struct {
	size int64
	used int64 // backingDir.clock at the last passthrough open
}

// acquireBackingDir returns the shared state of dir, creating the directory
// if needed. Every call must be matched by release.
func acquireBackingDir(dir string, maxBytes int64) (*backingDir, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("backing directory: %w", err)
	}
	backingDirs.Lock()
	defer backingDirs.Unlock()
	d := backingDirs.m[dir]
	if d == nil {
		// The first mount sets the budget; the node gives all the same.
		d = &backingDir{path: dir, max: maxBytes, files: map[string]*backingFile{}, busy: map[string]bool{}}
		backingDirs.m[dir] = d
	}
	d.refs++
	return d, nil
}

func (d *backingDir) release() {
	backingDirs.Lock()
	defer backingDirs.Unlock()
	if d.refs--; d.refs == 0 {
		delete(backingDirs.m, d.path)
	}
}

// scan counts the files already in the directory, once, and removes what
// a crash left half written. It runs on the materializing goroutine, not in
// Mount: only materializing needs the budget.
func (d *backingDir) scan(log interface{ Debug(string, ...any) }) {
	d.scanOnce.Do(func() {
		ents, err := os.ReadDir(d.path)
		if err != nil {
			log.Debug("backing directory unreadable", "dir", d.path, "err", err)
			return
		}
		type file struct {
			key  string
			size int64
			mod  int64
		}
		var files []file
		for _, e := range ents {
			name := e.Name()
			if strings.HasSuffix(name, tmpSuffix) {
				os.Remove(filepath.Join(d.path, name))
				continue
			}
			if !isKey(name) || !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue
			}
			files = append(files, file{name, fi.Size(), fi.ModTime().UnixNano()})
		}
		// Oldest first: their use order is unknown, so they are evicted
		// in the order they were written.
		slices.SortFunc(files, func(a, b file) int { return cmp.Compare(a.mod, b.mod) })
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, f := range files {
			if _, ok := d.files[f.key]; ok || d.busy[f.key] {
				continue
			}
			d.clock++
			d.files[f.key] = &backingFile{size: f.size, used: d.clock}
			d.used += f.size
		}
	})
}

func isKey(name string) bool {
	if len(name) != 2*sha256.Size {
		return false
	}
	_, err := hex.DecodeString(name)
	return err == nil
}

func (d *backingDir) file(key string) string { return filepath.Join(d.path, key) }

// known reports whether key is materialized or being written, as far as
// this process knows.
func (d *backingDir) known(key string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.files[key]
	return ok || d.busy[key]
}

// touch records a use of key, for eviction.
func (d *backingDir) touch(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if f := d.files[key]; f != nil {
		d.clock++
		f.used = d.clock
	}
}

// adopt records a complete file found on disk.
func (d *backingDir) adopt(key string, size int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.files[key]; ok || d.busy[key] {
		return
	}
	d.clock++
	d.files[key] = &backingFile{size: size, used: d.clock}
	d.used += size
}

// forget drops key, whose file is gone or wrong, and removes the file.
func (d *backingDir) forget(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if f := d.files[key]; f != nil {
		d.used -= f.size
		delete(d.files, key)
	}
	os.Remove(d.file(key))
}

// reserve claims size bytes of the budget for writing key, evicting the
// least recently used files if that makes room. It fails when key is
// already there or being written, or when it cannot fit.
func (d *backingDir) reserve(key string, size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.files[key]; ok || d.busy[key] {
		return errors.New("already materialized or in flight")
	}
	if size > d.max {
		return fmt.Errorf("%d bytes: larger than the budget of %d", size, d.max)
	}
	for d.used+size > d.max {
		victim, oldest := "", int64(0)
		for k, f := range d.files {
			if victim == "" || f.used < oldest {
				victim, oldest = k, f.used
			}
		}
		if victim == "" {
			return errors.New("budget taken by files being written")
		}
		// An open file stays readable after the unlink; its blocks are
		// freed when the last user closes it.
		os.Remove(d.file(victim))
		d.used -= d.files[victim].size
		delete(d.files, victim)
		d.evicted++
	}
	d.used += size
	d.busy[key] = true
	return nil
}

// commit turns a reservation into a complete file; abort gives it back.
func (d *backingDir) commit(key string, size int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.busy, key)
	d.clock++
	d.files[key] = &backingFile{size: size, used: d.clock}
}

func (d *backingDir) abort(key string, size int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.busy, key)
	d.used -= size
}

func (d *backingDir) usage() (files, bytes, evicted int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var n int64
	for _, f := range d.files {
		n += f.size
	}
	return int64(len(d.files)), n, d.evicted
}

// materializer is one mount's side of materializing: the queue its one
// worker drains, and per-file state.
type materializer struct {
	d     *backingDir
	queue chan int32

	mu     sync.Mutex
	queued map[int32]bool   // in the queue or being written by this mount
	keys   map[int32]string // content keys computed so far
}

func newMaterializer(d *backingDir) *materializer {
	return &materializer{d: d, queue: make(chan int32, materializeQueue), queued: map[int32]bool{}, keys: map[int32]string{}}
}

// fileKey is the content key of regular file i, computed once per mount.
func (m *FS) fileKey(i int32) string {
	mt := m.mat
	mt.mu.Lock()
	k, ok := mt.keys[i]
	mt.mu.Unlock()
	if !ok {
		k = contentKey(m.x, i)
		mt.mu.Lock()
		mt.keys[i] = k
		mt.mu.Unlock()
	}
	return k
}

// contentKey names the backing file of regular file i of x: a SHA-256 over
// its size and its extents' block IDs, offsets and lengths. A block ID is a
// hash of the block's bytes, so the key pins down every byte of the file,
// and the same bytes cut into the same blocks get the same key in every
// image: identical files of different images share one backing file.
func contentKey(x *flat.Index, i int32) string {
	e := &x.Entries[i]
	h := sha256.New()
	var buf [32 + 4 + 4]byte
	io.WriteString(h, "shoal passthrough file v1\n")
	binary.LittleEndian.PutUint64(buf[:8], e.Size)
	h.Write(buf[:8])
	for _, ex := range e.Extents {
		id := x.Blocks[ex.Block].ID
		copy(buf[:32], id[:])
		binary.LittleEndian.PutUint32(buf[32:], ex.Offset)
		binary.LittleEndian.PutUint32(buf[36:], ex.Length)
		h.Write(buf[:])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// passthroughCandidate reports whether regular file i is large enough to be
// served from a backing file.
func (m *FS) passthroughCandidate(i int32) bool {
	return m.mat != nil && int64(m.x.Entries[i].Size) >= m.cfg.passthroughMin && m.x.Entries[i].Size > 0
}

// openState counts the open handles of one large file, by kind. The kernel
// refuses (with EIO to the opener) a passthrough open of an inode that has
// files open through the page cache, and the reverse, so a file's handles
// are all of one kind at a time: a backed handle is handed out only when no
// cached one is open, and while one is, every open gets one. The kernel
// forgets a handle before lazyfs hears of its release, so these counts
// never fall below the kernel's.
type openState struct {
	cached int   // handles reading through the block path
	backed int   // handles with the backing file
	fd     int   // the backing file, open while backed > 0; -1 if none
	id     int32 // its kernel backing ID while passed through; 0 if not
	// inherited: id was registered by the process before Attach, which
	// may have left handles open with it. It is never unregistered, and
	// every open of the file uses it: the kernel refuses a second backing
	// file for one inode.
	inherited bool
}

// backedHandle is an open file whose bytes are in a backing file. When the
// kernel passes its reads through (the open carried a backing ID), they
// never come here; otherwise (no passthrough support, no privilege) they
// are served from fd. fd is -1 for a handle of an inherited backing ID,
// whose reads the kernel always passes through.
type backedHandle struct {
	fd int
}

// openLarge opens regular file i, which is a passthrough candidate: with its
// backing file if there is one and nothing holds the file open through the
// block path, and through the block path otherwise. id is the kernel
// backing ID to pass the open through with, 0 for none.
func (m *FS) openLarge(i int32, srv *fuse.Server) (h *handle, b *backedHandle, id int32) {
	m.omu.Lock()
	st := m.openState(i)
	switch {
	case st.inherited || st.backed > 0:
		st.backed++
		b, id = &backedHandle{fd: st.fd}, st.id
		m.omu.Unlock()
		m.stats.passthroughOpens.Add(1)
		m.mat.d.touch(m.fileKey(i))
		return nil, b, id
	case st.cached > 0 || m.attached:
		// An attached mount does not know which files the previous
		// process left open through the page cache, so it passes through
		// only the files that process did (inherited).
		st.cached++
		m.omu.Unlock()
		return &handle{lastEnd: -1, counted: true}, nil, 0
	}
	m.omu.Unlock()

	// Open the backing file outside the lock, then decide again: another
	// open may have decided meanwhile.
	key := m.fileKey(i)
	fd := m.openBackingFile(key, int64(m.x.Entries[i].Size))

	m.omu.Lock()
	st = m.openState(i) // the last release may have dropped the old one
	switch {
	case st.backed > 0:
		st.backed++
		b, id = &backedHandle{fd: st.fd}, st.id
	case st.cached > 0 || fd < 0:
		st.cached++
		h = &handle{lastEnd: -1, counted: true}
	default:
		if id = m.passThrough(srv, i, fd); id < 0 {
			st.cached++
			h = &handle{lastEnd: -1, counted: true}
			break
		}
		st.backed, st.fd, st.id, fd = 1, fd, id, -1
		b = &backedHandle{fd: st.fd}
	}
	m.omu.Unlock()
	if fd >= 0 {
		syscall.Close(fd) // not needed after all
	}
	if b != nil {
		m.stats.passthroughOpens.Add(1)
		m.mat.d.touch(key)
	}
	return h, b, id
}

// passThrough registers fd as the backing file of regular file i with the
// kernel and returns its backing ID: 0 when the kernel cannot pass reads
// through (lazyfs then serves them from fd), -1 when the handoff state
// could not record the ID (the open then takes the block path). Called
// with omu held.
func (m *FS) passThrough(srv *fuse.Server, i int32, fd int) int32 {
	if srv == nil || m.noPassthrough.Load() {
		return 0
	}
	id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fd)})
	if errno != 0 {
		// Not root, no kernel support, or a backing directory the kernel
		// will not stack on: serve backed handles by pread from now on.
		m.noPassthrough.Store(true)
		m.log.Info("kernel passthrough unavailable; backing files are read by lazyfs", "err", errno)
		return 0
	}
	if m.cfg.handoff != nil {
		m.backing[m.t.ino(i)] = id
		if err := m.cfg.handoff(m.handoffState()); err != nil {
			delete(m.backing, m.t.ino(i))
			srv.UnregisterBackingFd(id)
			m.log.Warn("handoff state not saved; file read through the block path", "path", m.x.Entries[i].Path, "err", err)
			return -1
		}
	}
	return id
}

// handoffState copies what Attach needs. Called with omu held.
func (m *FS) handoffState() Handoff {
	h := Handoff{Backing: make(map[uint64]int32, len(m.backing))}
	for ino, id := range m.backing {
		h.Backing[ino] = id
	}
	return h
}

// openState returns the state of file i, creating it. Called with omu held.
func (m *FS) openState(i int32) *openState {
	st := m.opens[i]
	if st == nil {
		st = &openState{fd: -1}
		m.opens[i] = st
	}
	return st
}

// openBackingFile opens the backing file of key if it exists and has the
// right size; otherwise it returns -1. A file of the wrong size is not one
// lazyfs wrote completely: it is removed.
func (m *FS) openBackingFile(key string, size int64) int {
	path := m.mat.d.file(key)
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC|syscall.O_NOATIME, 0)
	if errors.Is(err, syscall.EPERM) {
		// O_NOATIME needs the file's owner.
		fd, err = syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	}
	if err != nil {
		return -1
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil || st.Size != size || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		syscall.Close(fd)
		m.log.Warn("backing file has the wrong size; removed", "file", path, "size", st.Size, "want", size)
		m.mat.d.forget(key)
		return -1
	}
	return fd
}

// release forgets an open handle of a large file and, when it read through
// the block path, sees whether the file can now be materialized. The last
// backed handle of a file ends its backing ID: first in the handoff state,
// then in the kernel, so that a process attaching in between never uses
// an ID that is gone.
func (m *FS) release(of *openFile, srv *fuse.Server) {
	i := of.i
	if m.cfg.released != nil {
		defer m.cfg.released(i)
	}
	switch {
	case of.backed != nil:
		m.omu.Lock()
		st := m.opens[i]
		if st == nil || st.backed == 0 { // closed by closeBackingFiles
			m.omu.Unlock()
			return
		}
		st.backed--
		fd, id := -1, int32(0)
		if st.backed == 0 && !st.inherited {
			fd, st.fd = st.fd, -1
			id, st.id = st.id, 0
			if st.cached == 0 {
				delete(m.opens, i)
			}
		}
		if id != 0 && m.cfg.handoff != nil {
			delete(m.backing, m.t.ino(i))
			if err := m.cfg.handoff(m.handoffState()); err != nil {
				// Left registered: a later process may still be told of it.
				m.log.Warn("handoff state not saved; backing ID kept", "path", m.x.Entries[i].Path, "err", err)
				id = 0
			}
		}
		m.omu.Unlock()
		if id != 0 && srv != nil {
			srv.UnregisterBackingFd(id)
		}
		if fd >= 0 {
			syscall.Close(fd)
		}
	case of.h != nil && of.h.counted:
		m.omu.Lock()
		st := m.opens[i]
		if st == nil {
			m.omu.Unlock()
			return
		}
		st.cached--
		if st.cached == 0 && st.backed == 0 && !st.inherited {
			delete(m.opens, i)
		}
		m.omu.Unlock()
		m.maybeMaterialize(i)
	}
}

// closeBackingFiles closes the backing files of handles the kernel never
// released (the connection ended). The server has exited.
func (m *FS) closeBackingFiles() {
	m.omu.Lock()
	defer m.omu.Unlock()
	for i, st := range m.opens {
		st.backed = 0
		if st.fd >= 0 {
			syscall.Close(st.fd)
		}
		delete(m.opens, i)
	}
}

// readBacked serves a read of a backed handle that the kernel did not pass
// through.
func (m *FS) readBacked(h *backedHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	n := 0
	for n < len(dest) {
		k, err := syscall.Pread(h.fd, dest[n:], off+int64(n))
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			m.stats.readErrors.Add(1)
			m.log.Error("read of backing file failed", "err", err)
			return nil, syscall.EIO
		}
		if k == 0 {
			break
		}
		n += k
	}
	m.stats.backingReads.Add(1)
	m.stats.readBytes.Add(int64(n))
	return fuse.ReadResultData(dest[:n]), 0
}

// maybeMaterialize queues regular file i for materializing if it is not
// materialized yet and all its blocks are local. It is cheap when they are
// not: the check stops at the first missing block.
func (m *FS) maybeMaterialize(i int32) {
	mt := m.mat
	if mt == nil || m.lc == nil || m.ctx.Err() != nil || int64(m.x.Entries[i].Size) > mt.d.max {
		return
	}
	if mt.d.known(m.fileKey(i)) {
		return
	}
	mt.mu.Lock()
	queued := mt.queued[i]
	mt.mu.Unlock()
	if queued || !m.allLocal(i) {
		return
	}
	mt.mu.Lock()
	defer mt.mu.Unlock()
	if mt.queued[i] {
		return
	}
	select {
	case mt.queue <- i:
		mt.queued[i] = true
	default:
		m.log.Debug("materialize queue full; dropped", "path", m.x.Entries[i].Path)
	}
}

// allLocal reports whether every block of regular file i is in the local
// cache.
func (m *FS) allLocal(i int32) bool {
	prev := uint32(0)
	for k, ex := range m.x.Entries[i].Extents {
		if k > 0 && ex.Block == prev {
			continue
		}
		prev = ex.Block
		if !m.lc.HasLocal(m.ctx, m.x.Blocks[ex.Block]) {
			return false
		}
	}
	return true
}

// materializeLoop writes queued files one at a time until the mount
// closes, so materializing never takes more than one core from readers.
func (m *FS) materializeLoop() {
	defer m.bg.Done()
	mt := m.mat
	mt.d.scan(m.log)
	for {
		select {
		case <-m.ctx.Done():
			return
		case i := <-mt.queue:
			if err := m.materialize(i); err != nil {
				m.stats.materializeErrors.Add(1)
				m.log.Debug("materialize failed", "path", m.x.Entries[i].Path, "err", err)
			}
			mt.mu.Lock()
			delete(mt.queued, i)
			mt.mu.Unlock()
		}
	}
}

// materialize writes regular file i to the backing directory, from local
// blocks only: to <key>.tmp, then renamed to <key>. A file that cannot be
// written whole (a block no longer local, the budget, the disk, Unmount)
// leaves nothing behind.
func (m *FS) materialize(i int32) error {
	d := m.mat.d
	d.scan(m.log)
	e := &m.x.Entries[i]
	size := int64(e.Size)
	key := m.fileKey(i)
	final := d.file(key)
	if fi, err := os.Stat(final); err == nil && fi.Size() == size {
		d.adopt(key, size)
		return nil
	}
	if !m.allLocal(i) {
		return nil // not an error: it may be later
	}
	if err := d.reserve(key, size); err != nil {
		m.log.Debug("not materialized", "path", e.Path, "reason", err)
		return nil
	}
	tmp := final + tmpSuffix
	err := m.writeBacking(i, tmp)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		os.Remove(tmp)
		d.abort(key, size)
		return err
	}
	d.commit(key, size)
	m.stats.materialized.Add(1)
	m.stats.materializedBytes.Add(size)
	m.log.Debug("materialized", "path", e.Path, "bytes", size, "key", key)
	return nil
}

func (m *FS) writeBacking(i int32, tmp string) (err error) {
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o400)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	var data []byte
	prev := uint32(0)
	for k, ex := range m.x.Entries[i].Extents {
		if k == 0 || ex.Block != prev {
			if err := m.ctx.Err(); err != nil {
				return err
			}
			if data, err = m.localBlock(ex.Block); err != nil {
				return err
			}
			prev = ex.Block
		}
		if _, err := w.Write(data[ex.Offset : ex.Offset+ex.Length]); err != nil {
			return err
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	// Passthrough reads are not verified against block IDs, so a file
	// must not appear under its key before its bytes are on disk: after a
	// crash, a renamed file whose data never reached the disk would read
	// as zeros of the right size.
	return f.Sync()
}

// localBlock returns the bytes of block b from memory or the local cache,
// never from the network.
func (m *FS) localBlock(b uint32) ([]byte, error) {
	if d, ok := m.cache.peek(b); ok {
		return d, nil
	}
	blk := m.x.Blocks[b]
	if !m.lc.HasLocal(m.ctx, blk) {
		return nil, fmt.Errorf("block %s: %w", blk.ID, errNotLocal)
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.fetchTimeout)
	defer cancel()
	data, err := m.f.Fetch(ctx, blk)
	if err != nil {
		return nil, err
	}
	if len(data) != int(blk.ULen) || (m.cfg.verify && !blk.ID.Verify(data)) {
		return nil, fmt.Errorf("block %s: %w", blk.ID, ErrCorrupt)
	}
	return data, nil
}
