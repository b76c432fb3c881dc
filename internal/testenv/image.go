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
	"hash"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The Debian image has three layers, split from the root filesystem tarball:
//
//  1. everything except the python3 standard library;
//  2. usr/lib/python3* (the standard library, about a third of the bytes);
//  3. a small layer of the changes real images make on top of a base, listed
//     below, so that flattening code meets each case.
//
// Entries keep the tarball's order, owners, modes, mtimes (to the second),
// xattrs, symlinks, hard links and device nodes. Entries the image adds carry
// ImageEpoch as their mtime, and so does the config: the same tarball gives the
// same image digest, wherever gzip(1) is the same (Debian's 1.12 on bookworm).
// Two debootstrap runs do not give the same tarball (maintainer scripts write
// fresh files), which is why the tarball is built once and cached.
const (
	// PythonStdlibDir is a directory of layer 2 (bookworm's python3 is 3.11).
	PythonStdlibDir = "usr/lib/python3.11"

	// WhitedOutFile is in layer 1 and deleted by a whiteout in layer 3.
	WhitedOutFile = "etc/motd"
	// WhitedOutDir is in layer 2 and deleted, with its contents, by a
	// whiteout in layer 3.
	WhitedOutDir = PythonStdlibDir + "/pydoc_data"
	// OpaqueDir is made opaque by layer 3: of everything below it only
	// OpaqueDirFile, which layer 3 adds, remains.
	OpaqueDir     = "usr/share/doc"
	OpaqueDirFile = OpaqueDir + "/shoal/README"
	// OverwrittenFile is replaced by layer 3 with OverwrittenContent.
	OverwrittenFile    = "etc/hostname"
	OverwrittenContent = "shoal\n"
	// AddedFile is a new regular file in layer 3 with AddedContent, and
	// AddedHardlink a hard link to it in another directory.
	AddedFile     = "etc/shoal-release"
	AddedContent  = "shoal test image: debian bookworm minbase + python3\n"
	AddedHardlink = "usr/local/share/shoal-release"
	// AddedSymlink is a new absolute symlink in layer 3.
	AddedSymlink       = "usr/local/bin/python"
	AddedSymlinkTarget = "/usr/bin/python3"
)

// ImageEpoch is the time stamp of everything the image construction adds.
var ImageEpoch = time.Date(2023, time.June, 10, 0, 0, 0, 0, time.UTC) // bookworm's release

// imageLayersVersion names the cached layer files; change it whenever the
// split or layer 3 changes, so that old caches are not reused.
const imageLayersVersion = "1"

const numLayers = 3

var layerHistory = [numLayers]string{
	"shoal testenv: root filesystem without " + "usr/lib/python3*",
	"shoal testenv: usr/lib/python3*",
	"shoal testenv: whiteouts, opaque directory, overwrite, new file, symlink, hard link",
}

// DebianImage returns the three-layer OCI image built from DebianTarball,
// without pushing it anywhere. The gzipped layers are cached beside the
// tarball with their digests, so only the first call anywhere pays for
// building them (tens of seconds).
func DebianImage(tb testing.TB) v1.Image {
	tb.Helper()
	return ImageFromTarball(tb, DebianTarball(tb))
}

// PushDebianImage pushes DebianImage to ref, a reference in a plain-HTTP
// loopback registry such as Registry.Ref("debian:bookworm"), and returns it.
func PushDebianImage(tb testing.TB, ref string) v1.Image {
	tb.Helper()
	return PushImage(tb, ref, DebianImage(tb))
}

// PushImage pushes img to ref in a plain-HTTP loopback registry and returns it.
func PushImage(tb testing.TB, ref string, img v1.Image) v1.Image {
	tb.Helper()
	return PushImageAs(tb, ref, img, authn.Anonymous)
}

// PushImageAs is PushImage with the registry's credentials.
func PushImageAs(tb testing.TB, ref string, img v1.Image, auth authn.Authenticator) v1.Image {
	tb.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		tb.Fatalf("testenv: parse %q: %v", ref, err)
	}
	start := time.Now()
	if err := remote.Write(r, img, remote.WithContext(tb.Context()), remote.WithAuth(auth)); err != nil {
		tb.Fatalf("testenv: push %s: %v", ref, err)
	}
	d, _ := img.Digest()
	tb.Logf("testenv: pushed %s@%s in %v", ref, d, time.Since(start).Round(time.Millisecond))
	return img
}

