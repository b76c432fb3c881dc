package lazyfs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
)

// mmapHelperEnv makes the test binary, re-executed, map a file and print the
// SHA-256 of its bytes (see TestMmap for why in another process).
const mmapHelperEnv = "LAZYFS_TEST_MMAP_FILE"

func TestMain(m *testing.M) {
	if p := os.Getenv(mmapHelperEnv); p != "" {
		os.Exit(mmapHelper(p))
	}
	os.Exit(m.Run())
}

func mmapHelper(path string) int {
	f, err := os.Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(fi.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mmap:", err)
		return 1
	}
	defer syscall.Munmap(data)
	// Touch the pages back to front, so the faults do not simply follow the
	// kernel's readahead.
	var sink byte
	for off := len(data) - 1; off >= 0; off -= 4096 {
		sink ^= data[off]
	}
	sum := sha256.Sum256(data)
	fmt.Println(hex.EncodeToString(sum[:]), sink)
	return 0
}

// requireFUSE skips the test when FUSE cannot be mounted here, or fails it
// when CI is set: there the machine must provide it.
func requireFUSE(t testing.TB) {
	t.Helper()
	why := ""
	if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		why = fmt.Sprintf("/dev/fuse unusable: %v", err)
	} else {
		f.Close()
		if os.Geteuid() != 0 {
			why = "not root: lazyfs tests mount directly"
		}
	}
	if why == "" {
		return
	}
	switch os.Getenv("CI") {
	case "", "0", "false":
		t.Skipf("lazyfs: %s (set CI=true to make this a failure)", why)
	default:
		t.Fatalf("lazyfs: %s, and CI is set: the CI machine must provide FUSE", why)
	}
}

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

