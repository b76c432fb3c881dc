//go:build linux

package testenv

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
)

// The big image is the Debian image plus a fourth layer of real toolchains
// taken from the host, the shape of golang:bookworm: a few large binaries
// (compile, link, go, cc1, cc1plus, lto1) among thousands of small sources.
// The Go tree alone is about 230 MB of file contents, which with the Debian
// image's 160 MB falls just short of the 400 MB the lazy-mount scenarios ask
// for, so the layer also carries the host's GCC internals (/usr/lib/gcc,
// about 125 MB on bookworm), as golang:bookworm does.
const (
	// GoRoot is the host's Go toolchain that layer 4 holds.
	GoRoot = "/usr/local/go"
	// BigImageGoDir is where layer 4 puts GoRoot in the image.
	BigImageGoDir = "opt/go"
	// GCCDir is the host's GCC internals, kept at the same path in the image.
	GCCDir = "/usr/lib/gcc"

	// MinBigImageBytes is the least the flattened big image holds in
	// regular files.
	MinBigImageBytes = 400_000_000
)

// toolchainTrees are the host directories layer 4 holds, and where.
var toolchainTrees = []struct{ src, dst string }{
	{GoRoot, BigImageGoDir},
	{GCCDir, strings.TrimPrefix(GCCDir, "/")},
}

// toolchainLayerVersion names the cached layer; change it whenever what the
// layer holds or how it is written changes.
const toolchainLayerVersion = "1"

const toolchainHistory = "shoal testenv: host toolchains: " + GoRoot + " at /" + BigImageGoDir + ", " + GCCDir

// ErrNoToolchain is returned by BuildBigImage when a host tree layer 4 needs
// is missing.
var ErrNoToolchain = errors.New("host toolchain missing")

// BigImage returns the four-layer big image: DebianImage plus the toolchain
// layer (see GoRoot, GCCDir). The layer is built once (gzip -n, about half a
// minute) into CacheDir, keyed by the host trees' contents, and reused by
// every test binary after that. Without the host trees the test is skipped,
// or fails in CI.
func BigImage(tb testing.TB) v1.Image {
	tb.Helper()
	if err := checkToolchains(); err != nil {
		SkipOrFatal(tb, "testenv: cannot build the big image: %v", err)
	}
	base := DebianImage(tb)
	start := time.Now()
	dir, meta, built, err := cachedToolchainLayer(tb.Context())
	if err != nil {
		tb.Fatalf("testenv: toolchain layer: %v", err)
	}
	if d := time.Since(start).Round(time.Millisecond); built {
		tb.Logf("testenv: built the toolchain layer (%d files, %d bytes) into %s in %v", meta.Files, meta.FileBytes, dir, d)
	} else if d > time.Second {
		tb.Logf("testenv: waited %v for another process to build %s", d, dir)
	}
	img, err := appendToolchain(base, dir, meta)
	if err != nil {
		tb.Fatalf("testenv: big image: %v", err)
	}
	d, err := img.Digest()
	if err != nil {
		tb.Fatalf("testenv: big image digest: %v", err)
	}
	tb.Logf("testenv: big image %s (Debian image + toolchain layer of %d bytes)", d, meta.FileBytes)
	return img
}

// BuildBigImage is BigImage for programs that have no testing.TB: the same
// layers, the same cache, the same digest. It needs the cached root
// filesystem tarball (DebianTarball builds it; so does scripts/deps.sh).
func BuildBigImage(ctx context.Context) (v1.Image, error) {
	if err := checkToolchains(); err != nil {
		return nil, err
	}
	rootfs := ""
	for _, n := range []string{DebianTarballName, HostTarballName} {
		if fi, err := os.Stat(filepath.Join(CacheDir(), n)); err == nil && fi.Size() > 0 {
			rootfs = filepath.Join(CacheDir(), n)
			break
		}
	}
	if rootfs == "" {
		return nil, fmt.Errorf("no root filesystem tarball in %s (run scripts/debian-rootfs.sh)", CacheDir())
	}
	base, err := BuildImage(ctx, rootfs)
	if err != nil {
		return nil, err
	}
	dir, meta, _, err := cachedToolchainLayer(ctx)
	if err != nil {
		return nil, fmt.Errorf("toolchain layer: %w", err)
	}
	return appendToolchain(base, dir, meta)
}

