package flat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// magic starts every encoded index.
var magic = [8]byte{'S', 'H', 'O', 'A', 'L', 'I', 'D', 'X'}

// ErrMalformed is wrapped by every decoding and validation error.
var ErrMalformed = errors.New("malformed flat index")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Encode validates x and returns its binary encoding (uncompressed).
func Encode(x *Index) ([]byte, error) {
	if err := x.Validate(); err != nil {
		return nil, err
	}
	var w writer
	w.b = make([]byte, 0, 64+len(x.Blocks)*48+len(x.Entries)*40)
	w.b = append(w.b, magic[:]...)
	w.uvarint(Version)
	w.str(x.Source)
	w.uvarint(uint64(x.AvgBlockSize))
	w.uvarint(uint64(len(x.Blobs)))
	for _, b := range x.Blobs {
		w.str(b.Digest)
		w.uvarint(b.Size)
	}
	w.uvarint(uint64(len(x.Blocks)))
	for _, b := range x.Blocks {
		w.b = append(w.b, b.ID[:]...)
		w.uvarint(uint64(b.Blob))
		w.uvarint(b.Offset)
		w.uvarint(uint64(b.CLen))
		w.uvarint(uint64(b.ULen))
	}
	w.uvarint(uint64(len(x.Entries)))
	prev := ""
	var prevBlock int64
	for i := range x.Entries {
		e := &x.Entries[i]
		shared := commonPrefix(prev, e.Path)
		w.uvarint(uint64(shared))
		w.str(e.Path[shared:])
		prev = e.Path
		w.b = append(w.b, byte(e.Type))
		w.uvarint(uint64(e.Mode))
		w.uvarint(uint64(e.UID))
		w.uvarint(uint64(e.GID))
		w.varint(e.MtimeSec)
		w.uvarint(uint64(e.MtimeNs))
		switch e.Type {
		case TypeReg:
			w.uvarint(e.Size)
			w.uvarint(uint64(len(e.Extents)))
			for _, ex := range e.Extents {
				w.varint(int64(ex.Block) - prevBlock)
				prevBlock = int64(ex.Block)
				w.uvarint(uint64(ex.Offset))
				w.uvarint(uint64(ex.Length))
			}
		case TypeSymlink, TypeHardlink:
			w.str(e.Linkname)
		case TypeChar, TypeBlock:
			w.uvarint(uint64(e.DevMajor))
			w.uvarint(uint64(e.DevMinor))
		}
		w.uvarint(uint64(len(e.Xattrs)))
		for _, xa := range e.Xattrs {
			w.str(xa.Name)
			w.str(string(xa.Value))
		}
	}
	w.b = binary.LittleEndian.AppendUint32(w.b, crc32.Checksum(w.b, castagnoli))
	return w.b, nil
}

var (
	encOnce sync.Once
	encoder *zstd.Encoder
)

func indexEncoder() *zstd.Encoder {
	encOnce.Do(func() {
		var err error
		encoder, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
		if err != nil {
			panic(fmt.Sprintf("flat: zstd encoder: %v", err))
		}
	})
	return encoder
}

// EncodeBlob returns the index as stored in the registry: Encode, then zstd.
func EncodeBlob(x *Index) ([]byte, error) {
	raw, err := Encode(x)
	if err != nil {
		return nil, err
	}
	return indexEncoder().EncodeAll(raw, nil), nil
}

// DecodeBlob decompresses and decodes an index blob, within the limits
// of limits.go: what it allocates grows with the bytes it has decoded, and
// its bytes bound how far it may inflate.
func DecodeBlob(blob []byte) (*Index, error) {
	raw, err := decompress(blob)
	if err != nil {
		return nil, err
	}
	return Decode(raw)
}

// ReadBlob reads and decodes an index blob from r, reading at most
// MaxIndexSize compressed bytes.
func ReadBlob(r io.Reader) (*Index, error) {
	blob, err := io.ReadAll(io.LimitReader(r, MaxIndexSize+1))
	if err != nil {
		return nil, fmt.Errorf("read flat index: %w", err)
	}
	return DecodeBlob(blob)
}

