package lazyfs

import (
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/shoal-project/shoal/flat"
)

// rawFS answers the kernel's FUSE requests for one mount. It is stateless
// towards the kernel: a node ID is the entry's inode number (position in
// the index plus one, hard links resolved), directory handles carry
// nothing, and a file handle only names the reader's readahead state. So a
// process that takes over the connection (Attach) understands every ID the
// kernel already holds, and forgetting them costs nothing.
type rawFS struct {
	fuse.RawFileSystem // ENOSYS for everything a read-only image does not do
	m                  *FS

	srvMu sync.Mutex
	srv   *fuse.Server // set by Init; nil while Attach serves its first request

	// Open file handles. IDs carry a per-process generation in their high
	// half, so that handles a previous process gave the kernel never
	// collide with this one's.
	hmu     sync.Mutex
	handles map[uint64]*openFile
	gen     uint64
	next    uint64
}

// openFile is what a file handle ID stands for.
type openFile struct {
	i      int32         // canonical entry of the regular file
	h      *handle       // block path; nil for a backed handle
	backed *backedHandle // backing file; nil for the block path
}

func newRawFS(m *FS) *rawFS {
	return &rawFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		m:             m,
		handles:       map[uint64]*openFile{},
		gen:           uint64(rand.Uint32()|1) << 32,
	}
}

func (r *rawFS) String() string { return "shoal" }

func (r *rawFS) Init(s *fuse.Server) {
	r.srvMu.Lock()
	r.srv = s
	r.srvMu.Unlock()
}

func (r *rawFS) server() *fuse.Server {
	r.srvMu.Lock()
	defer r.srvMu.Unlock()
	return r.srv
}

// entry maps a node ID to an entry position, or false for an ID this
// image does not have.
func (r *rawFS) entry(nodeID uint64) (int32, bool) {
	if nodeID == 0 || nodeID > uint64(len(r.m.x.Entries)) {
		return 0, false
	}
	return r.m.t.canon[nodeID-1], true
}

func (r *rawFS) fillEntry(c int32, out *fuse.EntryOut) {
	t := r.m.t
	out.NodeId = t.ino(c)
	t.fillAttr(c, &out.Attr)
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
}

func (r *rawFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	d, ok := r.entry(h.NodeId)
	if !ok || r.m.x.Entries[d].Type != flat.TypeDir {
		return fuse.ENOTDIR
	}
	k, ok := r.m.t.lookup(d, name)
	if !ok {
		// Success with node ID 0 is a negative entry the kernel caches.
		out.NodeId = 0
		out.SetEntryTimeout(cacheTimeout)
		return fuse.OK
	}
	r.fillEntry(r.m.t.canon[k], out)
	return fuse.OK
}

func (r *rawFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	i, ok := r.entry(in.NodeId)
	if !ok {
		return fuse.ENOENT
	}
	r.m.t.fillAttr(i, &out.Attr)
	out.SetTimeout(cacheTimeout)
	return fuse.OK
}

func (r *rawFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	i, ok := r.entry(h.NodeId)
	if !ok || r.m.x.Entries[i].Type != flat.TypeSymlink {
		return nil, fuse.EINVAL
	}
	return []byte(r.m.x.Entries[i].Linkname), fuse.OK
}