func checkToolchains() error {
	for _, t := range toolchainTrees {
		if fi, err := os.Stat(t.src); err != nil || !fi.IsDir() {
			return fmt.Errorf("%w: no directory %s", ErrNoToolchain, t.src)
		}
	}
	if _, err := os.Stat(filepath.Join(GoRoot, "VERSION")); err != nil {
		return fmt.Errorf("%w: %s is not a Go release (no VERSION)", ErrNoToolchain, GoRoot)
	}
	return nil
}

// toolchainMeta is layers.json of the toolchain layer's cache directory.
type toolchainMeta struct {
	layerMeta
	Files     int   `json:"files"`
	FileBytes int64 `json:"fileBytes"` // regular file contents, hard links counted once
}

const toolchainLayerName = "layer-4.tar.gz"

// toolchainKey changes when any host tree changes: Go's VERSION file, and per
// tree the number of entries, their total size and the newest mtime.
func toolchainKey() (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "v%s\x00", toolchainLayerVersion)
	v, err := os.ReadFile(filepath.Join(GoRoot, "VERSION"))
	if err != nil {
		return "", err
	}
	h.Write(v)
	for _, t := range toolchainTrees {
		var n, size, newest int64
		err := filepath.WalkDir(t.src, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n++
			if fi.Mode().IsRegular() {
				size += fi.Size()
			}
			newest = max(newest, fi.ModTime().UnixNano())
			return nil
		})
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "\x00%s\x00%s\x00%d\x00%d\x00%d", t.src, t.dst, n, size, newest)
	}
	return hex.EncodeToString(h.Sum(nil)[:8]), nil
}

// cachedToolchainLayer returns the directory holding the gzipped toolchain
// layer and its metadata, building it first if needed, under the same flock
// as cachedLayers (which also clears abandoned .build-* directories).
func cachedToolchainLayer(ctx context.Context) (dir string, meta toolchainMeta, built bool, err error) {
	key, err := toolchainKey()
	if err != nil {
		return "", meta, false, err
	}
	return cachedBuild(ctx, "toolchain-"+key, readToolchainMeta, func(ctx context.Context, tmp string) (toolchainMeta, error) {
		return writeToolchainLayer(ctx, filepath.Join(tmp, toolchainLayerName))
	})
}

func readToolchainMeta(dir string) (toolchainMeta, error) {
	var meta toolchainMeta
	data, err := os.ReadFile(filepath.Join(dir, layersMetaName))
	if err != nil {
		return meta, err
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		return meta, err
	}
	fi, err := os.Stat(filepath.Join(dir, toolchainLayerName))
	if err != nil {
		return meta, err
	}
	if fi.Size() != meta.Size {
		return meta, fmt.Errorf("%s: %d bytes, want %d", toolchainLayerName, fi.Size(), meta.Size)
	}
	return meta, nil
}

