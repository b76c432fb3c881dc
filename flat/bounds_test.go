package flat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/shoal-project/shoal/internal/hostile"
	"github.com/shoal-project/shoal/internal/memcheck"
)

// rawHeader is the start of an encoded index with no blobs and no blocks,
// up to and including its entry count.
func rawHeader(entries uint64) []byte {
	b := append([]byte(nil), magic[:]...)
	b = binary.AppendUvarint(b, Version)
	b = append(b, 0, 0, 0, 0) // source "", average block size, no blobs, no blocks
	return binary.AppendUvarint(b, entries)
}

// sealed frames raw (an encoded index body, without its CRC) with the CRC
// it needs, so that the decoder gets past the checksum to the parser.
func sealed(body []byte) []byte {
	return binary.LittleEndian.AppendUint32(body, hostile.CRC32C(hostile.Raw(body)))
}

func compress(t testing.TB, raw []byte) []byte {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	return enc.EncodeAll(raw, nil)
}

func compressFast(t testing.TB, raw []byte) []byte {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	return enc.EncodeAll(raw, nil)
}

// indexBomb is a hostile index blob, and what DecodeBlob must say of it.
type indexBomb struct {
	name string
	blob func(t testing.TB) []byte
	want string // in the error
	// measure marks an input that is no hole of today's decoder but the
	// most it may be made to hold: only its peak resident set is checked.
	measure bool
}

// indexBombs are the hostile index blobs of issue 17, each a few
// kilobytes that allocated hundreds of megabytes or more before the
// decoder bounded what it allocates.
var indexBombs = []indexBomb{
	{
		// The bomb: 2,101 bytes claiming 7.5 million entries
		// and holding 68 MB of zeros, which parse as 7.5 million empty
		// entries (9 bytes each). The decoder allocated the entries up
		// front: about 1 GB.
		name: "entry count",
		blob: func(testing.TB) []byte {
			const n = 7_529_130
			hdr := rawHeader(n)
			zeros := hostile.Run(0, 9*n)
			crc := binary.LittleEndian.AppendUint32(nil, hostile.CRC32C(hostile.Raw(hdr), zeros))
			return hostile.Zstd(17, -1, hostile.Raw(hdr), zeros, hostile.Raw(crc))
		},
		want: "inflates past",
	},
	{
		// 32 KB of zstd holding a GiB of zeros, and saying so in the
		// frame header: the decoder allocated the GiB up front and filled
		// it, before it found no index there.
		name: "gigabyte of zeros",
		blob: func(testing.TB) []byte { return hostile.Zstd(17, 1<<30, hostile.Run(0, 1<<30)) },
		want: "claims",
	},
	{
		// 30 bytes whose frame header claims a GiB: allocated, though
		// never filled.
		name: "content size claim",
		blob: func(testing.TB) []byte {
			return hostile.Zstd(17, 1<<30-1, hostile.Raw([]byte("SHOALIDX")))
		},
		want: "claims",
	},
	{
		// 40,000 entries whose paths each grow the previous by a byte:
		// 11 bytes an entry, and the paths add up to 800 MB. Path lengths
		// were checked only after the whole index was parsed.
		name: "growing paths",
		blob: func(t testing.TB) []byte {
			const n = 40_000
			body := rawHeader(n + 1)
			body = append(body, 0, 0, byte(TypeDir), 0, 0, 0, 0, 0, 0) // the root
			for i := range n {
				body = binary.AppendUvarint(body, uint64(i))                 // shared: the whole previous path
				body = append(body, 1, 'a', byte(TypeDir), 0, 0, 0, 0, 0, 0) // suffix "a", zero metadata, no xattrs
			}
			return compress(t, sealed(body))
		},
		want: "path of 4097 bytes",
	},
	{
		// 100,000 entries of 11 bytes, each a 4,096-byte path (the longest
		// allowed) that shares all but its last byte with the one before:
		// 410 MB of paths out of 1.1 MB, padded so that the blob inflates
		// no more than an honest one may.
		name: "long paths",
		blob: func(t testing.TB) []byte { return longPaths(t, 100_000) },
		want: "in memory",
	},
	{
		// The same, 400,000 entries: enough to reach MaxDecodedSize rather
		// than MaxDecodedRatio, so that it measures the most a hostile
		// index may make the decoder hold.
		name: "long paths to the limit",
		blob: func(t testing.TB) []byte { return longPaths(t, 400_000) },
		want: fmt.Sprintf("more than %d bytes in memory", MaxDecodedSize),
	},
	{
		// About the largest block table that fits MaxIndexSize: 780,000
		// random block IDs, which do not compress, in a blob of 32 MB.
		// Allowed (an image of 190 GB has such a table), and refused only for its
		// missing root, so it measures the most an index may make the
		// decoder hold in its tables rather than in its paths.
		name: "largest block table",
		blob: func(t testing.TB) []byte {
			const n = 780_000
			body := append([]byte(nil), magic[:]...)
			body = binary.AppendUvarint(body, Version)
			body = append(body, 0, 0, 1, 71)
			body = append(body, "sha256:"+strings.Repeat("0", 64)...)
			body = binary.AppendUvarint(body, 1<<60)
			body = binary.AppendUvarint(body, n)
			rng := rand.New(rand.NewPCG(1, 2))
			for i := range n {
				var id [32]byte
				for j := range 4 {
					binary.LittleEndian.PutUint64(id[8*j:], rng.Uint64())
				}
				body = append(body, id[:]...)
				body = append(body, 0)
				body = binary.AppendUvarint(body, uint64(i)<<10)
				body = append(body, 0x80, 0x08, 0x80, 0x08) // 1,024 bytes, compressed and not
			}
			body = append(body, 0) // no entries
			return compressFast(t, sealed(body))
		},
		want:    "the first entry must be the root directory",
		measure: true,
	},
}

