package lazyfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/flat"
)

func devMajor(rdev uint64) uint32 { return uint32((rdev>>8)&0xfff | (rdev>>32)&^0xfff) }
func devMinor(rdev uint64) uint32 { return uint32(rdev&0xff | (rdev>>12)&^0xff) }

// TestConformance walks the whole mounted tree and compares every entry with
// the index: type, mode, owner, size, mtime, inode number and link count,
// link target, device numbers, xattrs and contents.
func TestConformance(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	x := im.x
	m := mountT(t, x, newMemFetcher(im))
	root := m.Dir()

	// Link counts, worked out independently of the tree code.
	wantNlink := map[string]uint32{}
	for _, e := range x.Entries {
		switch e.Type {
		case flat.TypeDir:
			wantNlink[e.Path] += 2
			if e.Path != "" {
				wantNlink[flat.ParentPath(e.Path)]++
			}
		case flat.TypeHardlink:
			wantNlink[e.Linkname]++
		default:
			wantNlink[e.Path]++
		}
	}

	seen := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			rel = ""
		}
		seen[rel] = true
		k, ok := x.Lookup(rel)
		if !ok {
			t.Errorf("%q: in the mount, not in the index", rel)
			return nil
		}
		c := x.Resolve(k)
		e := &x.Entries[c]
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			t.Errorf("lstat %q: %v", rel, err)
			return nil
		}
		if want := typeBits(e.Type) | e.Mode; st.Mode != want {
			t.Errorf("%q: mode %o, want %o", rel, st.Mode, want)
		}
		if fi, err := os.Lstat(p); err != nil {
			t.Errorf("lstat %q: %v", rel, err)
		} else if fi.Mode().Type() != d.Type() {
			t.Errorf("%q: readdir says type %v, lstat %v", rel, d.Type(), fi.Mode().Type())
		}
		if st.Uid != e.UID || st.Gid != e.GID {
			t.Errorf("%q: owner %d:%d, want %d:%d", rel, st.Uid, st.Gid, e.UID, e.GID)
		}
		if st.Mtim.Sec != e.MtimeSec || st.Mtim.Nsec != int64(e.MtimeNs) {
			t.Errorf("%q: mtime %d.%09d, want %d.%09d", rel, st.Mtim.Sec, st.Mtim.Nsec, e.MtimeSec, e.MtimeNs)
		}
		if st.Ino != uint64(c)+1 {
			t.Errorf("%q: inode %d, want %d", rel, st.Ino, c+1)
		}
		if want := wantNlink[e.Path]; uint32(st.Nlink) != want {
			t.Errorf("%q: nlink %d, want %d", rel, st.Nlink, want)
		}
		switch e.Type {
		case flat.TypeReg:
			if uint64(st.Size) != e.Size {
				t.Errorf("%q: size %d, want %d", rel, st.Size, e.Size)
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Errorf("read %q: %v", rel, err)
			} else if sha256.Sum256(got) != sha256.Sum256(im.contents(t, rel)) {
				t.Errorf("%q: contents differ from the index", rel)
			}
		case flat.TypeSymlink:
			target, err := os.Readlink(p)
			if err != nil || target != e.Linkname {
				t.Errorf("readlink %q = %q, %v; want %q", rel, target, err, e.Linkname)
			}
			if st.Size != int64(len(e.Linkname)) {
				t.Errorf("%q: symlink size %d, want %d", rel, st.Size, len(e.Linkname))
			}
		case flat.TypeChar, flat.TypeBlock:
			if devMajor(st.Rdev) != e.DevMajor || devMinor(st.Rdev) != e.DevMinor {
				t.Errorf("%q: device %d,%d, want %d,%d", rel, devMajor(st.Rdev), devMinor(st.Rdev), e.DevMajor, e.DevMinor)
			}
		}
		if e.Type != flat.TypeSymlink {
			checkXattrs(t, p, e.Xattrs)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range x.Entries {
		if !seen[e.Path] {
			t.Errorf("%q: in the index, not found by the walk", e.Path)
		}
	}

	// Spot checks against the source bytes, independent of the converter.
	for path, want := range map[string][]byte{
		"data/random1":        randomBytes(1, 1536<<10),
		"data/random2.hard":   randomBytes(2, 700<<10),
		"usr/lib/passwd.hard": []byte("root:x:0:0::/root:/bin/bash\n"),
		"etc/empty":           {},
	} {
		got, err := os.ReadFile(filepath.Join(root, path))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes (%v), want the %d source bytes", path, len(got), err, len(want))
		}
	}
	for _, pair := range [][2]string{{"data/random2", "data/random2.hard"}, {"etc/passwd", "usr/lib/passwd.hard"}} {
		var a, b syscall.Stat_t
		if err := syscall.Stat(filepath.Join(root, pair[0]), &a); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Stat(filepath.Join(root, pair[1]), &b); err != nil {
			t.Fatal(err)
		}
		if a.Ino != b.Ino || a.Nlink != 2 || b.Nlink != 2 {
			t.Errorf("hard links %s and %s: inodes %d and %d, nlink %d and %d; want one inode, nlink 2", pair[0], pair[1], a.Ino, b.Ino, a.Nlink, b.Nlink)
		}
	}

	// Read-only, and a file system the tools recognise.
	if _, err := os.OpenFile(filepath.Join(root, "etc/passwd"), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open for writing: %v, want EROFS", err)
	}
	if err := os.Mkdir(filepath.Join(root, "new"), 0o755); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir: %v, want EROFS", err)
	}
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(root, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Files != uint64(len(x.Entries)) || sfs.Flags&0x1 == 0 /* ST_RDONLY */ || sfs.Type != 0x65735546 /* FUSE */ {
		t.Errorf("statfs: files %d (want %d), flags %#x (want ST_RDONLY), type %#x", sfs.Files, len(x.Entries), sfs.Flags, sfs.Type)
	}
	if want := (x.ImageBytes() + 4095) / 4096; sfs.Blocks != want {
		t.Errorf("statfs: %d blocks, want %d", sfs.Blocks, want)
	}
	var sfs2 syscall.Statfs_t
	if err := syscall.Statfs(filepath.Join(root, "data/random1"), &sfs2); err != nil || sfs2.Files != sfs.Files {
		t.Errorf("statfs of a file: %+v, %v", sfs2, err)
	}
	if !slices.Contains(mountOptions(t, root), "ro") {
		t.Errorf("mount options %v lack ro", mountOptions(t, root))
	}
}

