package flat

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// Version is the index format version this package writes and reads.
const Version = 1

// Media types and annotations of a flat image in a registry.
const (
	// MediaTypeIndex is the index layer: the encoded index, zstd-compressed.
	MediaTypeIndex = "application/vnd.shoal.flat.index.v1+zstd"
	// MediaTypeBlocks is a data layer: zstd-compressed blocks back to back.
	MediaTypeBlocks = "application/vnd.shoal.flat.blocks.v1"
	// MediaTypeConfig is the config blob of a flat image manifest.
	MediaTypeConfig = "application/vnd.shoal.flat.config.v1+json"
	// ArtifactType marks a flat image manifest.
	ArtifactType = "application/vnd.shoal.flat.v1"

	// AnnotationSource is the digest of the source image manifest.
	AnnotationSource = "dev.shoal.source.digest"
	// AnnotationFormat is the flat format version, as a decimal string.
	AnnotationFormat = "dev.shoal.format.version"
	// AnnotationAccessSalt is AccessSalt of the index blob, in hex. It
	// makes the manifest's bytes depend on the index's content, which the
	// manifest's digests do not reveal: a private image's proof of access
	// rests on holding those bytes (p2p.PrivateImage).
	AnnotationAccessSalt = "dev.shoal.access.salt"
	// TagSuffix is appended to a source tag to name its flat form.
	TagSuffix = "-shoal"
)

// Type is the kind of a tree entry.
type Type uint8

// Entry types. The values are part of the encoding.
const (
	TypeDir Type = iota + 1
	TypeReg
	TypeSymlink
	TypeHardlink // a second name for the regular file at Linkname
	TypeChar
	TypeBlock
	TypeFIFO
)

func (t Type) String() string {
	switch t {
	case TypeDir:
		return "dir"
	case TypeReg:
		return "file"
	case TypeSymlink:
		return "symlink"
	case TypeHardlink:
		return "hardlink"
	case TypeChar:
		return "char"
	case TypeBlock:
		return "block"
	case TypeFIFO:
		return "fifo"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Xattr is one extended attribute.
type Xattr struct {
	Name  string
	Value []byte
}

// Extent is a run of a file's bytes stored in one block.
type Extent struct {
	Block  uint32 // index into Index.Blocks
	Offset uint32 // offset in the block's uncompressed bytes
	Length uint32
}

// Entry is one node of the tree. Paths are relative, slash-separated and
// clean ("usr/bin/python3"); the root is the empty path.
type Entry struct {
	Path     string
	Type     Type
	Mode     uint32 // permission and setuid/setgid/sticky bits (07777)
	UID, GID uint32
	MtimeSec int64
	MtimeNs  uint32
	Size     uint64 // regular files only
	Linkname string // symlink target, or the hard link's target path
	DevMajor uint32 // char and block devices
	DevMinor uint32
	Xattrs   []Xattr // sorted by Name
	Extents  []Extent
}

// Block is one row of the block table.
type Block struct {
	ID     BlockID
	Blob   uint32 // index into Index.Blobs
	Offset uint64 // offset of the compressed block in its blob
	CLen   uint32 // compressed length
	ULen   uint32 // uncompressed length
}

// Blob is a data blob of the flat image, by its registry digest.
type Blob struct {
	Digest string // "sha256:<hex>"
	Size   uint64
}

// Index is a decoded flat image index.
type Index struct {
	Source       string // source image manifest digest
	AvgBlockSize uint32 // chunker target, informational
	Blobs        []Blob
	Blocks       []Block
	Entries      []Entry // sorted with ComparePaths; Entries[0] is the root
}

// Limits applied by the decoder and the converter.
const (
	MaxBlockSize = 16 << 20 // uncompressed bytes in one block
	MaxPathLen   = 4096
	MaxNameLen   = 255
	MaxLinkLen   = 4096
	MaxXattrs    = 256
	MaxXattrLen  = 64 << 10
	MaxSourceLen = 1024
)

// ComparePaths orders paths component by component, so that a directory's
// subtree is contiguous and follows the directory itself.
func ComparePaths(a, b string) int {
	for {
		ai := strings.IndexByte(a, '/')
		bi := strings.IndexByte(b, '/')
		ac, bc := a, b
		if ai >= 0 {
			ac = a[:ai]
		}
		if bi >= 0 {
			bc = b[:bi]
		}
		if c := strings.Compare(ac, bc); c != 0 {
			return c
		}
		switch {
		case ai < 0 && bi < 0:
			return 0
		case ai < 0:
			return -1
		case bi < 0:
			return 1
		}
		a, b = a[ai+1:], b[bi+1:]
	}
}

// ParentPath returns the parent directory of p ("" for top-level names).
func ParentPath(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// Lookup returns the position of path in x.Entries.
func (x *Index) Lookup(path string) (int, bool) {
	return slices.BinarySearchFunc(x.Entries, path, func(e Entry, p string) int {
		return ComparePaths(e.Path, p)
	})
}

// Children returns the positions of the direct children of the directory at
// position dir, in order.
func (x *Index) Children(dir int) []int {
	var out []int
	base := x.Entries[dir].Path
	for i := dir + 1; i < len(x.Entries); {
		p := x.Entries[i].Path
		if !isUnder(p, base) {
			break
		}
		out = append(out, i)
		i = x.subtreeEnd(i)
	}
	return out
}

// subtreeEnd returns the position after the subtree rooted at position i.
func (x *Index) subtreeEnd(i int) int {
	base := x.Entries[i].Path
	if x.Entries[i].Type != TypeDir {
		return i + 1
	}
	j := i + 1
	for j < len(x.Entries) && isUnder(x.Entries[j].Path, base) {
		j++
	}
	return j
}

func isUnder(p, dir string) bool {
	if dir == "" {
		return p != ""
	}
	return len(p) > len(dir) && p[len(dir)] == '/' && p[:len(dir)] == dir
}

// ImageBytes returns the uncompressed size of all regular file contents
// (hard links counted once).
func (x *Index) ImageBytes() uint64 {
	var n uint64
	for i := range x.Entries {
		if x.Entries[i].Type == TypeReg {
			n += x.Entries[i].Size
		}
	}
	return n
}

// Resolve follows a hard link to the regular file it names.
func (x *Index) Resolve(i int) int {
	if x.Entries[i].Type != TypeHardlink {
		return i
	}
	j, ok := x.Lookup(x.Entries[i].Linkname)
	if !ok {
		return i // Validate guarantees this cannot happen for decoded indexes.
	}
	return j
}

// AccessSalt is the value of AnnotationAccessSalt for an index blob: an
// HMAC-SHA256 of the blob under a fixed label, deterministic (the same
// source gives the same manifest anywhere) but not computable from any
// digest the manifest or the index names.
func AccessSalt(indexBlob []byte) string {
	m := hmac.New(sha256.New, []byte("shoal/access-salt/v1"))
	m.Write(indexBlob)
	return hex.EncodeToString(m.Sum(nil))
}
