package bench

// Helpers for the scenarios that run the real `shoal` binary against a real
// registry (coldstart-python, cached-read-throughput), and the standard-client
// baseline they share: pull every layer and unpack it to a fresh directory.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/internal/testenv"
)

// buildShoal builds the shoal binary into a temp dir, once per test
// ($SHOAL_BENCH_BIN names a prebuilt one instead).
func buildShoal(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("SHOAL_BENCH_BIN"); b != "" {
		return b
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("no go command to build shoal: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "shoal")
	start := time.Now()
	out, err := exec.CommandContext(t.Context(), goBin, "build", "-o", bin, "github.com/shoal-project/shoal/cmd/shoal").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/shoal: %v\n%s", err, out)
	}
	t.Logf("built %s in %v", bin, time.Since(start).Round(time.Millisecond))
	return bin
}

// bigFlat pushes the big image to reg as bench/big:v1 and converts it once
// with `shoal convert`, which pushes the flat form beside it (tag v1-shoal).
// It returns the source reference and the image.
func bigFlat(t *testing.T, reg *testenv.Registry, bin string) (string, v1.Image) {
	t.Helper()
	img := bigImage(t)
	src := reg.Ref("bench/big:v1")
	testenv.PushImage(t, src, img)
	start := time.Now()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(t.Context(), bin, "convert", "--plain-http", src)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("shoal convert: %v\n%s", err, stderr.String())
	}
	t.Logf("shoal convert --plain-http %s: %s in %v (%s)", src, strings.TrimSpace(stdout.String()),
		time.Since(start).Round(time.Millisecond), strings.TrimSpace(stderr.String()))
	return src, img
}

// imageInfo is the "image" object of a result.
func imageInfo(t *testing.T, ref string, img v1.Image) map[string]any {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var comp int64
	for _, l := range m.Layers {
		comp += l.Size
	}
	d, _ := img.Digest()
	return map[string]any{"ref": ref, "digest": d.String(), "layers": len(m.Layers), "compressed_bytes": comp,
		"description": "testenv.BigImage: Debian bookworm minbase + python3 (3 layers) + host toolchains layer (Go at /opt/go, /usr/lib/gcc)"}
}

// scratchDir makes a fresh directory under the system temp dir (the local
// disk). The returned function detaches any mount left below it and removes
// it; it runs at the end of the test too, so a failure leaves nothing.
func scratchDir(t *testing.T, pattern string) (string, func()) {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	remove := func() {
		once.Do(func() {
			for _, m := range mountsBelow(dir) {
				if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
					t.Logf("detach %s: %v", m, err)
				}
			}
			if err := os.RemoveAll(dir); err != nil {
				t.Logf("remove %s: %v", dir, err)
			}
		})
	}
	t.Cleanup(remove)
	return dir, remove
}

// mountsBelow lists the mount points at or below dir, deepest first.
func mountsBelow(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if mp := f[4]; mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	slices.SortFunc(out, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return out
}

// dropCaches writes back dirty pages and drops the kernel's page cache,
// dentries and inodes, so the next read comes from the disk (or the FUSE
// server). It needs root.
func dropCaches(t *testing.T) {
	t.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		t.Fatalf("drop caches: %v", err)
	}
}

// needRoot skips unless the test runs as root: FUSE mounts, namespaces and
// drop_caches need it. It fails instead in CI, and when SHOAL_BENCH=1
// asked for the benchmarks (make bench, make calibrate): a run that was
// asked for must not pass without having written its results.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if testenv.InCI() {
		t.Fatal("needs root (FUSE, namespaces, drop_caches); CI must run make bench as root")
	}
	if os.Getenv("SHOAL_BENCH") == "1" {
		t.Fatal("needs root (FUSE, namespaces, drop_caches); SHOAL_BENCH=1 asked for this run, so this is a failure")
	}
	t.Skip("needs root (FUSE, namespaces, drop_caches)")
}

// unpackImage is the standard client's pull: fetch the manifest and config,
// then every layer in order, gunzipped and applied to dir as containerd's
// applier does (whiteouts, opaque directories, hard links, symlinks, owners,
// modes, mtimes, xattrs). It returns the compressed bytes read from the
// registry for the layers and the image's config.
func unpackImage(ctx context.Context, ref, dir string, opts ...remote.Option) (int64, *v1.ConfigFile, error) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return 0, nil, err
	}
	img, err := remote.Image(r, append([]remote.Option{remote.WithContext(ctx)}, opts...)...)
	if err != nil {
		return 0, nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return 0, nil, err
	}
	layers, err := img.Layers()
	if err != nil {
		return 0, nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, nil, err
	}
	var pulled int64
	for i, l := range layers {
		n, err := applyRemoteLayer(l, dir)
		pulled += n
		if err != nil {
			return pulled, nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
	}
	return pulled, cf, nil
}

func applyRemoteLayer(l v1.Layer, dir string) (int64, error) {
	rc, err := l.Compressed() // verifies the digest as it streams
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	cr := &countingReader{r: rc}
	zr, err := gzip.NewReader(cr)
	if err != nil {
		return cr.n, err
	}
	if err := applyLayer(tar.NewReader(zr), dir); err != nil {
		return cr.n, err
	}
	// Read to the end so the digest is checked.
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return cr.n, err
	}
	return cr.n, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// applyLayer applies one layer's tar to dir. Whiteouts delete what lower