func checkXattrs(t *testing.T, p string, want []flat.Xattr) {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := syscall.Listxattr(p, buf)
	if err != nil {
		t.Errorf("listxattr %s: %v", p, err)
		return
	}
	var names []string
	for _, s := range strings.Split(string(buf[:n]), "\x00") {
		if s != "" {
			names = append(names, s)
		}
	}
	var wantNames []string
	for _, x := range want {
		wantNames = append(wantNames, x.Name)
	}
	if !slices.Equal(names, wantNames) {
		t.Errorf("listxattr %s = %q, want %q", p, names, wantNames)
	}
	for _, x := range want {
		size, err := syscall.Getxattr(p, x.Name, nil) // the size probe
		if err != nil || size != len(x.Value) {
			t.Errorf("getxattr %s %s size = %d, %v; want %d", p, x.Name, size, err, len(x.Value))
			continue
		}
		v := make([]byte, size+8)
		n, err := syscall.Getxattr(p, x.Name, v)
		if err != nil || !bytes.Equal(v[:n], x.Value) {
			t.Errorf("getxattr %s %s = %q, %v; want %q", p, x.Name, v[:n], err, x.Value)
		}
		if len(x.Value) > 0 {
			if _, err := syscall.Getxattr(p, x.Name, make([]byte, len(x.Value)-1)); !errors.Is(err, syscall.ERANGE) {
				t.Errorf("getxattr %s %s into a short buffer: %v, want ERANGE", p, x.Name, err)
			}
		}
	}
	if _, err := syscall.Getxattr(p, "user.absent", nil); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("getxattr %s user.absent: %v, want ENODATA", p, err)
	}
}

// mountOptions returns the per-mount options of the mount at dir.
func mountOptions(t *testing.T, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == dir {
			return strings.Split(f[5], ",")
		}
	}
	t.Fatalf("%s not mounted", dir)
	return nil
}

