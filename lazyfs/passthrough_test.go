package lazyfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// localFetcher is a memFetcher that is also a LocalChecker: every block is
// local unless notLocal says otherwise. fail makes every Fetch fail, as a
// node with no network and an empty cache would.
type localFetcher struct {
	*memFetcher
	notLocal func(flat.Block) bool
	fail     atomic.Bool
	hasCalls atomic.Int64
}

var _ LocalChecker = (*localFetcher)(nil)

func newLocalFetcher(im *image) *localFetcher {
	f := &localFetcher{memFetcher: newMemFetcher(im)}
	f.hook = func(ctx context.Context, b flat.Block) error {
		if f.fail.Load() {
			return errors.New("no network here")
		}
		return nil
	}
	return f
}

func (f *localFetcher) HasLocal(ctx context.Context, b flat.Block) bool {
	f.hasCalls.Add(1)
	return !f.fail.Load() && (f.notLocal == nil || !f.notLocal(b))
}

// failingFetcher fails every Fetch and has nothing local: whatever a mount
// over it reads must come from backing files.
func failingFetcher(im *image) *localFetcher {
	f := newLocalFetcher(im)
	f.fail.Store(true)
	return f
}

// backingPath is where file p of im is materialized in dir.
func backingPath(t testing.TB, im *image, dir, p string) string {
	t.Helper()
	i, ok := im.x.Lookup(p)
	if !ok {
		t.Fatalf("%s not in index", p)
	}
	return filepath.Join(dir, contentKey(im.x, int32(im.x.Resolve(i))))
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// dirFiles lists dir: names and total bytes.
func dirFiles(t testing.TB, dir string) ([]string, int64) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	var total int64
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			continue
		}
		names = append(names, e.Name())
		total += fi.Size()
	}
	return names, total
}

// readCheck reads p under the mount and compares it with the image.
func readCheck(t testing.TB, m *FS, im *image, p string) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(m.Dir(), p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	if !bytes.Equal(got, im.contents(t, p)) {
		t.Fatalf("%s: contents differ from the image", p)
	}
}

// kernelPassthrough reports whether this kernel passes reads through, as
// seen on a mount that has served a backed open: none of its reads came to
// lazyfs.
func kernelPassthrough(m *FS) bool {
	s := m.Stats()
	return s.PassthroughOpens > 0 && s.BackingReads == 0
}

// TestPassthrough: a file read whole through a mount whose blocks are all
// local is materialized; a later mount over the same backing directory, with
// a Fetcher that fails everything, serves it byte for byte from the backing
// file: read, mapped, executed, and through a hard link.
func TestPassthrough(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	backing := t.TempDir()
	files := []string{"data/random1", "data/random2", "bin/true-copy"}

	f := newLocalFetcher(im)
	a := mountT(t, im.x, f, WithBackingDir(backing, 64<<20), WithPassthroughMinSize(16<<10))
	for _, p := range files {
		readCheck(t, a, im, p)
	}
	for _, p := range files {
		bp := backingPath(t, im, backing, p)
		waitFor(t, "materialization of "+p, 10*time.Second, func() bool { return exists(bp) })
		got, err := os.ReadFile(bp)
		if err != nil || !bytes.Equal(got, im.contents(t, p)) {
			t.Fatalf("backing file of %s: %v, or contents differ", p, err)
		}
	}
	waitFor(t, "materialized stats", 5*time.Second, func() bool { return a.Stats().Materialized == int64(len(files)) })
	if s := a.Stats(); s.BackingFiles != int64(len(files)) || s.MaterializeErrors != 0 {
		t.Errorf("stats after materializing: %+v", s)
	}
	if names, _ := dirFiles(t, backing); len(names) != len(files) {
		t.Errorf("backing directory holds %v, want %d files", names, len(files))
	}
	fetches := f.total()

	// The same mount now hands out the backing file.
	readCheck(t, a, im, "data/random1")
	if s := a.Stats(); s.PassthroughOpens != 1 || f.total() != fetches {
		t.Errorf("reread on the first mount: %d passthrough opens, %d more fetches; want 1, 0", s.PassthroughOpens, f.total()-fetches)
	}

	// A new mount, with nothing in memory and nothing to fetch from.
	dead := failingFetcher(im)
	b := mountT(t, im.x, dead, WithBackingDir(backing, 64<<20), WithPassthroughMinSize(16<<10), WithLogger(quiet()))
	for _, p := range append(files, "data/random2.hard") {
		readCheck(t, b, im, p)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), mmapHelperEnv+"="+filepath.Join(b.Dir(), "data/random1"))
	out, err := cmd.Output()
	if sum := sha256.Sum256(im.contents(t, "data/random1")); err != nil || !strings.HasPrefix(string(out), fmt.Sprintf("%x", sum)) {
		t.Errorf("mmap of a passthrough file: %q, %v", out, err)
	}
	if out, err := exec.Command("/bin/sh", "-c", filepath.Join(b.Dir(), "bin/true-copy")+" && echo ran").CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "ran" {
		t.Errorf("exec of a passthrough file: %v: %s", err, out)
	}
	if n := dead.total(); n != 0 {
		t.Errorf("the second mount called Fetch %d times for materialized files", n)
	}
	s := b.Stats()
	if s.PassthroughOpens < int64(len(files))+3 || s.Materialized != 0 {
		t.Errorf("second mount: %+v", s)
	}
	if _, err := os.ReadFile(filepath.Join(b.Dir(), "data/random3")); err == nil {
		t.Error("a file never materialized was read with a Fetcher that fails")
	}
	switch why := kernelPassthroughExpected(backing); {
	case kernelPassthrough(b):
		t.Logf("kernel passthrough: %d opens, no reads reached lazyfs", s.PassthroughOpens)
	case why == "":
		t.Errorf("the kernel should pass reads through here, but %d reached lazyfs", s.BackingReads)
	default:
		t.Logf("reads served by lazyfs from backing files (%d), not by the kernel: %s", s.BackingReads, why)
	}
}

