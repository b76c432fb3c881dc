package bench

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoal-project/shoal/internal/testenv"
)

// readSetDirs are the directories whose files the cached-read scenario reads:
// Go's tool binaries (a few files of 5 to 26 MB), the go command, and
// python's standard library (about a thousand small files).
var readSetDirs = []string{testenv.BigImageGoDir + "/pkg/tool", testenv.BigImageGoDir + "/bin", testenv.PythonStdlibDir}

const (
	readSetMinBytes = 100_000_000
	readBufSize     = 1 << 20
	// mountProbe is a file that shows the image is mounted.
	mountProbe = testenv.BigImageGoDir + "/VERSION"
)

// TestBenchCachedReadThroughput: sequential reads (1 MiB buffers) of a fixed
// set of files of the big image from a Shoal mount whose blocks are all in
// the local block cache, against the same files in the image unpacked on the
// local disk. Before every measured read the kernel's page cache, dentries
// and inodes are dropped, so the mount reads from its block cache on disk
// and the baseline from its files on disk. The mount process is restarted
// for every measured read, so no block is in its memory either; a counting
// proxy in front of the registry checks that no byte comes from there.
// Alternating A B A B.
func TestBenchCachedReadThroughput(t *testing.T) {
	needBench(t)
	needRoot(t)
	bin := buildShoal(t)
	reg := testenv.StartRegistry(t)
	src, img := bigFlat(t, reg, bin)
	proxy := reg.Proxy(t)
	ref := proxy.Ref("bench/big:v1")

	local, _ := scratchDir(t, "bench-local-tree-")
	start := time.Now()
	if _, _, err := unpackImage(t.Context(), src, local); err != nil {
		t.Fatalf("unpack the image to %s: %v", local, err)
	}
	t.Logf("unpacked the image to %s in %v", local, time.Since(start).Round(time.Millisecond))
	files, total, dirBytes := readSet(t, local)

	state, _ := scratchDir(t, "bench-shoal-state-")
	mnt, _ := scratchDir(t, "bench-shoal-mnt-")

	// Warm the block cache: read every file of the image through the mount
	// once, then check the read set against the local tree.
	proxy.Reset()
	m := startMount(t, bin, state, ref, mnt, mountProbe)
	start = time.Now()
	warmBytes, warmFiles := readAll(t, mnt)
	warm := time.Since(start)
	for _, f := range files {
		if a, b := fileSum(t, filepath.Join(mnt, f)), fileSum(t, filepath.Join(local, f)); !bytes.Equal(a, b) {
			t.Fatalf("%s differs between the mount and the unpacked tree", f)
		}
	}
	if err := m.stop(); err != nil {
		t.Fatalf("shoal mount: %v", err)
	}
	warmRegistry := proxy.BytesServed()
	t.Logf("warm-up: read %d files, %d bytes through the mount in %v; %d bytes from the registry",
		warmFiles, warmBytes, warm.Round(time.Millisecond), warmRegistry)

	buf := make([]byte, readBufSize)
	var shoalS, localS, shoalMBs, localMBs, ratios []float64
	shoalDirMBs, localDirMBs := map[string][]float64{}, map[string][]float64{}
	addDirs := func(to map[string][]float64, byDir map[string]time.Duration) {
		for d, el := range byDir {
			to[d] = append(to[d], float64(dirBytes[d])/1e6/secs(el))
		}
	}
	var mountRegistry, readRegistry int64
	for i := range pairs() {
		proxy.Reset()
		m := startMount(t, bin, state, ref, mnt, mountProbe)
		mountRegistry = max(mountRegistry, proxy.BytesServed()) // manifest and index, at mount
		proxy.Reset()
		dropCaches(t)
		a, aDirs := timedRead(t, mnt, files, total, buf)
		addDirs(shoalDirMBs, aDirs)
		readRegistry += proxy.BytesServed()
		if err := m.stop(); err != nil {
			t.Fatalf("shoal mount: %v", err)
		}

		dropCaches(t)
		b, bDirs := timedRead(t, local, files, total, buf)
		addDirs(localDirMBs, bDirs)

		mbA, mbB := float64(total)/1e6/secs(a), float64(total)/1e6/secs(b)
		shoalS, localS = append(shoalS, secs(a)), append(localS, secs(b))
		shoalMBs, localMBs, ratios = append(shoalMBs, mbA), append(localMBs, mbB), append(ratios, mbA/mbB)
		t.Logf("pair %d: shoal %v (%.0f MB/s), local %v (%.0f MB/s)", i, a.Round(time.Millisecond), mbA, b.Round(time.Millisecond), mbB)
	}
	if readRegistry != 0 {
		t.Errorf("the registry served %d bytes during the measured reads, want 0 (all from the block cache)", readRegistry)
	}
	byDir := map[string]any{}
	for _, d := range readSetDirs {
		byDir[d] = map[string]any{"bytes": dirBytes[d], "shoal_mb_per_s": median(shoalDirMBs[d]), "local_mb_per_s": median(localDirMBs[d]),
			"ratio": median(shoalDirMBs[d]) / median(localDirMBs[d])}
	}
	info := imageInfo(t, src, img)
	writeResult(t, "cached-read-throughput", map[string]any{
		"runs":  len(shoalS),
		"image": info,
		"read_set": map[string]any{"dirs": readSetDirs, "files": len(files), "bytes": total,
			"how":    "every regular file of the dirs, in WalkDir order, each read sequentially to EOF with a 1 MiB buffer, one at a time",
			"by_dir": byDir, "by_dir_note": "median MB/s over pairs of the time spent on each directory's files (open to close)"},
		"cold": "sync; echo 3 > /proc/sys/vm/drop_caches (page cache, dentries, inodes) before every measured read, on both sides. " +
			"Shoal: every block already in the on-disk block cache (warm-up read of the whole image through an earlier mount with the same --state-dir); " +
			"`shoal mount` restarted before every measured read, so nothing is in its memory; the registry served 0 bytes during the reads (counting proxy)",
		"warmup": map[string]any{"files": warmFiles, "bytes": warmBytes, "seconds": secs(warm), "registry_bytes": warmRegistry},
		"shoal": map[string]any{
			"name":     "shoal mount --state-dir <warm> (FUSE; blocks from the local block cache)",
			"median_s": median(shoalS), "samples_s": shoalS,
			"mb_per_s": median(shoalMBs), "mb_per_s_samples": shoalMBs,
			"registry_bytes_during_reads": readRegistry, "registry_bytes_at_mount": mountRegistry,
		},
		"baseline": map[string]any{
			"name":     "the same files in the image unpacked on the local disk (" + fsType(local) + ")",
			"median_s": median(localS), "samples_s": localS,
			"mb_per_s": median(localMBs), "mb_per_s_samples": localMBs,
		},
		"ratio_median": median(ratios),
		"ratio_note":   "shoal MB/s ÷ local disk MB/s, per pair, median (MB = 10^6 bytes)",
		"goal":         "ratio_median >= 0.8",
	})
}