// TestMetadataNeverFetches: a full walk with stat, readdir, readlink and
// xattrs, but no reads, must not fetch a single block.
func TestMetadataNeverFetches(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	f := newMemFetcher(im)
	m := mountT(t, im.x, f)
	n := 0
	err := filepath.WalkDir(m.Dir(), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		n++
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		if d.Type()&fs.ModeSymlink != 0 {
			if _, err := os.Readlink(p); err != nil {
				return err
			}
			return nil
		}
		buf := make([]byte, 4096)
		if _, err := syscall.Listxattr(p, buf); err != nil {
			return err
		}
		syscall.Getxattr(p, "security.capability", buf)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != len(im.x.Entries) {
		t.Errorf("walk saw %d entries, index has %d", n, len(im.x.Entries))
	}
	if got := f.total(); got != 0 {
		t.Errorf("metadata walk made %d fetches, want 0", got)
	}
	if s := m.Stats(); s.Fetches != 0 {
		t.Errorf("stats: %+v", s)
	}
}

// largestExtent returns the extent of file path with the largest length and the
// file offset where it starts.
func largestExtent(t testing.TB, x *flat.Index, path string) (flat.Extent, int64) {
	t.Helper()
	i, ok := x.Lookup(path)
	if !ok {
		t.Fatalf("%s not in the index", path)
	}
	var best flat.Extent
	var bestOff, off int64
	for _, ex := range x.Entries[x.Resolve(i)].Extents {
		if ex.Length > best.Length {
			best, bestOff = ex, off
		}
		off += int64(ex.Length)
	}
	return best, bestOff
}

// TestSingleflight: many readers of one block that is not cached yet cause
// exactly one fetch. O_DIRECT makes each read reach the file system (the page
// cache would otherwise park all but one reader in the kernel).
func TestSingleflight(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	f := newMemFetcher(im)
	ex, start := largestExtent(t, im.x, "data/random1")
	target := im.x.Blocks[ex.Block]
	gate := make(chan struct{})
	f.hook = func(ctx context.Context, b flat.Block) error {
		if b.ID == target.ID {
			select {
			case <-gate:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	m := mountT(t, im.x, f, WithReadahead(0))
	want := im.contents(t, "data/random1")
	path := filepath.Join(m.Dir(), "data/random1")

	const readers = 12
	const size = 512
	step := (int64(ex.Length) - size) / readers
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for r := range readers {
		wg.Go(func() {
			fd := openDirect(t, path)
			defer syscall.Close(fd)
			off := start + int64(r)*step
			buf := make([]byte, size)
			if _, err := preadFull(fd, buf, off); err != nil {
				errs <- fmt.Errorf("reader %d: %w", r, err)
				return
			}
			if !bytes.Equal(buf, want[off:off+size]) {
				errs <- fmt.Errorf("reader %d: wrong bytes at %d", r, off)
			}
		})
	}
	waitFor(t, "all readers to wait for the block", 10*time.Second, func() bool { return m.Stats().Waiting == readers })
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := f.count(target.ID); n != 1 {
		t.Errorf("%d readers made %d fetches of the block, want 1", readers, n)
	}
}

// TestParallelStress reads random ranges of several files from 16 goroutines,
// through the page cache and around it, with a block cache too small to hold
// the files, and checks every byte. A deadlock fails the test.
func TestParallelStress(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	f := newMemFetcher(im)
	f.hook = func(ctx context.Context, b flat.Block) error {
		if b.ID[0]%4 == 0 { // some fetches are slow, so flights overlap
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	m := mountT(t, im.x, f, WithCacheBytes(256<<10), WithReadahead(2))
	files := []string{"data/random1", "data/random2", "data/random3", "data/text", "bin/true-copy", "many/f07", "many/f59"}
	want := map[string][]byte{}
	for _, p := range files {
		want[p] = im.contents(t, p)
	}

	const workers = 16
	duration := 2 * time.Second
	if testing.Short() {
		duration = 500 * time.Millisecond
	}
	stop := time.Now().Add(duration)
	var ops, bytesRead atomic.Int64
	errs := make(chan error, workers)
	done := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 42))
			buf := make([]byte, 300<<10)
			for time.Now().Before(stop) {
				p := files[r.IntN(len(files))]
				data := want[p]
				off := r.Int64N(int64(len(data)) + 1)
				n := r.IntN(len(buf)) + 1
				var fd int
				var err error
				if r.IntN(2) == 0 {
					fd, err = syscall.Open(filepath.Join(m.Dir(), p), syscall.O_RDONLY|syscall.O_DIRECT|syscall.O_CLOEXEC, 0)
				} else {
					fd, err = syscall.Open(filepath.Join(m.Dir(), p), syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
				}
				if err != nil {
					errs <- err
					return
				}
				for range r.IntN(4) + 1 { // a few reads, sometimes sequential
					got, err := syscall.Pread(fd, buf[:n], off)
					if err == syscall.EINTR {
						continue
					}
					if err != nil {
						syscall.Close(fd)
						errs <- fmt.Errorf("%s: pread %d at %d: %w", p, n, off, err)
						return
					}
					end := min(off+int64(n), int64(len(data)))
					if int64(got) != end-off || !bytes.Equal(buf[:got], data[off:end]) {
						syscall.Close(fd)
						errs <- fmt.Errorf("%s: pread %d at %d: wrong bytes (%d read)", p, n, off, got)
						return
					}
					ops.Add(1)
					bytesRead.Add(int64(got))
					off = end
				}
				syscall.Close(fd)
			}
		})
	}
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(duration + 30*time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("stress readers deadlocked; stats %+v\n%s", m.Stats(), buf[:runtime.Stack(buf, true)])
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s := m.Stats()
	t.Logf("%d reads, %d MB in %v; %d fetches, %d hits, %d misses, %d readahead", ops.Load(), bytesRead.Load()>>20, duration,
		s.Fetches, s.CacheHits, s.CacheMisses, s.Readahead)
	if ops.Load() == 0 {
		t.Error("no reads completed")
	}
}

// TestFetchErrors: a block that cannot be fetched, and one that comes back
// corrupt, fail the reads that need them with EIO; every other range still
// reads, and no read ever returns wrong bytes.
func TestFetchErrors(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	x := im.x
	const path = "data/random1"
	i, _ := x.Lookup(path)
	exts := x.Entries[i].Extents
	failing, corrupt := x.Blocks[exts[3].Block], x.Blocks[exts[7].Block]
	f := newMemFetcher(im)
	f.hook = func(ctx context.Context, b flat.Block) error {
		if b.ID == failing.ID {
			return errors.New("peer went away")
		}
		return nil
	}
	bad := &corruptingFetcher{memFetcher: f, corrupt: corrupt.ID}
	m := mountT(t, x, bad, WithReadahead(0), WithLogger(quiet()))
	want := im.contents(t, path)
	p := filepath.Join(m.Dir(), path)

	// Extent by extent, around the page cache: exactly the bad ones fail.
	fd := openDirect(t, p)
	defer syscall.Close(fd)
	var off int64
	for k, ex := range exts {
		buf := make([]byte, ex.Length)
		n, err := preadFull(fd, buf, off)
		isBad := ex.Block == exts[3].Block || ex.Block == exts[7].Block
		switch {
		case isBad && !errors.Is(err, syscall.EIO):
			t.Errorf("extent %d (bad block): %d bytes, %v; want EIO", k, n, err)
		case !isBad && err != nil:
			t.Errorf("extent %d: %v", k, err)
		}
		if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
			t.Errorf("extent %d: wrong bytes", k)
		}
		off += int64(ex.Length)
	}
	// Errors are not cached: a second read asks again.
	before := f.count(failing.ID)
	if _, err := preadFull(fd, make([]byte, 10), startOf(exts, 3)); !errors.Is(err, syscall.EIO) {
		t.Errorf("second read of the failing block: %v, want EIO", err)
	}
	if f.count(failing.ID) != before+1 {
		t.Errorf("failing block fetched %d times after a second read, want %d", f.count(failing.ID), before+1)
	}

	// Through the page cache, in odd-sized chunks: whatever is returned is right.
	fd2, err := syscall.Open(p, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd2)
	failed := 0
	buf := make([]byte, 10000)
	for off := int64(0); off < int64(len(want)); off += int64(len(buf)) {
		n, err := syscall.Pread(fd2, buf, off)
		if err != nil {
			if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.EINTR) {
				t.Errorf("pread at %d: %v, want EIO", off, err)
			}
			failed++
			continue
		}
		if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
			t.Fatalf("pread at %d: wrong bytes", off)
		}
	}
	if failed == 0 {
		t.Error("no buffered read failed")
	}
	if s := m.Stats(); s.ReadErrors == 0 || s.FetchErrors == 0 {
		t.Errorf("stats do not count the errors: %+v", s)
	}
}