// longPaths is an index of n entries whose paths are all 4,096 bytes long
// and differ from the one before in their last byte, compressed and padded
// to inflate no more than MaxIndexRatio allows.
func longPaths(t testing.TB, n int) []byte {
	body := rawHeader(uint64(n) + 2)
	body = append(body, 0, 0, byte(TypeDir), 0, 0, 0, 0, 0, 0)
	body = append(body, 0)
	body = binary.AppendUvarint(body, MaxPathLen)
	body = append(body, strings.Repeat("a", MaxPathLen)...)
	body = append(body, byte(TypeFIFO), 0, 0, 0, 0, 0, 0)
	for range n {
		body = binary.AppendUvarint(body, MaxPathLen-1)
		body = append(body, 1, 'b', byte(TypeFIFO), 0, 0, 0, 0, 0, 0)
	}
	raw := sealed(body)
	return append(compress(t, raw), hostile.Skippable(len(raw)/MaxIndexRatio)...)
}

// Every hostile index blob is refused with one error naming the limit it
// broke, having allocated no more than its few bytes allow; a process
// decoding it stays far below the bar for its peak resident set.
func TestIndexBombs(t *testing.T) {
	for _, tc := range indexBombs {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			if tc.measure && (testing.Short() || memcheck.Race) {
				t.Skip("a measurement of the resident set")
			}
			blob := memcheck.UnderBar(t, func() []byte { return tc.blob(t) }, func(blob []byte) string {
				_, err := DecodeBlob(blob)
				return fmt.Sprint(err)
			})
			var err error
			got := blobCeiling.Check(t, len(blob), func() { _, err = DecodeBlob(blob) })
			t.Logf("%d-byte blob allocated %d bytes: %v", len(blob), got, err)
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrMalformed saying %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error of more than one line: %q", err)
			}
		})
	}
}

// The allocation ceilings of Decode and DecodeBlob for an input of n bytes,
// from the limits: Decode allocates at most about four times the decoded
// size it allows (tables double as they grow), and DecodeBlob what Decode
// allocates for what the blob may inflate to, plus the inflated bytes
// themselves (twice, as they grow) and its decoder.
var (
	decodeCeiling = memcheck.Ceiling{PerByte: 4 * MaxDecodedRatio, Const: 4*limitSlack + 1<<20}
	blobCeiling   = memcheck.Ceiling{
		PerByte: MaxIndexRatio * (decodeCeiling.PerByte + 3),
		Const:   decodeCeiling.Of(limitSlack) + 3*limitSlack + 1<<20,
	}
)

// A stored block whose frame claims, or holds, 16 MiB for a block of
// 1,000 bytes was decoded (allocating its claim, or what it held) before
// its length was compared with the block's. The decoder now has room for
// the block and no more: it stops within a zstd block (128 KiB) or two of
// the block's end.
func TestBlockBombs(t *testing.T) {
	data := []byte(strings.Repeat("block", 200))
	id := Sum(data)
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"content size claim", hostile.Zstd(17, MaxBlockSize, hostile.Raw(data))},
		{"too much content", hostile.Zstd(17, -1, hostile.Raw(data), hostile.Run(0, MaxBlockSize))},
	} {
		b := Block{ID: id, CLen: uint32(len(tc.frame)), ULen: uint32(len(data))}
		var err error
		got := memcheck.Allocated(func() { _, err = DecodeBlock(b, tc.frame, nil) })
		t.Logf("%s: %d-byte frame, %d bytes allocated: %v", tc.name, len(tc.frame), got, err)
		if !errors.Is(err, ErrCorruptBlock) {
			t.Errorf("%s: %v, want ErrCorruptBlock", tc.name, err)
		}
		if got > 512<<10 {
			t.Errorf("%s: %d bytes allocated for a block of %d", tc.name, got, len(data))
		}
	}
	good := hostile.Zstd(17, int64(len(data)), hostile.Raw(data))
	if out, err := DecodeBlock(Block{ID: id, CLen: uint32(len(good)), ULen: uint32(len(data))}, good, nil); err != nil || string(out) != string(data) {
		t.Fatalf("a good block: %v", err)
	}
}