// ImageFromTarball builds the three-layer image (see the constants above) from
// any root filesystem tarball that has the paths layer 3 changes. The layers
// are cached in CacheDir, keyed by the tarball's path, size and mtime.
func ImageFromTarball(tb testing.TB, rootfsTar string) v1.Image {
	tb.Helper()
	start := time.Now()
	dir, meta, built, err := cachedLayers(tb.Context(), rootfsTar)
	if err != nil {
		tb.Fatalf("testenv: layers from %s: %v", rootfsTar, err)
	}
	if d := time.Since(start).Round(time.Millisecond); built {
		tb.Logf("testenv: built the image's layers into %s in %v", dir, d)
	} else if d > time.Second {
		tb.Logf("testenv: waited %v for another process to build %s", d, dir)
	}
	img, err := imageFromLayers(dir, meta, filepath.Base(rootfsTar))
	if err != nil {
		tb.Fatalf("testenv: image from %s: %v", dir, err)
	}
	d, err := img.Digest()
	if err != nil {
		tb.Fatalf("testenv: image digest: %v", err)
	}
	kind := "debootstrap"
	if filepath.Base(rootfsTar) == HostTarballName {
		kind = "ASSEMBLED FROM HOST FILES, not debootstrap"
	}
	tb.Logf("testenv: image %s from %s (%s)", d, rootfsTar, kind)
	return img
}

func layerFile(dir string, i int) string {
	return filepath.Join(dir, fmt.Sprintf("layer-%d.tar.gz", i+1))
}

// layerMeta is what cachedLayers records about each layer file, so that
// opening the image later reads nothing: hashing and gunzipping 150 MB costs
// a minute under the race detector.
type layerMeta struct {
	Digest v1.Hash `json:"digest"`
	DiffID v1.Hash `json:"diffID"`
	Size   int64   `json:"size"`
}

const layersMetaName = "layers.json"

// cachedLayers returns a directory holding the image's gzipped layers and
// their layers.json, building it first if needed. Builders are serialised with
// flock and the directory appears by rename, so concurrent test binaries build
// it once.
func cachedLayers(ctx context.Context, rootfsTar string) (dir string, meta []layerMeta, built bool, err error) {
	abs, err := filepath.Abs(rootfsTar)
	if err != nil {
		return "", nil, false, err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", nil, false, err
	}
	key := sha256.Sum256(fmt.Appendf(nil, "v%s\x00%s\x00%d\x00%d", imageLayersVersion, abs, fi.Size(), fi.ModTime().UnixNano()))
	name := fmt.Sprintf("%s-%x", strings.TrimSuffix(filepath.Base(abs), ".tar"), key[:8])
	return cachedBuild(ctx, name, readLayersMeta, func(ctx context.Context, tmp string) ([]layerMeta, error) {
		return writeLayerFiles(ctx, abs, tmp)
	})
}

func readLayersMeta(dir string) ([]layerMeta, error) {
	data, err := os.ReadFile(filepath.Join(dir, layersMetaName))
	if err != nil {
		return nil, err
	}
	var meta []layerMeta
	if err := json.Unmarshal(data, &meta); err != nil {
		return nil, err
	}
	if len(meta) != numLayers {
		return nil, fmt.Errorf("%s: %d layers, want %d", dir, len(meta), numLayers)
	}
	for i, m := range meta {
		fi, err := os.Stat(layerFile(dir, i))
		if err != nil {
			return nil, err
		}
		if fi.Size() != m.Size {
			return nil, fmt.Errorf("%s: %d bytes, want %d", layerFile(dir, i), fi.Size(), m.Size)
		}
	}
	return meta, nil
}

// writeLayerFiles splits rootfsTar into dir/layer-N.tar.gz. Compression runs
// in gzip(1) processes, one per layer: Debian's gzip is on every machine, is
// deterministic with -n, and runs at full speed under the race detector,
// which slows compress/flate many times over.
func writeLayerFiles(ctx context.Context, rootfsTar, dir string) ([]layerMeta, error) {
	gzipBin, err := exec.LookPath("gzip")
	if err != nil {
		return nil, err
	}
	src, err := os.Open(rootfsTar)
	if err != nil {
		return nil, err
	}
	defer src.Close()

	var (
		cmds    []*exec.Cmd
		stdins  []io.WriteCloser
		diffIDs [numLayers]hash.Hash
		ws      [numLayers]io.Writer
	)
	// Closing a gzip's stdin ends it; every gzip started is waited for, on
	// the error paths too.
	finish := func() error {
		var errs []error
		for _, in := range stdins {
			if err := in.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		for i, c := range cmds {
			if err := c.Wait(); err != nil {
				errs = append(errs, fmt.Errorf("gzip layer %d: %w", i+1, err))
			}
		}
		stdins, cmds = nil, nil
		return errors.Join(errs...)
	}
	defer finish() //nolint:errcheck // only reached with cmds left on an error path, whose error is returned
	for i := range numLayers {
		out, err := os.Create(layerFile(dir, i))
		if err != nil {
			return nil, err
		}
		defer out.Close()
		in, cmd, err := startGzip(ctx, gzipBin, out)
		if err != nil {
			return nil, err
		}
		cmds = append(cmds, cmd)
		stdins = append(stdins, in)
		diffIDs[i] = sha256.New()
		ws[i] = io.MultiWriter(in, diffIDs[i])
	}
	if err := splitRootfs(src, ws); err != nil {
		return nil, fmt.Errorf("split %s: %w", rootfsTar, err)
	}
	if err := finish(); err != nil {
		return nil, err
	}
	meta := make([]layerMeta, 0, numLayers)
	for i := range numLayers {
		f, err := os.Open(layerFile(dir, i))
		if err != nil {
			return nil, err
		}
		digest, size, err := v1.SHA256(f)
		f.Close()
		if err != nil {
			return nil, err
		}
		meta = append(meta, layerMeta{
			Digest: digest,
			DiffID: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(diffIDs[i].Sum(nil))},
			Size:   size,
		})
	}
	return meta, nil
}