func startOf(exts []flat.Extent, k int) int64 {
	var off int64
	for _, ex := range exts[:k] {
		off += int64(ex.Length)
	}
	return off
}

// corruptingFetcher flips a byte of one block: the length is right, the hash
// is not.
type corruptingFetcher struct {
	*memFetcher
	corrupt flat.BlockID
}

func (c *corruptingFetcher) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	d, err := c.memFetcher.Fetch(ctx, b)
	if err == nil && b.ID == c.corrupt {
		d = slices.Clone(d)
		d[len(d)/2] ^= 0xff
	}
	return d, err
}

// TestShortBlockWithoutVerify: even with verification off, a block of the
// wrong length is an error, never a short or padded read.
func TestShortBlockWithoutVerify(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	f := &truncatingFetcher{im: im}
	m := mountT(t, im.x, f, WithVerify(false), WithLogger(quiet()))
	if _, err := os.ReadFile(filepath.Join(m.Dir(), "data/random2")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read with short blocks: %v, want EIO", err)
	}
	if got, err := os.ReadFile(filepath.Join(m.Dir(), "etc/empty")); err != nil || len(got) != 0 {
		t.Errorf("empty file: %q, %v", got, err)
	}
}

type truncatingFetcher struct{ im *image }

func (f *truncatingFetcher) Fetch(ctx context.Context, b flat.Block) ([]byte, error) {
	d, err := f.im.block(b)
	if err != nil {
		return nil, err
	}
	return d[:len(d)-1], nil
}

