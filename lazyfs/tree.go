package lazyfs

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/shoal-project/shoal/flat"
)

// tree is what the mount derives from the index once, at mount time, so that
// no FUSE operation walks the index: children lists, link counts, and for
// every regular file the file offset at which each of its extents starts.
// Everything is stored in a few flat arrays indexed by entry position (prefix
// offsets into shared backing slices), not one object per entry, so a tree of
// a million entries costs tens of megabytes, not hundreds.
type tree struct {
	x *flat.Index

	canon  []int32  // hard link → position of its regular file; itself otherwise
	parent []int32  // parent directory; the root's is itself
	nlink  []uint32 // directories: 2 + subdirectories; files: 1 + hard links to them

	// The children of directory i are kids[kidOff[i]:kidOff[i+1]], in name
	// order (the index sorts siblings by name).
	kidOff []uint32
	kids   []int32

	// The extents of regular file i start at file offsets
	// starts[extOff[i]:extOff[i+1]] (one per extent, ascending).
	extOff []uint32
	starts []uint64

	imageBytes uint64 // contents of all regular files, hard links once
}

func newTree(x *flat.Index) (*tree, error) {
	n := len(x.Entries)
	if n == 0 || n > math.MaxInt32 {
		return nil, fmt.Errorf("index with %d entries", n)
	}
	t := &tree{
		x:      x,
		canon:  make([]int32, n),
		parent: make([]int32, n),
		nlink:  make([]uint32, n),
		kidOff: make([]uint32, n+1),
		extOff: make([]uint32, n+1),
	}
	var nExt uint64
	for i := range x.Entries {
		nExt += uint64(len(x.Entries[i].Extents))
	}
	if nExt > math.MaxUint32 {
		return nil, fmt.Errorf("index with %d extents", nExt)
	}
	t.starts = make([]uint64, 0, nExt)

	// One pass in index order. The index lists a directory's subtree right
	// after it, so the ancestors of the current entry are a stack.
	stack := make([]int32, 0, 32)
	for i := range x.Entries {
		e := &x.Entries[i]
		t.canon[i] = int32(i)
		t.nlink[i] = 1
		if i > 0 {
			parent := flat.ParentPath(e.Path)
			for len(stack) > 0 && x.Entries[stack[len(stack)-1]].Path != parent {
				stack = stack[:len(stack)-1]
			}
			if len(stack) == 0 {
				return nil, fmt.Errorf("entry %q: parent directory missing", e.Path)
			}
			p := stack[len(stack)-1]
			t.parent[i] = p
			t.kidOff[p+1]++ // counts for now; prefix sums below
		}
		switch e.Type {
		case flat.TypeDir:
			t.nlink[i] = 2
			if i > 0 {
				t.nlink[t.parent[i]]++
			}
			stack = append(stack, int32(i))
		case flat.TypeHardlink:
			j, ok := x.Lookup(e.Linkname)
			if !ok || j >= i || x.Entries[j].Type != flat.TypeReg {
				return nil, fmt.Errorf("entry %q: hard link target %q is not an earlier regular file", e.Path, e.Linkname)
			}
			t.canon[i] = int32(j)
			t.nlink[j]++
		case flat.TypeReg:
			t.imageBytes += e.Size
			var off uint64
			for _, ex := range e.Extents {
				t.starts = append(t.starts, off)
				off += uint64(ex.Length)
			}
		}
		t.extOff[i+1] = uint32(len(t.starts))
	}
	for i := 1; i <= n; i++ {
		t.kidOff[i] += t.kidOff[i-1]
	}
	t.kids = make([]int32, t.kidOff[n])
	fill := slices.Clone(t.kidOff[:n])
	for i := 1; i < n; i++ {
		p := t.parent[i]
		t.kids[fill[p]] = int32(i)
		fill[p]++
	}
	return t, nil
}

func (t *tree) children(dir int32) []int32 { return t.kids[t.kidOff[dir]:t.kidOff[dir+1]] }

// extentStarts returns the file offset of each extent of regular file i.
func (t *tree) extentStarts(i int32) []uint64 { return t.starts[t.extOff[i]:t.extOff[i+1]] }

// name is the last component of entry i's path.
func (t *tree) name(i int32) string {
	p := t.x.Entries[i].Path
	return p[strings.LastIndexByte(p, '/')+1:]
}

// lookup finds the child called name in directory dir.
func (t *tree) lookup(dir int32, name string) (int32, bool) {
	kids := t.children(dir)
	k, ok := slices.BinarySearchFunc(kids, name, func(c int32, name string) int {
		return strings.Compare(t.name(c), name)
	})
	if !ok {
		return 0, false
	}
	return kids[k], true
}

// ino is the inode number of entry i: its canonical position plus one, so the
// root is 1 and both names of a hard link have the same number. The numbers
// are stable across mounts of the same index.
func (t *tree) ino(i int32) uint64 { return uint64(t.canon[i]) + 1 }

// typeBits maps an entry type to the S_IFMT bits of a mode.
func typeBits(typ flat.Type) uint32 {
	switch typ {
	case flat.TypeDir:
		return syscall.S_IFDIR
	case flat.TypeReg, flat.TypeHardlink:
		return syscall.S_IFREG
	case flat.TypeSymlink:
		return syscall.S_IFLNK
	case flat.TypeChar:
		return syscall.S_IFCHR
	case flat.TypeBlock:
		return syscall.S_IFBLK
	case flat.TypeFIFO:
		return syscall.S_IFIFO
	}
	return 0
}

// statBlockSize is the st_blksize reported for every file. Programs size
// their I/O buffers from it (stdio, cp), so a larger value than the usual
// 4 KiB means fewer, larger reads through FUSE.
const statBlockSize = 128 << 10

// fillAttr writes the attributes of entry i (hard links resolved).
func (t *tree) fillAttr(i int32, a *fuse.Attr) {
	c := t.canon[i]
	e := &t.x.Entries[c]
	a.Ino = uint64(c) + 1
	a.Mode = typeBits(e.Type) | e.Mode
	a.Nlink = t.nlink[c]
	a.Owner = fuse.Owner{Uid: e.UID, Gid: e.GID}
	switch e.Type {
	case flat.TypeReg:
		a.Size = e.Size
	case flat.TypeSymlink:
		a.Size = uint64(len(e.Linkname))
	case flat.TypeDir:
		a.Size = 4096
	case flat.TypeChar, flat.TypeBlock:
		a.Rdev = mkdev(e.DevMajor, e.DevMinor)
	}
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = statBlockSize
	// Negative times (before 1970) travel as two's complement; the kernel
	// reads them back as signed.
	sec, nsec := uint64(e.MtimeSec), e.MtimeNs
	a.Mtime, a.Mtimensec = sec, nsec
	a.Atime, a.Atimensec = sec, nsec
	a.Ctime, a.Ctimensec = sec, nsec
}

// mkdev encodes a device number the way the kernel's new_decode_dev reads
// the 32-bit rdev of a FUSE attribute (12 bits of major, 20 of minor).
func mkdev(major, minor uint32) uint32 {
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12
}
