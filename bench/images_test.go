package bench

import (
	"archive/tar"
	"bytes"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/internal/testenv"
)

// hostTreeLayer makes a layer of the host directory dir (regular files,
// directories and symlinks, in sorted order), placed at prefix in the image.
// The tar goes to a temp file; the layer is gzip-compressed by ggcr.
func hostTreeLayer(t *testing.T, dir, prefix string) v1.Layer {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "layer-*.tar")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	var paths []string
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		paths = append(paths, p)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sort.Strings(paths)
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				t.Fatal(err)
			}
		} else if !fi.Mode().IsRegular() && !fi.IsDir() {
			continue
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, p)
		h.Name = filepath.ToSlash(filepath.Join(prefix, rel))
		if fi.IsDir() {
			h.Name += "/"
		}
		h.Uname, h.Gname = "", ""
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if fi.Mode().IsRegular() {
			src, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	name := f.Name()
	l, err := tarball.LayerFromFile(name, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// bigImage is the real Debian image plus a layer of the host's Go toolchain
// (about 270 MB of real files): a realistic mix of a few large binaries and
// thousands of small sources, well over the 250 MB the scenarios ask for.
func bigImage(t *testing.T) v1.Image {
	t.Helper()
	img := testenv.DebianImage(t)
	goroot := "/usr/local/go"
	if _, err := os.Stat(goroot); err != nil {
		t.Skipf("no %s to build the large image from", goroot)
	}
	img, err := mutate.AppendLayers(img, hostTreeLayer(t, goroot, "opt/go"))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// rewriteOneFile copies a root filesystem tarball, replacing the contents of
// the first regular file of about 1 MB (same size, new bytes), and returns
// the new tarball and the file's name. The copy is kept in the test-data
// cache beside the original (its image layers are cached by path there).
func rewriteOneFile(t *testing.T, rootfsTar string) (string, string) {
	t.Helper()
	in, err := os.Open(rootfsTar)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	outName := filepath.Join(testenv.CacheDir(), "bench-one-file-changed.tar")
	out, err := os.Create(outName + ".tmp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(out.Name())
	defer out.Close()
	tr, tw := tar.NewReader(in), tar.NewWriter(out)
	changed := ""
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if changed == "" && h.Typeflag == tar.TypeReg && h.Size >= 900<<10 && h.Size <= 1200<<10 {
			changed = h.Name
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			for i := range b {
				b[i] ^= 0xa5
			}
			if _, err := io.Copy(tw, bytes.NewReader(b)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if _, err := io.Copy(tw, tr); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if changed == "" {
		t.Fatal("no file of about 1 MB in the root filesystem")
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if old, err := os.ReadFile(outName); err == nil {
		if cur, err := os.ReadFile(out.Name()); err == nil && bytes.Equal(old, cur) {
			return outName, changed // unchanged: keep its mtime, and so its cached layers
		}
	}
	if err := os.Rename(out.Name(), outName); err != nil {
		t.Fatal(err)
	}
	return outName, changed
}