// TestExec runs a dynamically linked program from the mount: the kernel
// and the loader read and map it through FUSE.
func TestExec(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	m := mountT(t, im.x, newMemFetcher(im))
	// Exec through a shell: the forked child of this process must not itself
	// touch the FUSE mount that this process serves (see go-fuse's docs).
	for _, prog := range []string{"bin/true-copy", "bin/link"} {
		out, err := exec.Command("/bin/sh", "-c", filepath.Join(m.Dir(), prog)+" && echo ran").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "ran" {
			t.Errorf("exec %s: %v: %s", prog, err, out)
		}
	}
}

// TestNoFUSELeakToChildren: programs started after a mount must not inherit
// the FUSE connection. (Not parallel: another test mounting at the same
// moment could have a descriptor open for an instant before it is marked.)
func TestNoFUSELeakToChildren(t *testing.T) {
	x, bm, _ := largeIndex(t)
	mountT(t, x, bm)
	out, err := exec.Command("/bin/sh", "-c", "ls -l /proc/$$/fd").CombinedOutput()
	if err != nil || strings.Contains(string(out), "/dev/fuse") {
		t.Errorf("a child process inherits /dev/fuse (%v):\n%s", err, out)
	}
}

// TestMmap maps files from the mount and compares the bytes. The mapping is
// done by a child process: a page fault on the mount from this process could
// stall a garbage collection that waits for the faulting thread, while the
// collection stops the goroutines that would serve the fault.
func TestMmap(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	m := mountT(t, im.x, newMemFetcher(im))
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"data/random1", "data/random3", "many/f13"} {
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), mmapHelperEnv+"="+filepath.Join(m.Dir(), p))
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("mmap helper on %s: %v", p, err)
		}
		sum := sha256.Sum256(im.contents(t, p))
		if got := strings.Fields(string(out)); len(got) == 0 || got[0] != fmt.Sprintf("%x", sum) {
			t.Errorf("mmap of %s: sha256 %q, want %x", p, out, sum)
		}
	}
}