// fileLayer is a gzipped layer file whose digests are known.
type fileLayer struct {
	path string
	meta layerMeta
}

var _ partial.CompressedLayer = (*fileLayer)(nil)
var _ partial.WithDiffID = (*fileLayer)(nil)

func (l *fileLayer) Digest() (v1.Hash, error)            { return l.meta.Digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)            { return l.meta.DiffID, nil }
func (l *fileLayer) Size() (int64, error)                { return l.meta.Size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)  { return os.Open(l.path) }

// inLayer2 reports whether name (clean, relative) belongs to the python layer.
func inLayer2(name string) bool {
	rest, ok := strings.CutPrefix(name, "usr/lib/")
	if !ok {
		return false
	}
	first, _, _ := strings.Cut(rest, "/")
	return strings.HasPrefix(first, "python3")
}

// splitRootfs reads a root filesystem tarball and writes the three layers as
// uncompressed tar streams.
func splitRootfs(src io.Reader, dst [numLayers]io.Writer) error {
	tr := tar.NewReader(src)
	var tws [numLayers]*tar.Writer
	for i := range numLayers {
		tws[i] = tar.NewWriter(dst[i])
	}
	layerOf := make(map[string]int)
	headers := make(map[string]*tar.Header) // the ones layer 3 reuses
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		name := cleanName(h.Name)
		if name == "" { // the root directory itself
			continue
		}
		out, err := layerHeader(h, name)
		if err != nil {
			return err
		}
		layer := 0
		if inLayer2(name) {
			layer = 1
		}
		if h.Typeflag == tar.TypeLink {
			target, ok := layerOf[out.Linkname]
			if !ok {
				return fmt.Errorf("%s: hard link to %s, which comes later or not at all", name, out.Linkname)
			}
			if target != layer {
				return fmt.Errorf("%s: hard link to %s in another layer", name, out.Linkname)
			}
		}
		layerOf[name] = layer
		switch name {
		case OpaqueDir, OverwrittenFile:
			headers[name] = out
		}
		if err := tws[layer].WriteHeader(out); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if out.Typeflag == tar.TypeReg && out.Size > 0 {
			if _, err := io.Copy(tws[layer], tr); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
	}
	for _, p := range []string{WhitedOutFile, WhitedOutDir, OverwrittenFile, OpaqueDir, path.Dir(AddedFile), path.Dir(AddedHardlink), path.Dir(AddedSymlink)} {
		if _, ok := layerOf[p]; !ok {
			return fmt.Errorf("the root filesystem has no %s, which layer 3 changes", p)
		}
	}
	if err := writeLayer3(tws[2], headers); err != nil {
		return fmt.Errorf("layer 3: %w", err)
	}
	for i := range numLayers {
		if err := tws[i].Close(); err != nil {
			return err
		}
	}
	return nil
}

// cleanName turns "./usr/bin/" into "usr/bin"; "" is the root.
func cleanName(n string) string {
	n = path.Clean("/" + n)
	return strings.TrimPrefix(n, "/")
}

// layerHeader copies what a layer keeps of a source header, and nothing that
// would vary between runs (atime, ctime, user names, the source's format).
func layerHeader(h *tar.Header, name string) (*tar.Header, error) {
	out := &tar.Header{
		Typeflag: h.Typeflag,
		Name:     name,
		Linkname: h.Linkname,
		Mode:     h.Mode,
		Uid:      h.Uid,
		Gid:      h.Gid,
		ModTime:  h.ModTime.Truncate(time.Second),
		Devmajor: h.Devmajor,
		Devminor: h.Devminor,
	}
	switch h.Typeflag {
	case tar.TypeReg:
		out.Size = h.Size
	case tar.TypeDir:
		out.Name += "/"
	case tar.TypeLink:
		out.Linkname = cleanName(h.Linkname)
	case tar.TypeSymlink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return nil, fmt.Errorf("%s: unsupported tar entry type %q", name, h.Typeflag)
	}
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			if out.PAXRecords == nil {
				out.PAXRecords = make(map[string]string)
			}
			out.PAXRecords[k] = v
		}
	}
	return out, nil
}

