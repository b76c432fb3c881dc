package lazyfs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/shoal-project/shoal/flat"
)

// blockMap is a Fetcher over blocks held in memory, by ID.
type blockMap map[flat.BlockID][]byte

func (bm blockMap) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	d, ok := bm[b.ID]
	if !ok {
		return nil, fmt.Errorf("block %s: not here", b.ID)
	}
	return d, nil
}

// largeIndex builds by hand an index with one file of 5 GiB + 123 bytes:
// mostly one 1 MiB zero block named over and over, with patterned blocks
// placed just below, at and above the 4 GiB mark, so that an offset cut to
// 32 bits reads different bytes.
func largeIndex(t testing.TB) (*flat.Index, blockMap, func(off, n int64) []byte) {
	t.Helper()
	zero := make([]byte, 1<<20)
	pats := [][]byte{randomBytes(10, 64<<10), randomBytes(11, 64<<10), randomBytes(12, 64<<10)}
	x := &flat.Index{
		AvgBlockSize: 1 << 20,
		Blobs:        []flat.Blob{{Digest: "sha256:" + strings.Repeat("ab", 32), Size: 1 << 30}},
	}
	bm := blockMap{}
	add := func(d []byte) uint32 {
		id := flat.Sum(d)
		bm[id] = d
		x.Blocks = append(x.Blocks, flat.Block{ID: id, Offset: uint64(len(x.Blocks)) << 20, CLen: 100, ULen: uint32(len(d))})
		return uint32(len(x.Blocks) - 1)
	}
	z := add(zero)
	p := []uint32{add(pats[0]), add(pats[1]), add(pats[2])}

	type seg struct {
		data []byte // the block's bytes
		ex   flat.Extent
	}
	var segs []seg
	put := func(b uint32, d []byte, off, n uint32) {
		segs = append(segs, seg{d, flat.Extent{Block: b, Offset: off, Length: n}})
	}
	for range 4095 {
		put(z, zero, 0, 1<<20)
	}
	put(p[0], pats[0], 0, 64<<10)      // ends at 4095 MiB + 64 KiB
	put(z, zero, 0, 1<<20-64<<10)      // ends at 4 GiB exactly
	put(p[1], pats[1], 0, 64<<10)      // 4 GiB .. 4 GiB + 64 KiB
	put(p[2], pats[2], 7, 5000)        // 4 GiB + 64 KiB, 5000 bytes
	put(z, zero, 0, 1<<20-64<<10-5000) // back to a MiB boundary
	for range 1023 {
		put(z, zero, 0, 1<<20)
	}
	put(p[0], pats[0], 100, 123) // a tail past 5 GiB

	var size uint64
	var exts []flat.Extent
	starts := make([]int64, len(segs))
	for k, s := range segs {
		starts[k] = int64(size)
		exts = append(exts, s.ex)
		size += uint64(s.ex.Length)
	}
	// A file of 3000 extents of 1 to 7 bytes: one read of it names more
	// pieces than one writev takes.
	var tiny []flat.Extent
	var tinySize uint64
	for k := range 3000 {
		n := uint32(k%7 + 1)
		tiny = append(tiny, flat.Extent{Block: p[k%3], Offset: uint32(k * 13), Length: n})
		tinySize += uint64(n)
	}
	x.Entries = []flat.Entry{
		{Path: "", Type: flat.TypeDir, Mode: 0o755},
		{Path: "big", Type: flat.TypeReg, Mode: 0o644, Size: size, Extents: exts},
		{Path: "big.link", Type: flat.TypeHardlink, Linkname: "big"},
		{Path: "tiny", Type: flat.TypeReg, Mode: 0o644, Size: tinySize, Extents: tiny},
	}
	if err := x.Validate(); err != nil {
		t.Fatal(err)
	}
	want := func(off, n int64) []byte {
		var out []byte
		for k, s := range segs {
			lo, hi := starts[k], starts[k]+int64(s.ex.Length)
			if hi <= off || lo >= off+n {
				continue
			}
			a, b := max(off, lo)-lo, min(off+n, hi)-lo
			out = append(out, s.data[int64(s.ex.Offset)+a:int64(s.ex.Offset)+b]...)
		}
		return out
	}
	return x, bm, want
}

// tinyContents is what file "tiny" of largeIndex holds.
func tinyContents() []byte {
	pats := [][]byte{randomBytes(10, 64<<10), randomBytes(11, 64<<10), randomBytes(12, 64<<10)}
	var out []byte
	for k := range 3000 {
		out = append(out, pats[k%3][k*13:k*13+k%7+1]...)
	}
	return out
}

// TestLargeFile reads a file larger than 4 GiB at offsets past 4 GiB, through
// the page cache and around it.
func TestLargeFile(t *testing.T) {
	t.Parallel()
	x, bm, want := largeIndex(t)
	m := mountT(t, x, bm)
	p := filepath.Join(m.Dir(), "big")
	size := int64(x.Entries[1].Size)
	if size != 5<<30+123 {
		t.Fatalf("test index: size %d", size)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size {
		t.Errorf("size %d, want %d", fi.Size(), size)
	}
	const gib = 1 << 30
	ranges := [][2]int64{
		{4*gib - 64<<10 - 1<<20 - 10, 300 << 10}, // across the first pattern
		{4*gib - 100, 200},                       // across 4 GiB
		{4 * gib, 64 << 10},                      // the second pattern
		{4*gib + 64<<10 - 3, 5010},               // into the third, at an offset
		{4*gib + 1<<20 - 10, 20},                 // zeros again
		{size - 200, 200},                        // the tail
		{size - 1, 1},
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := openDirect(t, p)
	defer syscall.Close(fd)
	for _, r := range ranges {
		w := want(r[0], r[1])
		got := make([]byte, r[1])
		if _, err := f.ReadAt(got, r[0]); err != nil {
			t.Errorf("read %d at %d: %v", r[1], r[0], err)
		} else if !bytes.Equal(got, w) {
			t.Errorf("read %d at %d: wrong bytes", r[1], r[0])
		}
		got2 := make([]byte, r[1])
		if _, err := preadFull(fd, got2, r[0]); err != nil {
			t.Errorf("direct read %d at %d: %v", r[1], r[0], err)
		} else if !bytes.Equal(got2, w) {
			t.Errorf("direct read %d at %d: wrong bytes", r[1], r[0])
		}
	}
	// Reads at and past the end.
	if n, err := syscall.Pread(fd, make([]byte, 10), size); n != 0 || err != nil {
		t.Errorf("read at EOF: %d, %v", n, err)
	}
	if n, err := syscall.Pread(fd, make([]byte, 10), size+4*gib); n != 0 || err != nil {
		t.Errorf("read past EOF: %d, %v", n, err)
	}
	if off, err := f.Seek(0, 2); err != nil || off != size {
		t.Errorf("seek to end: %d, %v", off, err)
	}
	tiny := tinyContents()
	tfd := openDirect(t, filepath.Join(m.Dir(), "tiny"))
	defer syscall.Close(tfd)
	got := make([]byte, len(tiny)+100)
	if n, err := syscall.Pread(tfd, got, 0); err != nil || !bytes.Equal(got[:n], tiny) {
		t.Errorf("one read of 3000 tiny extents: %d bytes, %v; want the %d bytes", n, err, len(tiny))
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(m.Dir(), "big.link"), &st); err != nil || st.Size != size || st.Nlink != 2 {
		t.Errorf("hard link to the large file: size %d nlink %d, %v", st.Size, st.Nlink, err)
	}
}