// kernelPassthroughExpected says why FUSE passthrough cannot work here, or
// "" if it should: Linux 6.9 or later, CAP_SYS_ADMIN in the initial user
// namespace, and a backing directory on a file system that is not itself
// stacked.
func kernelPassthroughExpected(backing string) string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return err.Error()
	}
	var rel []byte
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		rel = append(rel, byte(c))
	}
	var major, minor int
	if _, err := fmt.Sscanf(string(rel), "%d.%d", &major, &minor); err != nil || major < 6 || major == 6 && minor < 9 {
		return "kernel " + string(rel) + " is older than 6.9"
	}
	status, _ := os.ReadFile("/proc/self/status")
	var capEff uint64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%x", &capEff)
		}
	}
	if capEff&(1<<21) == 0 {
		return "no CAP_SYS_ADMIN"
	}
	if m, _ := os.ReadFile("/proc/self/uid_map"); len(strings.Fields(string(m))) != 3 || strings.Fields(string(m))[2] != "4294967295" {
		return "in a user namespace"
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(backing, &st); err != nil || st.Type == 0x794c7630 /* overlayfs */ {
		return "backing directory on overlayfs"
	}
	return ""
}

// TestPassthroughFallback: without passthrough in the kernel, a backed open
// is served by lazyfs from the backing file, still without fetching.
func TestPassthroughFallback(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	backing := t.TempDir()
	a := mountT(t, im.x, newLocalFetcher(im), WithBackingDir(backing, 64<<20))
	readCheck(t, a, im, "data/random1")
	bp := backingPath(t, im, backing, "data/random1")
	waitFor(t, "materialization", 10*time.Second, func() bool { return exists(bp) })

	noKernel := func(c *config) error { c.noKernelPassthrough = true; return nil }
	dead := failingFetcher(im)
	b := mountT(t, im.x, dead, WithBackingDir(backing, 64<<20), noKernel)
	readCheck(t, b, im, "data/random1")
	// And with odd offsets and sizes, past the end too.
	fd := openDirect(t, filepath.Join(b.Dir(), "data/random1"))
	defer syscall.Close(fd)
	want := im.contents(t, "data/random1")
	for _, r := range [][2]int{{0, 4096}, {4096 * 77, 3 * 4096}, {len(want) - 4096, 4096}} {
		buf := alignedBuf(r[1])
		if n, err := preadFull(fd, buf, int64(r[0])); err != nil || !bytes.Equal(buf[:n], want[r[0]:r[0]+r[1]]) {
			t.Errorf("pread %d at %d: %d, %v", r[1], r[0], n, err)
		}
	}
	if n, err := syscall.Pread(fd, alignedBuf(4096), int64(len(want))); n != 0 || err != nil {
		t.Errorf("pread at EOF: %d, %v", n, err)
	}
	s := b.Stats()
	if s.PassthroughOpens < 2 || s.BackingReads == 0 || dead.total() != 0 {
		t.Errorf("fallback: %+v, %d fetches; want backed opens, reads served from the backing file, no fetch", s, dead.total())
	}
}

