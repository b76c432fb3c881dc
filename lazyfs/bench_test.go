package lazyfs

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/shoal-project/shoal/flat"
)

// benchIndex is one file of n random blocks of blockSize bytes each, built
// by hand, with the blocks in memory.
func benchIndex(tb testing.TB, n, blockSize int) (*flat.Index, blockMap, []byte) {
	tb.Helper()
	x := &flat.Index{
		AvgBlockSize: uint32(blockSize),
		Blobs:        []flat.Blob{{Digest: "sha256:" + strings.Repeat("cd", 32), Size: 1 << 40}},
		Entries:      []flat.Entry{{Path: "", Type: flat.TypeDir, Mode: 0o755}},
	}
	bm := blockMap{}
	all := make([]byte, 0, n*blockSize)
	var exts []flat.Extent
	for k := range n {
		d := randomBytes(uint64(1000+k), blockSize)
		id := flat.Sum(d)
		bm[id] = d
		x.Blocks = append(x.Blocks, flat.Block{ID: id, Offset: uint64(k) * uint64(blockSize), CLen: uint32(blockSize), ULen: uint32(blockSize)})
		exts = append(exts, flat.Extent{Block: uint32(k), Length: uint32(blockSize)})
		all = append(all, d...)
	}
	x.Entries = append(x.Entries, flat.Entry{Path: "file", Type: flat.TypeReg, Mode: 0o644, Size: uint64(len(all)), Extents: exts})
	return x, bm, all
}

const (
	benchBlocks    = 256
	benchBlockSize = 256 << 10 // 64 MiB in all
	benchBuf       = 1 << 20
)

// readAll reads the file at fd from start to end in benchBuf chunks.
func readAll(b *testing.B, fd int, size int64, buf []byte) {
	for off := int64(0); off < size; {
		n, err := syscall.Pread(fd, buf, off)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || n == 0 {
			b.Fatalf("pread at %d: %d, %v", off, n, err)
		}
		off += int64(n)
	}
}

// alignedBuf returns a page-aligned buffer (O_DIRECT wants one on most file
// systems; FUSE does not care, tmpfs does not support O_DIRECT at all).
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)
	return b[off%4096 : off%4096+n]
}

func fadviseDontNeed(fd int) error {
	_, _, e := syscall.Syscall6(syscall.SYS_FADVISE64, uintptr(fd), 0, 0, 4 /* POSIX_FADV_DONTNEED */, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// BenchmarkReadTmpfs is the baseline: the same bytes read from a file on
// tmpfs (/dev/shm), from the page cache.
func BenchmarkReadTmpfs(b *testing.B) {
	_, _, all := benchIndex(b, benchBlocks, benchBlockSize)
	dir, err := os.MkdirTemp("/dev/shm", "lazyfs-bench-")
	if err != nil {
		b.Skip("no /dev/shm")
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "file")
	if err := os.WriteFile(p, all, 0o644); err != nil {
		b.Fatal(err)
	}
	fd, err := syscall.Open(p, syscall.O_RDONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer syscall.Close(fd)
	buf := make([]byte, benchBuf)
	b.SetBytes(int64(len(all)))
	for b.Loop() {
		readAll(b, fd, int64(len(all)), buf)
	}
}

// BenchmarkReadCached reads a file of the mount that is in the page cache
// (FOPEN_KEEP_CACHE): the daemon is not involved.
func BenchmarkReadCached(b *testing.B) {
	x, bm, all := benchIndex(b, benchBlocks, benchBlockSize)
	m := mountT(b, x, bm, WithLogger(quiet()), WithCacheBytes(128<<20))
	fd, err := syscall.Open(filepath.Join(m.Dir(), "file"), syscall.O_RDONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer syscall.Close(fd)
	buf := make([]byte, benchBuf)
	readAll(b, fd, int64(len(all)), buf) // warm the page cache
	before := m.Stats().ReadBytes
	b.SetBytes(int64(len(all)))
	for b.Loop() {
		readAll(b, fd, int64(len(all)), buf)
	}
	b.ReportMetric(float64(m.Stats().ReadBytes-before)/float64(b.N), "daemon-B/op")
}

// BenchmarkReadBuffered drops the file's pages before each pass, so every
// byte goes kernel readahead → FUSE READ → block cache (all blocks in
// memory): the daemon's round trip, at the kernel's readahead window.
func BenchmarkReadBuffered(b *testing.B) {
	for _, ra := range []struct {
		name  string
		bytes int
	}{{"kernel-default", 0}, {"ra-1MiB", 1 << 20}} {
		b.Run(ra.name, func(b *testing.B) {
			x, bm, all := benchIndex(b, benchBlocks, benchBlockSize)
			m := mountT(b, x, bm, WithLogger(quiet()), WithCacheBytes(128<<20), WithKernelReadahead(ra.bytes))
			fd, err := syscall.Open(filepath.Join(m.Dir(), "file"), syscall.O_RDONLY, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer syscall.Close(fd)
			buf := make([]byte, benchBuf)
			readAll(b, fd, int64(len(all)), buf) // every block into the block cache
			b.SetBytes(int64(len(all)))
			for b.Loop() {
				if err := fadviseDontNeed(fd); err != nil {
					b.Fatal(err)
				}
				readAll(b, fd, int64(len(all)), buf)
			}
		})
	}
}

// BenchmarkReadDirect reads with O_DIRECT in 1 MiB requests: every read is
// a FUSE READ served from the block cache, no page cache on either side.
func BenchmarkReadDirect(b *testing.B) {
	x, bm, all := benchIndex(b, benchBlocks, benchBlockSize)
	m := mountT(b, x, bm, WithLogger(quiet()), WithCacheBytes(128<<20))
	fd := openDirect(b, filepath.Join(m.Dir(), "file"))
	defer syscall.Close(fd)
	buf := alignedBuf(benchBuf)
	readAll(b, fd, int64(len(all)), buf)
	b.SetBytes(int64(len(all)))
	for b.Loop() {
		readAll(b, fd, int64(len(all)), buf)
	}
}

// BenchmarkReadMiss reads with O_DIRECT and no block cache: every read
// fetches its blocks from the (in-memory, instant) Fetcher and verifies
// them. This is lazyfs's own cost per fetched byte.
func BenchmarkReadMiss(b *testing.B) {
	for _, v := range []struct {
		name   string
		verify bool
	}{{"verify", true}, {"noverify", false}} {
		b.Run(v.name, func(b *testing.B) {
			x, bm, all := benchIndex(b, benchBlocks, benchBlockSize)
			m := mountT(b, x, bm, WithLogger(quiet()), WithCacheBytes(0), WithReadahead(0), WithVerify(v.verify))
			fd := openDirect(b, filepath.Join(m.Dir(), "file"))
			defer syscall.Close(fd)
			buf := alignedBuf(benchBlockSize) // one block per read
			b.SetBytes(int64(len(all)))
			for b.Loop() {
				readAll(b, fd, int64(len(all)), buf)
			}
		})
	}
}
