package flat

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/klauspost/compress/zstd"
)

// Limits on what an index blob may cost the process that decodes it. An
// index comes from a registry, or from peers, as part of an image that
// anyone who can push one may have written, so each limit holds whatever
// its header fields claim. docs/flat-format.md §3.4 and §3.5 state them as
// part of the format.
const (
	// MaxIndexSize bounds an index blob, compressed and decompressed.
	// The Debian test image's index is 264 KB decompressed, the big
	// test image's (Debian and two toolchains, 24,000 entries) 836 KB.
	MaxIndexSize = 32 << 20
	// MaxIndexRatio bounds how far an index blob inflates: to at most
	// MaxIndexRatio times its size plus 64 KiB. Real indexes inflate about
	// 2.2 times at the default block size (1.1 at 4 KiB blocks: block IDs
	// do not compress), and only an index made to compress, such as one
	// of empty files, comes near 20.
	MaxIndexRatio = 64
	// MaxDecodedSize bounds an index's decoded size (DecodedSize), which
	// stands for the memory its Index takes: about 550,000 entries of
	// real images.
	MaxDecodedSize = 128 << 20
	// MaxDecodedRatio bounds the decoded size by the decompressed size:
	// at most MaxDecodedRatio times it plus 64 KiB. Real indexes decode
	// to 5 or 6 times their size (2.4 at 4 KiB blocks); a path may share all but a byte with
	// the one before it, so eleven bytes of index can stand for a
	// 4,096-byte path.
	MaxDecodedRatio = 64

	// limitSlack is what even the smallest index may take.
	limitSlack = 64 << 10
)

// The decoded size of each kind of record, plus its strings' bytes: about
// what the record takes in memory (an Entry is 128 bytes on 64-bit
// platforms, a Block 56, an Extent 12, a Blob or an Xattr 24 or 40 plus
// its strings). Fixed numbers, not unsafe.Sizeof, so that an index decodes
// or not alike on every platform.
const (
	costBlob   = 32  // + digest
	costBlock  = 64  //
	costEntry  = 128 // + path + link target
	costExtent = 16  //
	costXattr  = 48  // + name + value
)

// inflateLimit is the most a blob of n bytes may decompress to.
func inflateLimit(n int) int {
	return min(MaxIndexSize, MaxIndexRatio*n+limitSlack)
}

// decodedLimit is the most an encoded index of n bytes may decode to.
func decodedLimit(n int) int64 {
	return min(MaxDecodedSize, int64(MaxDecodedRatio)*int64(n)+limitSlack)
}

// DecodedSize returns x's decoded size, as Decode counts it against
// MaxDecodedSize and MaxDecodedRatio.
func (x *Index) DecodedSize() int64 {
	n := int64(costBlock) * int64(len(x.Blocks))
	for _, b := range x.Blobs {
		n += int64(costBlob + len(b.Digest))
	}
	for i := range x.Entries {
		e := &x.Entries[i]
		n += int64(costEntry + len(e.Path) + len(e.Linkname) + costExtent*len(e.Extents))
		for _, xa := range e.Xattrs {
			n += int64(costXattr + len(xa.Name) + len(xa.Value))
		}
	}
	return n
}

// charge counts n bytes of decoded size, and fails once they pass the
// budget: before what they stand for is allocated, where the caller can.
func (r *reader) charge(n int) {
	if r.err != nil {
		return
	}
	r.used += int64(n)
	if r.used > r.budget {
		r.fail("the index takes more than %d bytes in memory (limit: %d times its %d bytes plus 64 KiB, at most %d)",
			r.budget, MaxDecodedRatio, r.raw, MaxDecodedSize)
	}
}

// decompress inflates an index blob, no further than inflateLimit allows
// for its size. A frame header that claims more is refused before
// anything is decoded, and the output grows with what the frames hold,
// never ahead of it by more than the (bounded) size a header claims.
func decompress(blob []byte) ([]byte, error) {
	if len(blob) > MaxIndexSize {
		return nil, fmt.Errorf("%w: index blob of %d bytes (limit %d)", ErrMalformed, len(blob), MaxIndexSize)
	}
	limit := inflateLimit(len(blob))
	rule := fmt.Sprintf("an index blob may inflate to %d times its size plus 64 KiB, at most %d bytes", MaxIndexRatio, MaxIndexSize)
	var h zstd.Header
	if h.Decode(blob) == nil && h.HasFCS && h.FrameContentSize > uint64(limit) {
		return nil, fmt.Errorf("%w: index blob of %d bytes claims %d decompressed bytes (%s)", ErrMalformed, len(blob), h.FrameContentSize, rule)
	}
	// A decoder per call: its size limit is this blob's. It costs a few
	// kilobytes, next to the index it decodes.
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(limit)))
	if err != nil {
		return nil, fmt.Errorf("flat: zstd decoder: %w", err)
	}
	defer d.Close()
	raw, err := d.DecodeAll(blob, nil)
	switch {
	case errors.Is(err, zstd.ErrWindowSizeExceeded):
		return nil, fmt.Errorf("%w: index blob of %d bytes asks for a zstd window of more than %d bytes (%s)", ErrMalformed, len(blob), limit, rule)
	case errors.Is(err, zstd.ErrDecoderSizeExceeded):
		return nil, fmt.Errorf("%w: index blob of %d bytes inflates past %d bytes (%s)", ErrMalformed, len(blob), limit, rule)
	case err != nil:
		return nil, fmt.Errorf("%w: decompress: %v", ErrMalformed, err)
	}
	return raw, nil
}

// compressBound is the most a block of n bytes may take compressed: zstd's
// own bound (ZSTD_COMPRESSBOUND), which an encoder that stores what does
// not compress as raw blocks never passes. It keeps an index from making
// its readers fetch, and hold, gigabytes for a block of a few bytes.
func compressBound(n uint32) uint64 {
	b := uint64(n) + uint64(n)>>8
	if n < 128<<10 {
		b += uint64(128<<10-n) >> 11
	}
	return b
}

// duplicateBlock returns the first position of a block whose ID an
// earlier block has, if any. It sorts positions, 4 bytes a block, rather
// than filling a map of IDs, ten times that.
func duplicateBlock(blocks []Block) (int, bool) {
	pos := make([]uint32, len(blocks))
	for i := range pos {
		pos[i] = uint32(i)
	}
	slices.SortFunc(pos, func(a, b uint32) int {
		if c := bytes.Compare(blocks[a].ID[:], blocks[b].ID[:]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	first := -1
	for i := 1; i < len(pos); i++ {
		if blocks[pos[i-1]].ID == blocks[pos[i]].ID && (first < 0 || int(pos[i]) < first) {
			first = int(pos[i])
		}
	}
	return first, first >= 0
}

// shortPath cuts a path (which a hostile index makes as long as it likes)
// for an error message.
func shortPath(p string) string {
	if len(p) <= 80 {
		return p
	}
	return p[:40] + "…" + p[len(p)-39:]
}
