//go:build linux

package testenv

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// gunzipLayer streams a layer's tar through gzip(1): compress/flate is many
// times slower under the race detector, and the layers hold 500 MB.
func gunzipLayer(t *testing.T, l v1.Layer, fn func(*tar.Reader)) {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	cmd := exec.CommandContext(t.Context(), "gzip", "-dc")
	cmd.Stdin = rc
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fn(tar.NewReader(out))
	_, _ = io.Copy(io.Discard, out) // let gzip finish even if fn stopped early
	if err := cmd.Wait(); err != nil {
		t.Fatalf("gzip -dc: %v", err)
	}
}

func TestBigImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a 500 MB image from the host's toolchains (once, then cached)")
	}
	t.Parallel()
	img := BigImage(t)
	want, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := BigImage(t).Digest(); again != want {
		t.Errorf("second build: digest %s, want %s", again, want)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != numLayers+1 {
		t.Fatalf("%d layers, want %d", len(layers), numLayers+1)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(cf.Config.Env, func(e string) bool {
		return strings.HasPrefix(e, "PATH=") && strings.HasSuffix(e, ":/"+BigImageGoDir+"/bin")
	}) {
		t.Errorf("config Env %q: want /%s/bin on PATH", cf.Config.Env, BigImageGoDir)
	}

	// Flatten the regular-file sizes of all four layers; check layer 4's
	// determinism rules on the way.
	sizes := map[string]int64{}
	goVersion, err := os.ReadFile(filepath.Join(GoRoot, "VERSION"))
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		var deleted []string // whiteouts and opaque dirs, applied below this layer
		added := map[string]int64{}
		prev := ""
		gunzipLayer(t, l, func(tr *tar.Reader) {
			for {
				h, err := tr.Next()
				if errors.Is(err, io.EOF) {
					return
				}
				if err != nil {
					t.Fatalf("layer %d: %v", i+1, err)
				}
				name := cleanName(h.Name)
				dir, base := path.Split(name)
				switch {
				case base == ".wh..wh..opq":
					deleted = append(deleted, strings.TrimSuffix(dir, "/")+"/")
					continue
				case strings.HasPrefix(base, ".wh."):
					deleted = append(deleted, dir+strings.TrimPrefix(base, ".wh."))
					continue
				}
				if h.Typeflag == tar.TypeReg {
					added[name] = h.Size
				}
				if i != numLayers {
					continue
				}
				if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || h.ModTime.After(ImageEpoch) {
					t.Errorf("layer 4: %s: owner %d:%d (%q:%q), mtime %v", name, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime)
				}
				if prev != "" && !inWalkOrder(prev, name) {
					t.Errorf("layer 4: %s after %s", name, prev)
				}
				prev = name
				if name == BigImageGoDir+"/VERSION" {
					b, _ := io.ReadAll(tr)
					if string(b) != string(goVersion) {
						t.Errorf("%s = %q, want the host's %q", name, b, goVersion)
					}
				}
			}
		})
		for _, d := range deleted {
			for n := range sizes {
				if n == d || strings.HasPrefix(n, strings.TrimSuffix(d, "/")+"/") {
					delete(sizes, n)
				}
			}
		}
		for n, s := range added {
			sizes[n] = s
		}
	}
	var total int64
	for _, s := range sizes {
		total += s
	}
	fi, err := os.Stat(filepath.Join(GoRoot, "bin", "go"))
	if err != nil {
		t.Fatal(err)
	}
	if got := sizes[BigImageGoDir+"/bin/go"]; got != fi.Size() {
		t.Errorf("%s/bin/go: %d bytes, want the host's %d", BigImageGoDir, got, fi.Size())
	}
	if total < MinBigImageBytes {
		t.Errorf("flattened image holds %d bytes in %d regular files, want at least %d", total, len(sizes), MinBigImageBytes)
	}
	t.Logf("big image %s: %d regular files, %d bytes flattened", want, len(sizes), total)
}

// inWalkOrder reports whether filepath.WalkDir visits a before b: a is an
// ancestor of b, or at the first differing component a's is smaller.
func inWalkOrder(a, b string) bool {
	as, bs := strings.Split(a, "/"), strings.Split(b, "/")
	for i := range min(len(as), len(bs)) {
		if as[i] != bs[i] {
			return as[i] < bs[i]
		}
	}
	return len(as) < len(bs)
}