// Decode parses an encoded index and validates it completely. It
// allocates as it parses, never ahead of the records it has read, and
// refuses an index whose decoded size (DecodedSize) would pass
// MaxDecodedSize or MaxDecodedRatio times len(b) plus 64 KiB.
func Decode(b []byte) (*Index, error) {
	if len(b) > MaxIndexSize {
		return nil, fmt.Errorf("%w: index of %d bytes (limit %d)", ErrMalformed, len(b), MaxIndexSize)
	}
	if len(b) < len(magic)+4 || !bytes.Equal(b[:len(magic)], magic[:]) {
		return nil, fmt.Errorf("%w: not a flat index (bad magic)", ErrMalformed)
	}
	// The version comes first so that a newer index is reported as such,
	// whatever else a later version changes.
	if v, n := binary.Uvarint(b[len(magic):]); n <= 0 || v != Version {
		return nil, fmt.Errorf("%w: unsupported version %d (this build reads %d)", ErrMalformed, v, Version)
	}
	body := b[:len(b)-4]
	if got, want := crc32.Checksum(body, castagnoli), binary.LittleEndian.Uint32(b[len(b)-4:]); got != want {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrMalformed)
	}
	r := reader{b: body, off: len(magic), budget: decodedLimit(len(b)), raw: len(b)}
	x := &Index{}
	r.uvarint("version")
	x.Source = r.str("source", MaxSourceLen)
	x.AvgBlockSize = r.u32("average block size")

	// Tables grow as their records are parsed, never ahead of them: a
	// count is only a claim until its records are there.
	n := r.count("blobs", 2)
	x.Blobs = make([]Blob, 0, min(n, firstChunk))
	for i := 0; i < n && r.err == nil; i++ {
		var bl Blob
		bl.Digest = r.str("blob digest", 128)
		bl.Size = r.uvarint("blob size")
		r.charge(costBlob + len(bl.Digest))
		x.Blobs = appendUpTo(x.Blobs, n, bl)
	}
	n = r.count("blocks", 32+4)
	x.Blocks = make([]Block, 0, min(n, firstChunk))
	for i := 0; i < n && r.err == nil; i++ {
		var bl Block
		copy(bl.ID[:], r.bytes("block id", 32))
		bl.Blob = r.u32("block blob")
		bl.Offset = r.uvarint("block offset")
		bl.CLen = r.u32("block compressed length")
		bl.ULen = r.u32("block length")
		r.charge(costBlock)
		x.Blocks = appendUpTo(x.Blocks, n, bl)
	}
	n = r.count("entries", 9)
	x.Entries = make([]Entry, 0, min(n, firstChunk))
	prev := ""
	var prevBlock int64
	var pathBuf []byte
	var slab []Extent
	for i := 0; i < n && r.err == nil; i++ {
		var e Entry
		shared := r.uvarint("path prefix")
		suffix := r.rawStr("path", MaxPathLen)
		if r.err != nil {
			break
		}
		if shared > uint64(len(prev)) {
			r.fail("entry %d: path prefix %d longer than previous path", i, shared)
			break
		}
		// Checked here, not only in Validate: a path may share all of the
		// previous one, so unchecked paths grow without bound.
		if l := int(shared) + len(suffix); l > MaxPathLen {
			r.fail("entry %d: path of %d bytes (limit %d)", i, l, MaxPathLen)
			break
		}
		if r.charge(costEntry + int(shared) + len(suffix)); r.err != nil {
			break
		}
		pathBuf = append(append(pathBuf[:0], prev[:shared]...), suffix...)
		e.Path = string(pathBuf)
		prev = e.Path
		e.Type = Type(r.byte("type"))
		e.Mode = r.u32("mode")
		e.UID = r.u32("uid")
		e.GID = r.u32("gid")
		e.MtimeSec = r.varint("mtime")
		e.MtimeNs = r.u32("mtime ns")
		switch e.Type {
		case TypeReg:
			e.Size = r.uvarint("size")
			ne := r.count("extents", 3)
			switch {
			case ne > slabSize:
				// A file of many extents gets its own slice, grown as
				// they are read.
				e.Extents = make([]Extent, 0, slabSize)
			case ne > 0:
				// The extents of small files share slabs: one
				// allocation per thousands of files instead of one per
				// file.
				if len(slab)+ne > cap(slab) {
					slab = make([]Extent, 0, slabSize)
				}
				e.Extents = slab[len(slab) : len(slab) : len(slab)+ne]
			}
			for j := 0; j < ne && r.err == nil; j++ {
				d := r.varint("extent block")
				blk := prevBlock + d
				if d > math.MaxUint32 || d < -math.MaxUint32 || blk < 0 || blk > math.MaxUint32 {
					r.fail("entry %q: extent block out of range", shortPath(e.Path))
					break
				}
				prevBlock = blk
				r.charge(costExtent)
				e.Extents = appendUpTo(e.Extents, ne, Extent{Block: uint32(blk), Offset: r.u32("extent offset"), Length: r.u32("extent length")})
			}
			if ne > 0 && ne <= slabSize {
				slab = slab[:len(slab)+len(e.Extents)]
			}
		case TypeSymlink, TypeHardlink:
			e.Linkname = r.str("link target", MaxLinkLen)
			r.charge(len(e.Linkname))
		case TypeChar, TypeBlock:
			e.DevMajor = r.u32("device major")
			e.DevMinor = r.u32("device minor")
		}
		nx := r.count("xattrs", 2)
		if nx > MaxXattrs {
			r.fail("entry %q: %d xattrs (limit %d)", shortPath(e.Path), nx, MaxXattrs)
			break
		}
		if nx > 0 {
			e.Xattrs = make([]Xattr, 0, nx)
		}
		for j := 0; j < nx && r.err == nil; j++ {
			var xa Xattr
			xa.Name = r.str("xattr name", MaxNameLen)
			xa.Value = []byte(r.str("xattr value", MaxXattrLen))
			r.charge(costXattr + len(xa.Name) + len(xa.Value))
			e.Xattrs = append(e.Xattrs, xa)
		}
		x.Entries = appendUpTo(x.Entries, n, e)
	}
	if r.err != nil {
		return nil, r.err
	}
	if r.off != len(r.b) {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(r.b)-r.off)
	}
	if err := x.Validate(); err != nil {
		return nil, err
	}
	return x, nil
}