// TestPassthroughMixedOpens: a file held open through the block path when
// it gets materialized keeps being opened that way (the kernel fails a
// passthrough open of an inode open in cached mode, and the reverse), and is
// handed out backed once the last such handle is closed.
func TestPassthroughMixedOpens(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	backing := t.TempDir()
	m := mountT(t, im.x, newLocalFetcher(im), WithBackingDir(backing, 64<<20))
	p := filepath.Join(m.Dir(), "data/random3")
	want := im.contents(t, "data/random3")

	held, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	readCheck(t, m, im, "data/random3") // its release materializes
	bp := backingPath(t, im, backing, "data/random3")
	// Renamed into place, then booked (Materialized): wait for both.
	waitFor(t, "materialization", 10*time.Second, func() bool { return exists(bp) && m.Stats().Materialized >= 1 })

	// Opens while a cached handle is open: cached too.
	for range 3 {
		readCheck(t, m, im, "data/random3")
	}
	got := make([]byte, len(want))
	if _, err := held.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("held handle: %v", err)
	}
	if n := m.Stats().PassthroughOpens; n != 0 {
		t.Fatalf("%d backed opens while a cached handle was open", n)
	}
	held.Close()
	waitReleased(t, m, "data/random3")

	// Now backed: several at once share the backing file, and a hard
	// linked name is the same inode.
	var fs []*os.File
	for range 3 {
		f, err := os.Open(p)
		if err != nil {
			t.Fatalf("open after the cached handle closed: %v", err)
		}
		fs = append(fs, f)
	}
	var wg sync.WaitGroup
	for _, f := range fs {
		wg.Go(func() {
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
				t.Errorf("backed handle: %v", err)
			}
		})
	}
	wg.Wait()
	for _, f := range fs {
		f.Close()
	}
	if n := m.Stats().PassthroughOpens; n != 3 {
		t.Errorf("%d backed opens, want 3", n)
	}
	// And the other way round: while backed handles are open, every open
	// is backed, even as they come and go.
	a, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		readCheck(t, m, im, "data/random3")
	}
	a.Close()
	if n := m.Stats().PassthroughOpens; n != 7 {
		t.Errorf("%d backed opens, want 7", n)
	}
}

// waitReleased waits until lazyfs has heard of the release of every handle
// of file p: the kernel sends RELEASE after close returns.
func waitReleased(t testing.TB, m *FS, p string) {
	t.Helper()
	i, _ := m.x.Lookup(p)
	c := int32(m.x.Resolve(i))
	waitFor(t, "release of "+p, 5*time.Second, func() bool {
		m.omu.Lock()
		defer m.omu.Unlock()
		return m.opens[c] == nil
	})
}

