// Package hostile crafts inputs that a hostile registry, image or peer
// could send, for the tests of the decoders that must survive them: zstd
// frames whose headers claim what their contents do not hold, or whose
// few bytes inflate to gigabytes.
package hostile

import (
	"encoding/binary"
	"hash/crc32"
	"io"
)

// Part is a run of a zstd frame's content: literal bytes (Raw) or n
// copies of one byte (Run).
type Part struct {
	raw  []byte
	fill byte
	n    int64
}

// Raw is b, stored as raw blocks: as many bytes in the frame as out of it.
func Raw(b []byte) Part { return Part{raw: b, n: int64(len(b))} }

// Run is n copies of c, stored as RLE blocks: 4 bytes of frame per block
// of up to 128 KiB of content.
func Run(c byte, n int64) Part { return Part{fill: c, n: n} }

// Len is how many content bytes p stands for.
func (p Part) Len() int64 { return p.n }

// maxBlock is the largest block a zstd frame may hold (with a window of at
// least 128 KiB).
const maxBlock = 128 << 10

// Zstd returns one zstd frame (RFC 8878) holding parts back to back.
// windowLog (10 to 41) is written in the window descriptor, so the frame
// asks its decoder for a window of 1<<windowLog bytes whatever it holds;
// contentSize, if not negative, is written as the frame content size,
// true or not. Blocks are at most 128 KiB, so windowLog should be at
// least 17 for content over that.
func Zstd(windowLog uint, contentSize int64, parts ...Part) []byte {
	b := []byte{0x28, 0xb5, 0x2f, 0xfd}
	fhd := byte(0)
	if contentSize >= 0 {
		fhd |= 3 << 6 // an 8-byte frame content size
	}
	b = append(b, fhd, byte(windowLog-10)<<3)
	if contentSize >= 0 {
		b = binary.LittleEndian.AppendUint64(b, uint64(contentSize))
	}
	block := func(typ byte, size int, last bool) {
		h := uint32(size)<<3 | uint32(typ)<<1
		if last {
			h |= 1
		}
		b = append(b, byte(h), byte(h>>8), byte(h>>16))
	}
	var blocks []func(last bool)
	for _, p := range parts {
		if p.raw != nil {
			for raw := p.raw; len(raw) > 0; {
				k := min(len(raw), maxBlock)
				chunk := raw[:k]
				raw = raw[k:]
				blocks = append(blocks, func(last bool) { block(0, len(chunk), last); b = append(b, chunk...) })
			}
			continue
		}
		for n := p.n; n > 0; {
			k := min(n, maxBlock)
			n -= k
			c := p.fill
			blocks = append(blocks, func(last bool) { block(1, int(k), last); b = append(b, c) })
		}
	}
	if len(blocks) == 0 {
		block(0, 0, true)
	}
	for i, f := range blocks {
		f(i == len(blocks)-1)
	}
	return b
}

// Skippable returns a zstd skippable frame of n bytes of padding: decoders
// pass over it, and it adds n+8 bytes to a blob without adding content.
func Skippable(n int) []byte {
	b := []byte{0x50, 0x2a, 0x4d, 0x18}
	b = binary.LittleEndian.AppendUint32(b, uint32(n))
	return append(b, make([]byte, n)...)
}

// CRC32C returns the CRC-32C (Castagnoli) of parts' content, computed
// without holding it: a Run of a gigabyte costs nothing here.
func CRC32C(parts ...Part) uint32 {
	tab := crc32.MakeTable(crc32.Castagnoli)
	var crc uint32
	chunk := make([]byte, 64<<10)
	for _, p := range parts {
		if p.raw != nil {
			crc = crc32.Update(crc, tab, p.raw)
			continue
		}
		for i := range chunk {
			chunk[i] = p.fill
		}
		for n := p.n; n > 0; {
			k := min(n, int64(len(chunk)))
			crc = crc32.Update(crc, tab, chunk[:k])
			n -= k
		}
	}
	return crc
}

// Reader returns parts' content as a stream, without holding it.
func Reader(parts ...Part) io.Reader {
	var rs []io.Reader
	for _, p := range parts {
		if p.raw != nil {
			rs = append(rs, &sliceReader{b: p.raw})
		} else {
			rs = append(rs, io.LimitReader(fillReader(p.fill), p.n))
		}
	}
	return io.MultiReader(rs...)
}

type sliceReader struct{ b []byte }

func (r *sliceReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

type fillReader byte

func (f fillReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(f)
	}
	return len(p), nil
}