// firstChunk is the capacity a table starts with; slabSize the extents
// one slab holds.
const (
	firstChunk = 64
	slabSize   = 8192
)

// appendUpTo appends v to s, a slice that will hold at most n elements:
// its capacity doubles as elements arrive, never past n.
func appendUpTo[T any](s []T, n int, v T) []T {
	if len(s) == cap(s) {
		g := make([]T, len(s), min(n, max(2*cap(s), firstChunk)))
		copy(g, s)
		s = g
	}
	return append(s, v)
}

// Validate checks the invariants every index must hold: table references in
// range, extents inside their blocks and summing to the file size, paths
// clean and sorted, every parent present and a directory, hard links naming
// an earlier regular file.
func (x *Index) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
	}
	if len(x.Source) > MaxSourceLen {
		return bad("source of %d bytes", len(x.Source))
	}
	for i, b := range x.Blobs {
		if !validDigest(b.Digest) {
			return bad("blob %d: bad digest %q", i, b.Digest)
		}
	}
	for i, b := range x.Blocks {
		if int(b.Blob) >= len(x.Blobs) {
			return bad("block %d: blob %d out of range", i, b.Blob)
		}
		if b.CLen == 0 || b.ULen == 0 || b.ULen > MaxBlockSize || uint64(b.CLen) > compressBound(b.ULen) {
			return bad("block %d: bad length (compressed %d, uncompressed %d)", i, b.CLen, b.ULen)
		}
		if end := b.Offset + uint64(b.CLen); end < b.Offset || end > x.Blobs[b.Blob].Size {
			return bad("block %d: bytes %d+%d outside blob of %d bytes", i, b.Offset, b.CLen, x.Blobs[b.Blob].Size)
		}
	}
	if i, dup := duplicateBlock(x.Blocks); dup {
		return bad("block %d: duplicate id %s", i, x.Blocks[i].ID)
	}
	if len(x.Entries) == 0 || x.Entries[0].Path != "" || x.Entries[0].Type != TypeDir {
		return bad("the first entry must be the root directory")
	}
	dirs := make([]string, 0, 32) // the ancestors of the current entry
	for i := range x.Entries {
		e := &x.Entries[i]
		if i > 0 {
			if err := checkPath(e.Path); err != nil {
				return bad("entry %d: %v", i, err)
			}
			if ComparePaths(x.Entries[i-1].Path, e.Path) >= 0 {
				return bad("entry %q: out of order or duplicate", shortPath(e.Path))
			}
			parent := ParentPath(e.Path)
			for len(dirs) > 0 && dirs[len(dirs)-1] != parent {
				dirs = dirs[:len(dirs)-1]
			}
			if len(dirs) == 0 {
				return bad("entry %q: parent directory missing", shortPath(e.Path))
			}
		}
		if e.Mode&^0o7777 != 0 {
			return bad("entry %q: mode %o has bits outside 07777", shortPath(e.Path), e.Mode)
		}
		if e.MtimeNs >= 1e9 {
			return bad("entry %q: mtime nanoseconds %d", shortPath(e.Path), e.MtimeNs)
		}
		if e.Type != TypeReg && (e.Size != 0 || len(e.Extents) != 0) {
			return bad("entry %q: %s with contents", shortPath(e.Path), e.Type)
		}
		if e.Type != TypeSymlink && e.Type != TypeHardlink && e.Linkname != "" {
			return bad("entry %q: %s with a link target", shortPath(e.Path), e.Type)
		}
		if e.Type != TypeChar && e.Type != TypeBlock && (e.DevMajor != 0 || e.DevMinor != 0) {
			return bad("entry %q: %s with device numbers", shortPath(e.Path), e.Type)
		}
		switch e.Type {
		case TypeDir:
			dirs = append(dirs, e.Path)
		case TypeReg:
			var sum uint64
			for _, ex := range e.Extents {
				if int(ex.Block) >= len(x.Blocks) {
					return bad("entry %q: block %d out of range", shortPath(e.Path), ex.Block)
				}
				if ex.Length == 0 || uint64(ex.Offset)+uint64(ex.Length) > uint64(x.Blocks[ex.Block].ULen) {
					return bad("entry %q: extent %d+%d outside block of %d bytes", shortPath(e.Path), ex.Offset, ex.Length, x.Blocks[ex.Block].ULen)
				}
				sum += uint64(ex.Length)
			}
			if sum != e.Size {
				return bad("entry %q: extents hold %d bytes, size is %d", shortPath(e.Path), sum, e.Size)
			}
		case TypeSymlink:
			if e.Linkname == "" || len(e.Linkname) > MaxLinkLen || strings.IndexByte(e.Linkname, 0) >= 0 {
				return bad("entry %q: bad symlink target", shortPath(e.Path))
			}
		case TypeHardlink:
			// A hard link is only a name: the inode's metadata lives on its target.
			if e.Mode != 0 || e.UID != 0 || e.GID != 0 || e.MtimeSec != 0 || e.MtimeNs != 0 || len(e.Xattrs) != 0 {
				return bad("entry %q: hard link with metadata of its own", shortPath(e.Path))
			}
			if err := checkPath(e.Linkname); err != nil {
				return bad("entry %q: hard link target: %v", shortPath(e.Path), err)
			}
			j, ok := x.lookupBefore(i, e.Linkname)
			if !ok || x.Entries[j].Type != TypeReg {
				return bad("entry %q: hard link target %q is not an earlier regular file", shortPath(e.Path), e.Linkname)
			}
		case TypeChar, TypeBlock, TypeFIFO:
		default:
			return bad("entry %q: unknown type %d", shortPath(e.Path), e.Type)
		}
		if len(e.Xattrs) > MaxXattrs {
			return bad("entry %q: %d xattrs", shortPath(e.Path), len(e.Xattrs))
		}
		for j, xa := range e.Xattrs {
			if xa.Name == "" || len(xa.Name) > MaxNameLen || strings.IndexByte(xa.Name, 0) >= 0 || len(xa.Value) > MaxXattrLen {
				return bad("entry %q: bad xattr %q", shortPath(e.Path), xa.Name)
			}
			if j > 0 && e.Xattrs[j-1].Name >= xa.Name {
				return bad("entry %q: xattrs out of order or duplicate", shortPath(e.Path))
			}
		}
	}
	return nil
}