func writeLayer3(tw *tar.Writer, src map[string]*tar.Header) error {
	whiteout := func(p string) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeReg, Name: path.Join(path.Dir(p), ".wh."+path.Base(p)), Mode: 0o644, ModTime: ImageEpoch}
	}
	file := func(name, content string, mode int64) (*tar.Header, string) {
		return &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(content)), Mode: mode, ModTime: ImageEpoch}, content
	}
	overwritten := *src[OverwrittenFile]
	overwritten.Size = int64(len(OverwrittenContent))
	overwritten.ModTime = ImageEpoch
	opaque := *src[OpaqueDir] // the directory entry itself, as in the base

	type entry struct {
		h       *tar.Header
		content string
	}
	h1, c1 := file(AddedFile, AddedContent, 0o644)
	h2, c2 := file(OpaqueDirFile, "Everything else under /"+OpaqueDir+" is hidden by an opaque whiteout.\n", 0o644)
	// In path order, like the layers split from the tarball.
	entries := []entry{
		{h: whiteout(WhitedOutFile)},
		{h: &overwritten, content: OverwrittenContent},
		{h: h1, content: c1},
		{h: whiteout(WhitedOutDir)},
		{h: &tar.Header{Typeflag: tar.TypeSymlink, Name: AddedSymlink, Linkname: AddedSymlinkTarget, Mode: 0o777, ModTime: ImageEpoch}},
		{h: &tar.Header{Typeflag: tar.TypeLink, Name: AddedHardlink, Linkname: AddedFile, Mode: 0o644, ModTime: ImageEpoch}},
		{h: &opaque},
		{h: &tar.Header{Typeflag: tar.TypeReg, Name: OpaqueDir + "/.wh..wh..opq", Mode: 0o644, ModTime: ImageEpoch}},
		{h: &tar.Header{Typeflag: tar.TypeDir, Name: path.Dir(OpaqueDirFile) + "/", Mode: 0o755, ModTime: ImageEpoch}},
		{h: h2, content: c2},
	}
	for _, e := range entries {
		if err := tw.WriteHeader(e.h); err != nil {
			return fmt.Errorf("%s: %w", e.h.Name, err)
		}
		if _, err := io.WriteString(tw, e.content); err != nil {
			return fmt.Errorf("%s: %w", e.h.Name, err)
		}
	}
	return nil
}

func imageFromLayers(dir string, meta []layerMeta, source string) (v1.Image, error) {
	cfg := &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Created:      v1.Time{Time: ImageEpoch},
		Config: v1.Config{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cmd: []string{"/usr/bin/python3"},
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	adds := make([]mutate.Addendum, 0, numLayers)
	for i := range numLayers {
		l, err := partial.CompressedToLayer(&fileLayer{path: layerFile(dir, i), meta: meta[i]})
		if err != nil {
			return nil, err
		}
		adds = append(adds, mutate.Addendum{
			Layer:   l,
			History: v1.History{Created: v1.Time{Time: ImageEpoch}, CreatedBy: layerHistory[i]},
		})
	}
	img, err = mutate.Append(img, adds...)
	if err != nil {
		return nil, err
	}
	img, ok := mutate.Annotations(img, map[string]string{
		"org.opencontainers.image.title":       "shoal test image",
		"org.opencontainers.image.description": "built by internal/testenv from " + source,
		"org.opencontainers.image.created":     ImageEpoch.Format(time.RFC3339),
	}).(v1.Image)
	if !ok {
		return nil, errors.New("mutate.Annotations did not return an image")
	}
	return img, nil
}

// BuildImage is ImageFromTarball for programs (the demo) that have no
// testing.TB: the same layers, the same cache, the same digest.
func BuildImage(ctx context.Context, rootfsTar string) (v1.Image, error) {
	dir, meta, _, err := cachedLayers(ctx, rootfsTar)
	if err != nil {
		return nil, fmt.Errorf("layers from %s: %w", rootfsTar, err)
	}
	return imageFromLayers(dir, meta, filepath.Base(rootfsTar))
}

// startGzip runs Debian's `gzip -n -6` writing to out and returns its stdin.
// gzip -n leaves out the name and time stamp, so the same input always gives
// the same bytes (and layer digest) with the same gzip version; it is also
// much faster than Go's gzip under the race detector.
func startGzip(ctx context.Context, gzipBin string, out io.Writer) (io.WriteCloser, *exec.Cmd, error) {
	cmd := exec.CommandContext(ctx, gzipBin, "-n", "-6", "-c")
	cmd.Stdout = out
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		in.Close()
		return nil, nil, err
	}
	return in, cmd, nil
}