// testLogger logs warnings and errors into the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// mountT mounts x on a fresh directory and unmounts it when the test ends,
// whether it passed or not, checking that nothing stays mounted.
func mountT(t testing.TB, x *flat.Index, f Fetcher, opts ...Option) *FS {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	opts = append([]Option{WithLogger(testLogger(t))}, opts...)
	m, err := Mount(t.Context(), dir, x, f, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			// The failure may be a hung request. A forced unmount aborts
			// the FUSE connection first, which frees every thread of this
			// process stuck in a request: a thread stuck reading from the
			// server in its own process cannot even be killed.
			syscall.Unmount(dir, syscall.MNT_FORCE)
		}
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		if mounted(t, dir) {
			t.Errorf("%s still mounted after Unmount", dir)
			syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return m
}

// mounted reports whether dir is a mount point in this mount namespace.
func mounted(t testing.TB, dir string) bool {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

// ent is one tar entry of a synthetic layer.
type ent struct {
	name         string
	typ          byte
	body         []byte
	mode         int64
	link         string
	uid, gid     int
	xattrs       map[string]string
	major, minor int64
	zeroMode     bool // mode 0000 (a zero mode otherwise means the default)
}

func layerTar(t testing.TB, ents []ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link,
			Uid: e.uid, Gid: e.gid, Devmajor: e.major, Devminor: e.minor,
			ModTime: time.Unix(1700000000+int64(i)*3600, int64(i)*1001), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 && !e.zeroMode {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func imageOf(t testing.TB, layers ...[]ent) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		raw := layerTar(t, l)
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(raw)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// capNetRaw is a valid security.capability value (VFS_CAP_REVISION_2,
// effective, permitted cap_net_raw): the kernel checks the format.
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00\x00\x00\x00" + "\x00\x00\x00\x00\x00\x00\x00\x00"

// testLayers is a small root file system in two layers with every kind of
// entry, files spanning many blocks and small files sharing blocks.
func testLayers(t testing.TB) [][]ent {
	t.Helper()
	trueBin, err := os.ReadFile("/usr/bin/true")
	if err != nil {
		t.Fatalf("read /usr/bin/true for the exec test: %v", err)
	}
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog\n"), 7000)
	l1 := []ent{
		{name: "bin/", typ: tar.TypeDir},
		{name: "bin/true-copy", body: trueBin, mode: 0o755},
		{name: "bin/link", typ: tar.TypeSymlink, link: "true-copy"},
		{name: "bin/abs-link", typ: tar.TypeSymlink, link: "/usr/bin/true"},
		{name: "etc/", typ: tar.TypeDir},
		{name: "etc/passwd", body: []byte("root:x:0:0::/root:/bin/sh\n")},
		{name: "etc/empty", body: nil},
		{name: "etc/secret", body: []byte("mode 0000"), zeroMode: true},
		{name: "etc/suid", body: []byte("#!/bin/sh\n"), mode: 0o4755, gid: 50},
		{name: "data/", typ: tar.TypeDir, mode: 0o750, uid: 10, gid: 20},
		{name: "data/random1", body: randomBytes(1, 1536<<10)},
		{name: "data/random2", body: randomBytes(2, 700<<10), uid: 1000, gid: 1000, mode: 0o600},
		{name: "data/random2.hard", typ: tar.TypeLink, link: "data/random2"},
		{name: "data/text", body: text},
		{name: "usr/lib/", typ: tar.TypeDir},
		{name: "usr/lib/cap", body: []byte("cap"), xattrs: map[string]string{
			"security.capability": capNetRaw, "user.note": "hi", "user.empty": ""}},
		{name: "dev/", typ: tar.TypeDir},
		{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{name: "dev/sda", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0},
		{name: "dev/big", typ: tar.TypeChar, mode: 0o600, major: 300, minor: 70000},
		{name: "run/", typ: tar.TypeDir},
		{name: "run/fifo", typ: tar.TypeFifo, mode: 0o620},
		{name: "home/user/", typ: tar.TypeDir, mode: 0o700, uid: 1000, gid: 1000},
		{name: "home/user/.profile", body: []byte("export X=1\n"), uid: 1000, gid: 1000},
	}
	var many []ent
	many = append(many, ent{name: "many/", typ: tar.TypeDir})
	for i := range 60 {
		many = append(many, ent{name: fmt.Sprintf("many/f%02d", i), body: randomBytes(uint64(100+i), 100+i*97)})
	}
	l2 := append([]ent{
		{name: "data/text", body: append(text[:1000:1000], []byte("changed in layer 2")...)},
		{name: "etc/.wh.passwd"},
		{name: "etc/passwd", body: []byte("root:x:0:0::/root:/bin/bash\n")},
		{name: "usr/lib/passwd.hard", typ: tar.TypeLink, link: "etc/passwd"},
		{name: "data/random3", body: randomBytes(3, 900<<10)},
	}, many...)
	return [][]ent{l1, l2}
}

// image is a flat image built in the test, with its data blobs in memory.
type image struct {
	x     *flat.Index
	blobs map[string][]byte
}

// buildImage flattens layers with the converter (16 KiB average blocks, so
// small files still make many blocks) and reads the data blobs back.
func buildImage(t testing.TB, layers [][]ent) *image {
	t.Helper()
	res, img, cleanup, err := converter.Build(context.Background(), imageOf(t, layers...),
		converter.WithAvgBlockSize(16<<10), converter.WithLogger(quiet()), converter.WithWorkDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	im := &image{x: res.Index, blobs: map[string][]byte{}}
	for _, b := range res.Index.Blobs {
		h, err := v1.NewHash(b.Digest)
		if err != nil {
			t.Fatal(err)
		}
		l, err := img.LayerByDigest(h)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		im.blobs[b.Digest] = data
	}
	return im
}

// block decodes block b from the in-memory blobs.
func (im *image) block(b flat.Block) ([]byte, error) {
	blob := im.blobs[im.x.Blobs[b.Blob].Digest]
	if blob == nil || b.Offset+uint64(b.CLen) > uint64(len(blob)) {
		return nil, fmt.Errorf("block %s: not in blob", b.ID)
	}
	return flat.DecodeBlock(b, blob[b.Offset:b.Offset+uint64(b.CLen)], nil)
}

// contents returns the bytes of regular file path (hard links resolved).
func (im *image) contents(t testing.TB, path string) []byte {
	t.Helper()
	i, ok := im.x.Lookup(path)
	if !ok {
		t.Fatalf("%s not in index", path)
	}
	e := &im.x.Entries[im.x.Resolve(i)]
	out := make([]byte, 0, e.Size)
	for _, ex := range e.Extents {
		d, err := im.block(im.x.Blocks[ex.Block])
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d[ex.Offset:ex.Offset+ex.Length]...)
	}
	return out
}

// memFetcher serves blocks from an image in memory and counts fetches per
// block. hook, if set, runs before each fetch and may fail it or block.
type memFetcher struct {
	im   *image
	hook func(ctx context.Context, b flat.Block) error

	mu     sync.Mutex
	counts map[flat.BlockID]int
}

var _ Fetcher = (*memFetcher)(nil)

func newMemFetcher(im *image) *memFetcher {
	return &memFetcher{im: im, counts: map[flat.BlockID]int{}}
}

func (f *memFetcher) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	f.mu.Lock()
	f.counts[b.ID]++
	f.mu.Unlock()
	if f.hook != nil {
		if err := f.hook(ctx, b); err != nil {
			return nil, err
		}
	}
	return f.im.block(b)
}

func (f *memFetcher) count(id flat.BlockID) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[id]
}

func (f *memFetcher) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.counts {
		n += c
	}
	return n
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openDirect opens a file with O_DIRECT: every read goes to the file system
// instead of the page cache.
func openDirect(t testing.TB, path string) int {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s O_DIRECT: %v", path, err)
	}
	return fd
}

// preadFull reads len(p) bytes at off, or fails with the first error.
func preadFull(fd int, p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		k, err := syscall.Pread(fd, p[n:], off+int64(n))
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if k == 0 {
			return n, io.ErrUnexpectedEOF
		}
		n += k
	}
	return n, nil
}