// TestPassthroughNotLocal: a file with a block that is not local is never
// materialized, and materializing never fetches.
func TestPassthroughNotLocal(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	i, _ := im.x.Lookup("data/random1")
	exts := im.x.Entries[i].Extents
	remote := im.x.Blocks[exts[len(exts)/2].Block].ID
	f := newLocalFetcher(im)
	f.notLocal = func(b flat.Block) bool { return b.ID == remote }
	backing := t.TempDir()
	var relMu sync.Mutex
	releases := map[int32]int{} // handled releases, by file
	onRelease := func(c *config) error {
		c.released = func(i int32) { relMu.Lock(); releases[i]++; relMu.Unlock() }
		return nil
	}
	m := mountT(t, im.x, f, WithBackingDir(backing, 64<<20), onRelease)
	readCheck(t, m, im, "data/random1")
	readCheck(t, m, im, "data/random3") // all local: it is materialized
	waitFor(t, "materialization of the local file", 10*time.Second, func() bool {
		return exists(backingPath(t, im, backing, "data/random3"))
	})
	readCheck(t, m, im, "data/random1")
	// Each read opened random1 once. Once both releases are handled, the
	// file was queued for materializing or never will be; once the queue
	// has drained, a queued file is on disk.
	c := int32(im.x.Resolve(i))
	waitFor(t, "both releases of data/random1", 10*time.Second, func() bool {
		relMu.Lock()
		defer relMu.Unlock()
		return releases[c] == 2
	})
	waitFor(t, "the materialize queue to drain", 10*time.Second, func() bool {
		m.mat.mu.Lock()
		defer m.mat.mu.Unlock()
		return len(m.mat.queued) == 0
	})
	if exists(backingPath(t, im, backing, "data/random1")) {
		t.Error("a file with a block that is not local was materialized")
	}
	if n := f.count(remote); n != 1 {
		t.Errorf("the remote block was fetched %d times, want 1 (the reader's)", n)
	}
	if s := m.Stats(); s.Materialized != 1 || s.BackingFiles != 1 {
		t.Errorf("stats: %+v", s)
	}
}

// TestPassthroughBudget: the backing directory stays within its budget,
// counting the files earlier mounts left; the least recently used go first,
// and a file larger than the whole budget is never written.
func TestPassthroughBudget(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	size := func(p string) int64 { return int64(len(im.contents(t, p))) }
	backing := t.TempDir()
	r1, r2, r3 := size("data/random1"), size("data/random2"), size("data/random3")

	// Too small for random1.
	budget := r3 + r2
	a := mountT(t, im.x, newLocalFetcher(im), WithBackingDir(backing, budget))
	readCheck(t, a, im, "data/random1")
	readCheck(t, a, im, "data/random2")
	waitFor(t, "random2", 10*time.Second, func() bool { return exists(backingPath(t, im, backing, "data/random2")) })
	readCheck(t, a, im, "data/random3")
	waitFor(t, "random3", 10*time.Second, func() bool { return exists(backingPath(t, im, backing, "data/random3")) })
	if exists(backingPath(t, im, backing, "data/random1")) {
		t.Error("a file larger than the budget was materialized")
	}
	if _, total := dirFiles(t, backing); total > budget {
		t.Errorf("backing directory holds %d bytes, budget %d", total, budget)
	}
	if err := a.Unmount(); err != nil {
		t.Fatal(err)
	}

	// A new mount with room for random1 next to one of the others: it
	// finds random2 and random3 on disk, and evicts random3, written last
	// but used least recently: random2 is opened again, from its backing
	// file.
	budget = r1 + r2
	b := mountT(t, im.x, newLocalFetcher(im), WithBackingDir(backing, budget))
	waitFor(t, "the scan", 5*time.Second, func() bool { return b.Stats().BackingFiles == 2 })
	readCheck(t, b, im, "data/random2")
	readCheck(t, b, im, "data/random1")
	waitFor(t, "random1", 10*time.Second, func() bool { return exists(backingPath(t, im, backing, "data/random1")) })
	if exists(backingPath(t, im, backing, "data/random3")) || !exists(backingPath(t, im, backing, "data/random2")) {
		names, _ := dirFiles(t, backing)
		t.Errorf("eviction: backing directory holds %v; want random1 and random2", names)
	}
	if _, total := dirFiles(t, backing); total > budget {
		t.Errorf("backing directory holds %d bytes, budget %d", total, budget)
	}
	if s := b.Stats(); s.BackingEvicted != 1 || s.BackingBytes != r1+r2 || s.PassthroughOpens != 1 {
		t.Errorf("stats: %+v", s)
	}
}