func (r *rawFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	i, ok := r.entry(h.NodeId)
	if !ok {
		return 0, fuse.ENOENT
	}
	xs := r.m.x.Entries[i].Xattrs
	k, ok := slices.BinarySearchFunc(xs, attr, func(x flat.Xattr, name string) int { return strings.Compare(x.Name, name) })
	if !ok {
		return 0, fuse.ENOATTR
	}
	v := xs[k].Value
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

func (r *rawFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	i, ok := r.entry(h.NodeId)
	if !ok {
		return 0, fuse.ENOENT
	}
	xs := r.m.x.Entries[i].Xattrs
	size := 0
	for _, x := range xs {
		size += len(x.Name) + 1
	}
	if len(dest) < size {
		return uint32(size), fuse.ERANGE
	}
	w := 0
	for _, x := range xs {
		w += copy(dest[w:], x.Name)
		dest[w] = 0
		w++
	}
	return uint32(w), fuse.OK
}

// StatFs describes the image: its content bytes, its entries, nothing free.
func (r *rawFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	const bsize = 4096
	*out = fuse.StatfsOut{
		Blocks:  (r.m.t.imageBytes + bsize - 1) / bsize,
		Files:   uint64(len(r.m.x.Entries)),
		Bsize:   bsize,
		Frsize:  bsize,
		NameLen: flat.MaxNameLen,
	}
	return fuse.OK
}

// OpenDir lets the kernel cache the listing (FOPEN_CACHE_DIR): it cannot
// change while mounted. The handle is empty: a listing's offset is all
// the state it has, and the kernel sends it with every READDIR.
func (r *rawFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	i, ok := r.entry(in.NodeId)
	if !ok || r.m.x.Entries[i].Type != flat.TypeDir {
		return fuse.ENOTDIR
	}
	out.OpenFlags = fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

func (r *rawFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return r.readDir(in, out, false)
}

// ReadDirPlus lists a directory with each child's attributes, so that
// listing then stat-ing a directory (ls -l, find) costs one request per
// page of entries instead of one per entry.
func (r *rawFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return r.readDir(in, out, true)
}

// readDir lists ".", "..", then the children in name order. The offset of
// an entry is its position in that list plus one, so a seek is an
// assignment.
func (r *rawFS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	d, ok := r.entry(in.NodeId)
	if !ok || r.m.x.Entries[d].Type != flat.TypeDir {
		return fuse.ENOTDIR
	}
	t := r.m.t
	kids := t.children(d)
	for pos := in.Offset; ; pos++ {
		var de fuse.DirEntry
		kid := int32(-1)
		switch {
		case pos == 0:
			de = fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: t.ino(d)}
		case pos == 1:
			de = fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: t.ino(t.parent[d])}
		case pos-2 < uint64(len(kids)):
			kid = kids[pos-2]
			de = fuse.DirEntry{Name: t.name(kid), Mode: typeBits(t.x.Entries[t.canon[kid]].Type), Ino: t.ino(kid)}
		default:
			return fuse.OK
		}
		de.Off = pos + 1
		if !plus {
			if !out.AddDirEntry(de) {
				return fuse.OK
			}
			continue
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			return fuse.OK
		}
		// "." and ".." carry no lookup (node ID 0): the kernel skips them.
		if kid >= 0 {
			r.fillEntry(t.canon[kid], eo)
		}
	}
}

// Open hands out a handle that tracks sequential reading, or, for a large
// file materialized in the backing directory, one that hands the kernel the
// backing file (passthrough). It tells the kernel to keep cached pages
// across opens (FOPEN_KEEP_CACHE, dropped for a passthrough open, whose
// reads do not use this file's page cache) and not to send FLUSH on close
// (nothing to flush on a read-only file).
func (r *rawFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	i, ok := r.entry(in.NodeId)
	if !ok {
		return fuse.ENOENT
	}
	if r.m.x.Entries[i].Type != flat.TypeReg {
		return fuse.EINVAL
	}
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return fuse.EROFS
	}
	of := &openFile{i: i}
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH
	if r.m.passthroughCandidate(i) {
		var id int32
		of.h, of.backed, id = r.m.openLarge(i, r.server())
		if id != 0 {
			out.BackingID = id
			out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
			out.OpenFlags &^= fuse.FOPEN_KEEP_CACHE
		}
	} else {
		of.h = newHandle()
	}
	out.Fh = r.addHandle(of)
	return fuse.OK
}

func (r *rawFS) addHandle(of *openFile) uint64 {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	r.next++
	fh := r.gen | r.next&0xffffffff
	r.handles[fh] = of
	return fh
}

// handle returns the open file behind fh. A handle this process did not
// hand out (a previous process did, before Attach) becomes a block-path
// handle on first use: its bytes are the same whichever way they are read.
func (r *rawFS) handle(fh uint64, i int32) *openFile {
	r.hmu.Lock()
	defer r.hmu.Unlock()
	of := r.handles[fh]
	if of == nil || of.i != i {
		of = &openFile{i: i, h: newHandle()}
		r.handles[fh] = of
	}
	return of
}

// Read serves file contents. It ignores cancel on purpose: the kernel
// sends an interrupt when the reading thread gets any signal (Go programs
// get SIGURG all the time), and an EINTR answered to a page fault becomes
// SIGBUS. Reads are bounded by the fetch timeout instead.
func (r *rawFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	i, ok := r.entry(in.NodeId)
	if !ok || r.m.x.Entries[i].Type != flat.TypeReg {
		return nil, fuse.EINVAL
	}
	r.m.holdIfDetached()
	of := r.handle(in.Fh, i)
	var res fuse.ReadResult
	var errno syscall.Errno
	if of.backed != nil && of.backed.fd >= 0 {
		res, errno = r.m.readBacked(of.backed, buf, int64(in.Offset))
	} else {
		res, errno = r.m.read(i, of.h, buf, int64(in.Offset))
	}
	if errno != 0 {
		r.m.holdIfDetached()
	}
	return res, fuse.Status(errno)
}

// Release forgets an open file; closing a large file whose blocks are all
// local is what usually gets it materialized.
func (r *rawFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	r.hmu.Lock()
	of := r.handles[in.Fh]
	delete(r.handles, in.Fh)
	r.hmu.Unlock()
	if of != nil && r.m.mat != nil {
		r.m.release(of, r.server())
	}
}

// Forget needs nothing: node IDs are entry positions, not allocations.
func (r *rawFS) Forget(nodeID, nlookup uint64) {}