// writeToolchainLayer writes the toolchain trees as one gzipped tar to dst,
// compressed by gzip(1) for the reasons writeLayerFiles gives. The tar is
// deterministic: entries in WalkDir order (lexical within a directory,
// parents first), owners 0:0 without names, permission bits from the host,
// mtimes clamped to ImageEpoch, hard links as links to their first path.
func writeToolchainLayer(ctx context.Context, dst string) (toolchainMeta, error) {
	var meta toolchainMeta
	gzipBin, err := exec.LookPath("gzip")
	if err != nil {
		return meta, err
	}
	out, err := os.Create(dst)
	if err != nil {
		return meta, err
	}
	defer out.Close()
	digest, diffID := sha256.New(), sha256.New()
	cw := &countWriter{w: io.MultiWriter(out, digest)}
	in, cmd, err := startGzip(ctx, gzipBin, cw)
	if err != nil {
		return meta, err
	}
	tw := tar.NewWriter(io.MultiWriter(in, diffID))
	werr := writeTrees(tw, &meta)
	if werr == nil {
		werr = tw.Close()
	}
	in.Close() // ends gzip, on the error path too
	if err := cmd.Wait(); err != nil {
		return meta, errors.Join(werr, fmt.Errorf("gzip: %w", err))
	}
	if werr != nil {
		return meta, werr
	}
	if err := out.Close(); err != nil {
		return meta, err
	}
	meta.Digest = v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(digest.Sum(nil))}
	meta.DiffID = v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(diffID.Sum(nil))}
	meta.Size = cw.n
	return meta, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func writeTrees(tw *tar.Writer, meta *toolchainMeta) error {
	type inode struct{ dev, ino uint64 }
	firstPath := map[inode]string{}
	for _, t := range toolchainTrees {
		err := filepath.WalkDir(t.src, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := os.Lstat(p)
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(t.src, p)
			if err != nil {
				return err
			}
			name := path.Join(t.dst, filepath.ToSlash(rel))
			h := &tar.Header{
				Name:    name,
				Mode:    tarMode(fi.Mode()),
				ModTime: clampTime(fi.ModTime()),
			}
			switch {
			case fi.IsDir():
				h.Typeflag, h.Name = tar.TypeDir, name+"/"
			case fi.Mode()&fs.ModeSymlink != 0:
				h.Typeflag = tar.TypeSymlink
				if h.Linkname, err = os.Readlink(p); err != nil {
					return err
				}
			case fi.Mode().IsRegular():
				h.Typeflag, h.Size = tar.TypeReg, fi.Size()
				if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
					id := inode{uint64(st.Dev), st.Ino}
					if first, ok := firstPath[id]; ok {
						h.Typeflag, h.Size, h.Linkname = tar.TypeLink, 0, first
						break
					}
					firstPath[id] = name
				}
			default:
				return nil // sockets, devices: none in a toolchain
			}
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if h.Typeflag != tar.TypeReg {
				return nil
			}
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			n, err := io.Copy(tw, f)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if n != h.Size {
				return fmt.Errorf("%s: read %d bytes, want %d (changed while reading)", p, n, h.Size)
			}
			meta.Files++
			meta.FileBytes += n
			return nil
		})
		if err != nil {
			return fmt.Errorf("%s: %w", t.src, err)
		}
	}
	return nil
}

// tarMode is the tar header mode of a host file: permission bits plus
// setuid, setgid and sticky.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}

func clampTime(t time.Time) time.Time {
	if t.After(ImageEpoch) {
		return ImageEpoch
	}
	return t.Truncate(time.Second)
}

// appendToolchain adds the cached toolchain layer to base and puts the Go
// toolchain on the image's PATH.
func appendToolchain(base v1.Image, dir string, meta toolchainMeta) (v1.Image, error) {
	l, err := partial.CompressedToLayer(&fileLayer{path: filepath.Join(dir, toolchainLayerName), meta: meta.layerMeta})
	if err != nil {
		return nil, err
	}
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:   l,
		History: v1.History{Created: v1.Time{Time: ImageEpoch}, CreatedBy: toolchainHistory},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg := *cf.Config.DeepCopy()
	for i, e := range cfg.Env {
		if p, ok := strings.CutPrefix(e, "PATH="); ok {
			cfg.Env[i] = "PATH=" + p + ":/" + BigImageGoDir + "/bin"
		}
	}
	img, err = mutate.Config(img, cfg)
	if err != nil {
		return nil, err
	}
	img, ok := mutate.Annotations(img, map[string]string{
		"org.opencontainers.image.title": "shoal big test image",
	}).(v1.Image)
	if !ok {
		return nil, errors.New("mutate.Annotations did not return an image")
	}
	return img, nil
}