// TestPassthroughUnmountStops: Unmount cancels a materialization in flight,
// leaves no half-written file, and no goroutine behind. (No memory cache,
// so materializing fetches, from the local cache as far as it knows, and
// that is where it blocks.)
func TestPassthroughUnmountStops(t *testing.T) {
	// Not parallel: it counts goroutines.
	im := buildImage(t, testLayers(t))
	before := runtime.NumGoroutine()
	f := newLocalFetcher(im)
	var block atomic.Bool
	entered := make(chan struct{}, 1)
	f.hook = func(ctx context.Context, b flat.Block) error {
		if !block.Load() {
			return nil
		}
		select {
		case entered <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	}
	backing := t.TempDir()
	m := mountT(t, im.x, f, WithBackingDir(backing, 64<<20), WithCacheBytes(0), WithLogger(quiet()))
	// Opening a file whose blocks are all local is enough.
	block.Store(true)
	if fd, err := os.Open(filepath.Join(m.Dir(), "data/random1")); err != nil {
		t.Fatal(err)
	} else {
		fd.Close()
	}
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("materialization never fetched")
	}
	if names, _ := dirFiles(t, backing); len(names) != 1 || !strings.HasSuffix(names[0], tmpSuffix) {
		t.Errorf("while writing, backing directory holds %v", names)
	}
	done := make(chan error, 1)
	go func() { done <- m.Unmount() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Unmount hung while materializing")
	}
	m.Wait()
	if names, _ := dirFiles(t, backing); len(names) != 0 {
		t.Errorf("after Unmount, backing directory holds %v", names)
	}
	if s := m.Stats(); s.Materialized != 0 || s.MaterializeErrors != 1 {
		t.Errorf("stats: %+v", s)
	}
	waitFor(t, "goroutines to wind down", 5*time.Second, func() bool { return runtime.NumGoroutine() <= before+2 })
}

// TestPassthroughStaleFiles: a half-written file left by a crash is removed,
// and a backing file of the wrong size is never handed out.
func TestPassthroughStaleFiles(t *testing.T) {
	t.Parallel()
	im := buildImage(t, testLayers(t))
	backing := t.TempDir()
	bp := backingPath(t, im, backing, "data/random1")
	if err := os.WriteFile(bp, im.contents(t, "data/random1")[:1000], 0o400); err != nil {
		t.Fatal(err)
	}
	stale := backingPath(t, im, backing, "data/random3") + tmpSuffix
	if err := os.WriteFile(stale, []byte("half"), 0o400); err != nil {
		t.Fatal(err)
	}
	m := mountT(t, im.x, newLocalFetcher(im), WithBackingDir(backing, 64<<20))
	readCheck(t, m, im, "data/random1") // the short file is dropped, then rewritten
	// The file is renamed into place before the mount books it (commit,
	// then the Materialized count): wait for the count, or the next open
	// may come between the two and not be backed.
	waitFor(t, "rematerialization", 10*time.Second, func() bool {
		fi, err := os.Stat(bp)
		return err == nil && fi.Size() == int64(len(im.contents(t, "data/random1"))) && m.Stats().Materialized >= 1
	})
	if exists(stale) {
		t.Error("a half-written file survived the scan")
	}
	if s := m.Stats(); s.PassthroughOpens != 0 {
		t.Errorf("%d backed opens of a short backing file", s.PassthroughOpens)
	}
	readCheck(t, m, im, "data/random1")
	if s := m.Stats(); s.PassthroughOpens != 1 {
		t.Errorf("%d backed opens after the rewrite, want 1", s.PassthroughOpens)
	}
}

func TestContentKey(t *testing.T) {
	t.Parallel()
	x := &flat.Index{
		Blocks: []flat.Block{{ID: flat.Sum([]byte("a")), ULen: 1}, {ID: flat.Sum([]byte("b")), ULen: 1}},
		Entries: []flat.Entry{
			{Path: "", Type: flat.TypeDir},
			{Path: "f", Type: flat.TypeReg, Size: 2, Extents: []flat.Extent{{Block: 0, Length: 1}, {Block: 1, Length: 1}}},
			{Path: "g", Type: flat.TypeReg, Size: 2, Extents: []flat.Extent{{Block: 0, Length: 1}, {Block: 1, Length: 1}}},
			{Path: "h", Type: flat.TypeReg, Size: 2, Extents: []flat.Extent{{Block: 1, Length: 1}, {Block: 0, Length: 1}}},
		},
	}
	f, g, h := contentKey(x, 1), contentKey(x, 2), contentKey(x, 3)
	if f != g || f == h || !isKey(f) {
		t.Errorf("keys %s %s %s: want equal files to share, different ones not to", f, g, h)
	}
}