// readSet lists the regular files of readSetDirs in root (relative paths)
// and their total size, in all and by directory.
func readSet(t *testing.T, root string) ([]string, int64, map[string]int64) {
	t.Helper()
	var files []string
	var total int64
	byDir := map[string]int64{}
	for _, d := range readSetDirs {
		err := filepath.WalkDir(filepath.Join(root, d), func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return err
			}
			fi, err := e.Info()
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, p)
			files, total = append(files, rel), total+fi.Size()
			byDir[d] += fi.Size()
			return nil
		})
		if err != nil {
			t.Fatalf("read set: %v", err)
		}
	}
	if total < readSetMinBytes {
		t.Fatalf("read set: %d files of %d bytes, want at least %d bytes", len(files), total, readSetMinBytes)
	}
	return files, total, byDir
}

// timedRead reads files under root in order and returns how long it took,
// in all and for the files of each of readSetDirs.
func timedRead(t *testing.T, root string, files []string, want int64, buf []byte) (time.Duration, map[string]time.Duration) {
	t.Helper()
	byDir := map[string]time.Duration{}
	start := time.Now()
	var n int64
	for _, f := range files {
		t0 := time.Now()
		m, err := readFile(filepath.Join(root, f), buf)
		if err != nil {
			t.Fatal(err)
		}
		byDir[readSetDir(f)] += time.Since(t0)
		n += m
	}
	d := time.Since(start)
	if n != want {
		t.Fatalf("read %d bytes under %s, want %d", n, root, want)
	}
	return d, byDir
}

// readSetDir returns the entry of readSetDirs that holds file f.
func readSetDir(f string) string {
	for _, d := range readSetDirs {
		if strings.HasPrefix(f, d+"/") {
			return d
		}
	}
	return ""
}

// readFile reads a file to EOF with Read calls of len(buf). (io.Copy to
// io.Discard would read in 8 KiB pieces.)
func readFile(p string, buf []byte) (int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n int64
	for {
		m, err := f.Read(buf)
		n += int64(m)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, fmt.Errorf("read %s: %w", p, err)
		}
	}
}

// readAll reads every regular file under root.
func readAll(t *testing.T, root string) (n, files int64) {
	t.Helper()
	buf := make([]byte, readBufSize)
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return err
		}
		m, err := readFile(p, buf)
		n, files = n+m, files+1
		return err
	})
	if err != nil {
		t.Fatalf("read %s: %v", root, err)
	}
	return n, files
}

func fileSum(t *testing.T, p string) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return h.Sum(nil)
}

// fsType names the filesystem holding dir, from /proc/self/mountinfo.
func fsType(dir string) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "unknown filesystem"
	}
	best, typ := "", "unknown filesystem"
	for _, line := range bytes.Split(b, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) < 10 {
			continue
		}
		mp := string(f[4])
		if (dir == mp || len(dir) > len(mp) && dir[:len(mp)] == mp && (mp == "/" || dir[len(mp)] == '/')) && len(mp) >= len(best) {
			// fields after the "-" separator: fstype source options
			for i, x := range f {
				if string(x) == "-" && i+2 < len(f) {
					best, typ = mp, string(f[i+1])+" on "+string(f[i+2])
					break
				}
			}
		}
	}
	return typ
}