func (x *Index) lookupBefore(end int, path string) (int, bool) {
	lo, hi := 0, end
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if ComparePaths(x.Entries[m].Path, path) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < end && x.Entries[lo].Path == path
}

// checkPath accepts a clean, relative, non-empty path.
func checkPath(p string) error {
	if p == "" || len(p) > MaxPathLen {
		return fmt.Errorf("path length %d", len(p))
	}
	if strings.IndexByte(p, 0) >= 0 {
		return errors.New("NUL in path")
	}
	for c := range strings.SplitSeq(p, "/") {
		switch {
		case c == "" || c == "." || c == "..":
			return fmt.Errorf("path %q is not clean and relative", shortPath(p))
		case len(c) > MaxNameLen:
			return fmt.Errorf("name longer than %d bytes in %q", MaxNameLen, shortPath(p))
		}
	}
	return nil
}

func validDigest(d string) bool {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(h) != 64 {
		return false
	}
	for _, c := range h {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func commonPrefix(a, b string) int {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

type writer struct{ b []byte }

func (w *writer) uvarint(v uint64) { w.b = binary.AppendUvarint(w.b, v) }
func (w *writer) varint(v int64)   { w.b = binary.AppendVarint(w.b, v) }
func (w *writer) str(s string) {
	w.uvarint(uint64(len(s)))
	w.b = append(w.b, s...)
}

// reader decodes with sticky errors: after the first failure every call
// returns zero values, so callers check r.err once per loop.
type reader struct {
	b      []byte
	off    int
	err    error
	raw    int   // bytes of the encoded index, CRC included
	used   int64 // decoded size so far (costs in limits.go)
	budget int64 // the most used may reach
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: at byte %d: %s", ErrMalformed, r.off, fmt.Sprintf(format, args...))
	}
}

func (r *reader) uvarint(what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b[r.off:])
	if n <= 0 {
		r.fail("bad %s", what)
		return 0
	}
	r.off += n
	return v
}

func (r *reader) varint(what string) int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b[r.off:])
	if n <= 0 {
		r.fail("bad %s", what)
		return 0
	}
	r.off += n
	return v
}

