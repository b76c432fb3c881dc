package bench

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/internal/testenv"
)

// bigImage is testenv.BigImage: the real Debian image plus a layer of the
// host's toolchains (Go at /opt/go, GCC's internals), about 510 MB of real
// files in all: a few large binaries among thousands of small sources.
func bigImage(t *testing.T) v1.Image {
	t.Helper()
	return testenv.BigImage(t)
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