// TestUnmountWhileFetching: Unmount returns while a read is blocked in
// Fetch (the fetch is cancelled and the read fails), and leaves no
// goroutine behind.
func TestUnmountWhileFetching(t *testing.T) {
	// Not parallel: it counts goroutines.
	im := buildImage(t, testLayers(t))
	before := runtime.NumGoroutine()
	f := newMemFetcher(im)
	entered := make(chan struct{}, 1)
	f.hook = func(ctx context.Context, b flat.Block) error {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	}
	m := mountT(t, im.x, f, WithLogger(quiet()))
	readErr := make(chan error, 1)
	go func() {
		fd, err := syscall.Open(filepath.Join(m.Dir(), "data/random3"), syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			readErr <- err
			return
		}
		_, err = syscall.Pread(fd, make([]byte, 4096), 300<<10)
		syscall.Close(fd)
		readErr <- err
	}()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the read never reached Fetch")
	}
	unmounted := make(chan error, 1)
	go func() { unmounted <- m.Unmount() }()
	select {
	case err := <-unmounted:
		if err != nil {
			t.Fatalf("Unmount: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Unmount hung while a read waited in Fetch")
	}
	if err := <-readErr; err == nil {
		t.Error("the blocked read succeeded after Unmount")
	}
	m.Wait()
	if mounted(t, m.Dir()) {
		t.Error("still mounted")
	}
	// Goroutines wind down asynchronously; allow a little slack for the
	// runtime's own.
	waitFor(t, "goroutines to wind down", 5*time.Second, func() bool { return runtime.NumGoroutine() <= before+2 })
}

// TestReadahead: a sequential reader gets the next blocks requested ahead of
// it, through the Prefetcher when the Fetcher is one, and fetched in the
// background otherwise; no block is fetched twice either way.
func TestReadahead(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	const path = "data/random1"
	i, _ := im.x.Lookup(path)
	fileBlocks := map[flat.BlockID]bool{}
	for _, ex := range im.x.Entries[i].Extents {
		fileBlocks[im.x.Blocks[ex.Block].ID] = true
	}
	readSequentially := func(t *testing.T, m *FS) {
		fd := openDirect(t, filepath.Join(m.Dir(), path))
		defer syscall.Close(fd)
		want := im.contents(t, path)
		buf := make([]byte, 8<<10)
		for off := int64(0); off < int64(len(want)); off += int64(len(buf)) {
			n, err := syscall.Pread(fd, buf, off)
			if err != nil {
				t.Fatalf("pread at %d: %v", off, err)
			}
			if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
				t.Fatalf("wrong bytes at %d", off)
			}
		}
	}

	t.Run("background", func(t *testing.T) {
		t.Parallel()
		f := newMemFetcher(im)
		m := mountT(t, im.x, f, WithReadahead(4))
		readSequentially(t, m)
		s := m.Stats()
		if s.Readahead == 0 {
			t.Errorf("no readahead: %+v", s)
		}
		for id := range fileBlocks {
			if n := f.count(id); n != 1 {
				t.Errorf("block %s fetched %d times", id, n)
			}
		}
		t.Logf("stats %+v", s)
	})
	t.Run("prefetcher", func(t *testing.T) {
		t.Parallel()
		f := &hintingFetcher{memFetcher: newMemFetcher(im)}
		m := mountT(t, im.x, f, WithReadahead(4))
		readSequentially(t, m)
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.hints) == 0 {
			t.Fatal("Prefetch never called")
		}
		for _, b := range f.hints {
			if !fileBlocks[b.ID] {
				t.Errorf("hinted block %s is not in %s", b.ID, path)
			}
		}
		for id := range fileBlocks {
			if n := f.count(id); n != 1 {
				t.Errorf("block %s fetched %d times", id, n)
			}
		}
		t.Logf("%d hints, stats %+v", len(f.hints), m.Stats())
	})
}

// hintingFetcher records Prefetch hints and does nothing with them.
type hintingFetcher struct {
	*memFetcher
	mu    sync.Mutex
	hints []flat.Block
}

var _ Prefetcher = (*hintingFetcher)(nil)

func (f *hintingFetcher) Prefetch(ctx context.Context, blocks []flat.Block) {
	f.mu.Lock()
	f.hints = append(f.hints, blocks...)
	f.mu.Unlock()
}

