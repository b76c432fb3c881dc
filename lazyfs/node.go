package lazyfs

import (
	"context"
	"slices"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/shoal-project/shoal/flat"
)

// node is what every kind of inode shares: its place in the index and the
// metadata operations, all answered from memory.
type node struct {
	fs.Inode
	m *FS
	i int32 // canonical entry position (a hard link's regular file)
}

type (
	dir     struct{ node }
	file    struct{ node }
	symlink struct{ node }
	special struct{ node } // devices and FIFOs: the kernel serves their I/O
)

var (
	_ fs.NodeGetattrer   = (*node)(nil)
	_ fs.NodeGetxattrer  = (*node)(nil)
	_ fs.NodeListxattrer = (*node)(nil)
	_ fs.NodeStatfser    = (*node)(nil)

	_ fs.NodeLookuper       = (*dir)(nil)
	_ fs.NodeOpendirHandler = (*dir)(nil)
	_ fs.FileReaddirenter   = (*dirHandle)(nil)
	_ fs.FileSeekdirer      = (*dirHandle)(nil)

	_ fs.NodeOpener   = (*file)(nil)
	_ fs.NodeReader   = (*file)(nil)
	_ fs.NodeReleaser = (*file)(nil)

	_ fs.NodeReadlinker = (*symlink)(nil)

	_ fs.InodeEmbedder = (*special)(nil)
)

// newNode makes the inode implementation for canonical entry i.
func (m *FS) newNode(i int32) (fs.InodeEmbedder, uint32) {
	typ := m.x.Entries[i].Type
	switch typ {
	case flat.TypeDir:
		return &dir{node{m: m, i: i}}, typeBits(typ)
	case flat.TypeReg:
		return &file{node{m: m, i: i}}, typeBits(typ)
	case flat.TypeSymlink:
		return &symlink{node{m: m, i: i}}, typeBits(typ)
	}
	return &special{node{m: m, i: i}}, typeBits(typ)
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.t.fillAttr(n.i, &out.Attr)
	return 0
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	xs := n.m.x.Entries[n.i].Xattrs
	k, ok := slices.BinarySearchFunc(xs, attr, func(x flat.Xattr, name string) int { return strings.Compare(x.Name, name) })
	if !ok {
		return 0, syscall.ENODATA
	}
	v := xs[k].Value
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	xs := n.m.x.Entries[n.i].Xattrs
	size := 0
	for _, x := range xs {
		size += len(x.Name) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	w := 0
	for _, x := range xs {
		w += copy(dest[w:], x.Name)
		dest[w] = 0
		w++
	}
	return uint32(w), 0
}

func (d *dir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	t := d.m.t
	k, ok := t.lookup(d.i, name)
	if !ok {
		return nil, syscall.ENOENT
	}
	c := t.canon[k]
	t.fillAttr(c, &out.Attr)
	ops, mode := d.m.newNode(c)
	return d.NewInode(ctx, ops, fs.StableAttr{Mode: mode, Ino: t.ino(c)}), 0
}

// OpendirHandle lets the kernel cache the listing (FOPEN_CACHE_DIR): it
// cannot change while mounted.
func (d *dir) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &dirHandle{t: d.m.t, dir: d.i}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// Statfs describes the image: its content bytes, its entries, nothing free.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	const bsize = 4096
	*out = fuse.StatfsOut{
		Blocks:  (n.m.t.imageBytes + bsize - 1) / bsize,
		Files:   uint64(len(n.m.x.Entries)),
		Bsize:   bsize,
		Frsize:  bsize,
		NameLen: flat.MaxNameLen,
	}
	return 0
}

// dirHandle lists a directory: ".", "..", then the children in name order.
// The offset of an entry is its position in that list plus one, so a seek
// is an assignment.
type dirHandle struct {
	t   *tree
	dir int32
	pos uint64
}

func (h *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	t := h.t
	kids := t.children(h.dir)
	var de fuse.DirEntry
	switch {
	case h.pos == 0:
		de = fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: t.ino(h.dir)}
	case h.pos == 1:
		de = fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: t.ino(t.parent[h.dir])}
	case h.pos-2 < uint64(len(kids)):
		k := kids[h.pos-2]
		de = fuse.DirEntry{Name: t.name(k), Mode: typeBits(t.x.Entries[t.canon[k]].Type), Ino: t.ino(k)}
	default:
		return nil, 0
	}
	h.pos++
	de.Off = h.pos
	return &de, 0
}

func (h *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	h.pos = off
	return 0
}

// Open hands out a handle that tracks sequential reading, or, for a large
// file materialized in the backing directory, one that hands the kernel the
// backing file (passthrough). It tells the kernel to keep cached pages
// across opens (FOPEN_KEEP_CACHE; go-fuse drops it for a passthrough open,
// whose reads do not use this file's page cache) and not to send FLUSH on
// close (nothing to flush on a read-only file).
func (f *file) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	const keep = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_NOFLUSH
	if f.m.passthroughCandidate(f.i) {
		return f.m.openLarge(f.i), keep, 0
	}
	return newHandle(), keep, 0
}

// Read serves file contents. It ignores ctx's cancellation on purpose: the
// kernel sends an interrupt when the reading thread gets any signal (Go
// programs get SIGURG all the time), and an EINTR answered to a page fault
// becomes SIGBUS. Reads are bounded by the fetch timeout instead.
func (f *file) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if b, ok := fh.(*backedHandle); ok {
		return f.m.readBacked(b, dest, off)
	}
	h, _ := fh.(*handle)
	return f.m.read(f.i, h, dest, off)
}

// Release forgets an open file; closing a large file whose blocks are all
// local is what usually gets it materialized.
func (f *file) Release(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	if f.m.mat != nil {
		f.m.release(f.i, fh)
	}
	return 0
}

func (s *symlink) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return []byte(s.m.x.Entries[s.i].Linkname), 0
}