func (r *reader) u32(what string) uint32 {
	v := r.uvarint(what)
	if v > math.MaxUint32 {
		r.fail("%s %d out of range", what, v)
		return 0
	}
	return uint32(v)
}

func (r *reader) byte(what string) byte {
	if r.err != nil {
		return 0
	}
	if r.off >= len(r.b) {
		r.fail("truncated at %s", what)
		return 0
	}
	r.off++
	return r.b[r.off-1]
}

func (r *reader) bytes(what string, n int) []byte {
	if r.err != nil {
		return make([]byte, n)
	}
	if len(r.b)-r.off < n {
		r.fail("truncated at %s", what)
		return make([]byte, n)
	}
	r.off += n
	return r.b[r.off-n : r.off]
}

func (r *reader) str(what string, limit int) string { return string(r.rawStr(what, limit)) }

// rawStr returns a length-prefixed byte string without copying it.
func (r *reader) rawStr(what string, limit int) []byte {
	n := r.uvarint(what)
	if r.err != nil {
		return nil
	}
	if n > uint64(limit) {
		r.fail("%s of %d bytes (limit %d)", what, n, limit)
		return nil
	}
	return r.bytes(what, int(n))
}

// count reads an element count and rejects one that the remaining bytes
// cannot hold (each element takes at least minSize bytes), so a few hostile
// bytes can never make the decoder allocate gigabytes.
func (r *reader) count(what string, minSize int) int {
	n := r.uvarint(what)
	if r.err != nil {
		return 0
	}
	if n > uint64((len(r.b)-r.off)/minSize) {
		r.fail("%d %s cannot fit in %d bytes", n, what, len(r.b)-r.off)
		return 0
	}
	return int(n)
}