func TestOptions(t *testing.T) {
	t.Parallel()
	bad := []struct {
		name string
		opt  Option
	}{
		{"negative readahead", WithReadahead(-1)},
		{"huge readahead", WithReadahead(1000)},
		{"zero timeout", WithFetchTimeout(0)},
		{"negative cache", WithCacheBytes(-1)},
		{"empty fs name", WithFSName("")},
		{"nil logger", WithLogger(nil)},
		{"huge kernel readahead", WithKernelReadahead(1 << 30)},
		{"negative backing budget", WithBackingDir(t.TempDir(), -1)},
		{"backing budget, no directory", WithBackingDir("", 1<<20)},
		{"negative passthrough size", WithPassthroughMinSize(-1)},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Mount(t.Context(), t.TempDir(), &flat.Index{}, &truncatingFetcher{}, tc.opt); err == nil {
				t.Error("Mount accepted it")
			}
		})
	}
	if _, err := Mount(t.Context(), t.TempDir(), &flat.Index{}, &truncatingFetcher{}); err == nil {
		t.Error("Mount accepted an empty index")
	}
	if _, err := Mount(t.Context(), t.TempDir(), &flat.Index{}, nil); err == nil {
		t.Error("Mount accepted a nil Fetcher")
	}
}

func TestMkdev(t *testing.T) {
	t.Parallel()
	for _, d := range [][2]uint32{{1, 3}, {8, 0}, {300, 70000}, {4095, 1<<20 - 1}} {
		rdev := uint64(mkdev(d[0], d[1]))
		if devMajor(rdev) != d[0] || devMinor(rdev) != d[1] {
			t.Errorf("mkdev(%d, %d) decodes as %d, %d", d[0], d[1], devMajor(rdev), devMinor(rdev))
		}
	}
}

// TestUnmountBusy: a file held open past Unmount makes the mount busy.
// Unmount detaches it, so it leaves the tree at once; reads of blocks that
// are not cached fail, and Wait returns once the file is closed.
func TestUnmountBusy(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	m := mountT(t, im.x, newMemFetcher(im), WithLogger(quiet()), WithReadahead(0))
	f, err := os.Open(filepath.Join(m.Dir(), "data/random3"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := make([]byte, 100)
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount with an open file: %v", err)
	}
	if mounted(t, m.Dir()) {
		t.Fatal("busy mount still in the tree after Unmount")
	}
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Errorf("cached bytes of the open file after detach: %v", err)
	}
	waited := make(chan struct{})
	go func() { m.Wait(); close(waited) }()
	// The read of bytes not cached comes to the server, which fails it
	// with EIO (its fetches are cancelled); had the server exited, the
	// kernel would fail it with ENOTCONN. Wait returns only after the
	// server has exited, so it has not returned now: the event is the
	// server's answer, not a pause.
	if _, err := f.ReadAt(make([]byte, 100), 800<<10); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of uncached bytes after Unmount: %v, want EIO from the server", err)
	}
	select {
	case <-m.done:
		t.Fatal("Wait returns while a file is still open")
	default:
	}
	f.Close()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after the last file was closed")
	}
}

// TestPermissions: the kernel enforces the image's modes and owners
// (default_permissions), for other users too once WithAllowOther is set.
func TestPermissions(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	m := mountT(t, im.x, newMemFetcher(im), WithAllowOther(true))
	run := func(uid uint32, script string) error {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	d := m.Dir()
	// t.TempDir's directories are private to root; let the others reach
	// the mount point.
	if err := os.Chmod(filepath.Dir(d), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		uid    uint32
		script string
		ok     bool
	}{
		{"world readable", 65534, "cat " + d + "/etc/passwd", true},
		{"exec as another user", 65534, d + "/bin/true-copy", true},
		{"private dir, other user", 65534, "ls " + d + "/home/user", false},
		{"private dir, owner", 1000, "cat " + d + "/home/user/.profile", true},
		{"hard link, world readable", 65534, "cat " + d + "/usr/lib/passwd.hard", true},
		{"dir 0750 of another owner", 1000, "cat " + d + "/data/random2 >/dev/null", false},
		{"mode 0000", 1000, "cat " + d + "/etc/secret", false},
	} {
		err := run(tc.uid, tc.script)
		if (err == nil) != tc.ok {
			t.Errorf("%s: uid %d: %q: err %v, want success %v", tc.name, tc.uid, tc.script, err, tc.ok)
		}
	}
	if !slices.Contains(superOptions(t, d), "allow_other") {
		t.Errorf("super options %v lack allow_other", superOptions(t, d))
	}
}

// superOptions returns the super block options of the mount at dir.
func superOptions(t *testing.T, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			for i := range f {
				if f[i] == "-" && i+3 < len(f) {
					return strings.Split(f[i+3], ",")
				}
			}
		}
	}
	t.Fatalf("%s not mounted", dir)
	return nil
}