// layers put there; device nodes are skipped (the sandbox mounts its own
// /dev). The image is trusted: paths are cleaned but symlinks in them are
// not checked.
func applyLayer(tr *tar.Reader, dir string) error {
	inLayer := map[string]bool{} // paths this layer has written
	type dirTime struct {
		p string
		t time.Time
	}
	var dirs []dirTime
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		name := strings.TrimPrefix(path.Clean("/"+h.Name), "/")
		if name == "" {
			continue
		}
		parent, base := path.Split(name)
		switch {
		case base == ".wh..wh..opq":
			d := filepath.Join(dir, parent)
			ents, err := os.ReadDir(d)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			for _, e := range ents {
				if !inLayer[parent+e.Name()] {
					if err := os.RemoveAll(filepath.Join(d, e.Name())); err != nil {
						return err
					}
				}
			}
			continue
		case strings.HasPrefix(base, ".wh."):
			if err := os.RemoveAll(filepath.Join(dir, parent, strings.TrimPrefix(base, ".wh."))); err != nil {
				return err
			}
			continue
		}
		p := filepath.Join(dir, name)
		inLayer[name] = true
		if fi, err := os.Lstat(p); err == nil && !(fi.IsDir() && h.Typeflag == tar.TypeDir) {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
			dirs = append(dirs, dirTime{p, h.ModTime})
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				return err
			}
		case tar.TypeLink:
			target := filepath.Join(dir, strings.TrimPrefix(path.Clean("/"+h.Linkname), "/"))
			if err := os.Link(target, p); err != nil {
				return err
			}
			continue // shares the target's inode, owner, mode and times
		default: // character and block devices, FIFOs
			continue
		}
		if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
			return err
		}
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if err := unix.Lsetxattr(p, x, []byte(v), 0); err != nil {
					return fmt.Errorf("%s: xattr %s: %w", name, x, err)
				}
			}
		}
		if h.Typeflag == tar.TypeSymlink {
			continue
		}
		// After chown, which clears setuid and setgid.
		if err := os.Chmod(p, h.FileInfo().Mode()); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			// python checks its .pyc files against the sources' mtimes.
			if err := os.Chtimes(p, h.ModTime, h.ModTime); err != nil {
				return err
			}
		}
	}
	// Directory mtimes last: creating their entries changed them.
	for _, d := range slices.Backward(dirs) {
		if err := os.Chtimes(d.p, d.t, d.t); err != nil {
			return err
		}
	}
	return nil
}

// okWriter records when a line "ok" first appears in what is written to it.
type okWriter struct {
	start time.Time
	mu    sync.Mutex
	buf   bytes.Buffer
	at    time.Duration
}

func (w *okWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.at == 0 && slices.Contains(strings.Split(w.buf.String(), "\n"), "ok") {
		w.at = time.Since(w.start)
	}
	return len(p), nil
}

func (w *okWriter) okAfter() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.at
}

func (w *okWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// syncBuffer is a bytes.Buffer safe for a process's output goroutine and
// the test reading it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// shoalMount is a `shoal mount` process serving an image at dir.
type shoalMount struct {
	dir    string
	cmd    *exec.Cmd
	stderr syncBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // its exit, valid after done
	once   sync.Once
}

// startMount runs `shoal mount` in the foreground as a child process and
// returns once probe (a path relative to the image root) is visible at dir.
// The mount is stopped and, if still there, detached when the test ends.
func startMount(t *testing.T, bin, stateDir, ref, dir, probe string) *shoalMount {
	t.Helper()
	m := &shoalMount{dir: dir, done: make(chan struct{})}
	m.cmd = exec.Command(bin, "mount", "--plain-http", "--state-dir", stateDir, ref, dir)
	m.cmd.Stdout, m.cmd.Stderr = &m.stderr, &m.stderr
	// If the test binary dies, the mount goes with it and unmounts itself.
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("start shoal mount: %v", err)
	}
	go func() { m.err = m.cmd.Wait(); close(m.done) }()
	t.Cleanup(func() {
		if err := m.stop(); err != nil {
			t.Logf("shoal mount: %v", err)
		}
	})
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := os.Stat(filepath.Join(dir, probe)); err == nil {
			return m
		}
		select {
		case <-m.done:
			t.Fatalf("shoal mount exited before %s appeared: %v\n%s", probe, m.err, m.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("shoal mount: %s did not appear at %s within 2 minutes\n%s", probe, dir, m.stderr.String())
		}
	}
}

// stop sends SIGTERM and waits for the process to unmount and exit, killing
// it after 30 s; then it detaches the mount if the process left it behind.
// It returns the process's error (a clean stop is nil) and is idempotent.
func (m *shoalMount) stop() error {
	var err error
	m.once.Do(func() {
		_ = m.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-m.done:
		case <-time.After(30 * time.Second):
			_ = m.cmd.Process.Kill()
			<-m.done
			err = errors.New("did not stop within 30 s of SIGTERM; killed")
		}
		if m.err != nil {
			err = errors.Join(err, fmt.Errorf("exit: %w\n%s", m.err, m.stderr.String()))
		}
		if slices.Contains(mountsBelow(m.dir), m.dir) {
			err = errors.Join(err, fmt.Errorf("%s still mounted after shoal mount exited; detaching", m.dir))
			_ = unix.Unmount(m.dir, unix.MNT_DETACH)
		}
	})
	return err
}
