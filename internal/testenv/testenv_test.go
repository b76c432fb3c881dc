//go:build linux

package testenv

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func pushRandom(t *testing.T, ref string) v1.Image {
	t.Helper()
	img, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, remote.WithContext(t.Context())); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return img
}

func get(t *testing.T, url, rangeHeader string) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rangeHeader != "" {
		req.Header.Set("Range", rangeHeader)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func TestRegistryStopRestart(t *testing.T) {
	t.Parallel()
	reg := StartRegistry(t)
	if !strings.HasPrefix(reg.Host, "127.0.0.1:") {
		t.Fatalf("Host = %q, want a 127.0.0.1 address", reg.Host)
	}
	img := pushRandom(t, reg.Ref("random:v1"))
	want, _ := img.Digest()

	reg.Stop()
	reg.Stop() // idempotent
	if reg.Running() {
		t.Fatal("Running after Stop")
	}
	if _, _, err := get(t, reg.URL()+"/v2/", ""); err == nil {
		t.Fatal("GET /v2/ succeeded on a stopped registry")
	}

	reg.Restart()
	ref, _ := name.ParseReference(reg.Ref("random:v1"), name.Insecure)
	desc, err := remote.Head(ref, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatalf("HEAD after restart: %v", err)
	}
	if desc.Digest != want {
		t.Errorf("digest after restart = %s, want %s", desc.Digest, want)
	}

	var puts, heads int
	for _, e := range reg.AccessLog() {
		switch {
		case e.Method == http.MethodPut && strings.Contains(e.Path, "/manifests/v1"):
			puts++
		case e.Method == http.MethodHead && strings.Contains(e.Path, "/manifests/v1"):
			heads++
		}
	}
	if puts != 1 || heads < 1 {
		t.Errorf("access log: %d manifest PUTs and %d HEADs, want 1 and at least 1", puts, heads)
	}
}

// TestRegistryBasicAuth: a registry started WithBasicAuth refuses
// anonymous reads with a Basic challenge and serves its account.
func TestRegistryBasicAuth(t *testing.T) {
	t.Parallel()
	reg := StartRegistry(t, WithBasicAuth("alice", "s3cret"))
	ref, err := name.ParseReference(reg.Ref("private/app:v1"), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(16<<10, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context())); err == nil {
		t.Fatal("anonymous push succeeded")
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context()), remote.WithAuth(reg.Auth())); err != nil {
		t.Fatalf("push with the account: %v", err)
	}
	resp, _, err := get(t, reg.URL()+"/v2/private/app/manifests/v1", "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("anonymous GET: %s, WWW-Authenticate %q; want 401 with a Basic challenge", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	if _, err := remote.Head(ref, remote.WithContext(t.Context()), remote.WithAuth(&authn.Basic{Username: "alice", Password: "wrong"})); err == nil {
		t.Error("HEAD with a wrong password succeeded")
	}
	desc, err := remote.Head(ref, remote.WithContext(t.Context()), remote.WithAuth(reg.Auth()))
	if err != nil {
		t.Fatalf("HEAD with the account: %v", err)
	}
	if want, _ := img.Digest(); desc.Digest != want {
		t.Errorf("digest %s, want %s", desc.Digest, want)
	}
}

func TestCountingProxy(t *testing.T) {
	t.Parallel()
	reg := StartRegistry(t)
	proxy := reg.Proxy(t)

	// Pushing through the proxy works: the registry's upload Location URLs
	// must point back at the proxy.
	img := pushRandom(t, proxy.Ref("random:v1"))
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	digest, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	blobURL := fmt.Sprintf("%s/v2/random/blobs/%s", proxy.URL(), digest)

	tests := []struct {
		name      string
		rangeHdr  string
		wantBytes int64
		status    int
	}{
		{name: "whole blob", wantBytes: size, status: http.StatusOK},
		{name: "range", rangeHdr: "bytes=100-1099", wantBytes: 1000, status: http.StatusPartialContent},
	}
	for _, tt := range tests {
		proxy.Reset()
		if got := proxy.BytesServed(); got != 0 {
			t.Fatalf("%s: BytesServed after Reset = %d", tt.name, got)
		}
		resp, body, err := get(t, blobURL, tt.rangeHdr)
		if err != nil {
			t.Fatalf("%s: GET %s: %v", tt.name, blobURL, err)
		}
		if resp.StatusCode != tt.status || int64(len(body)) != tt.wantBytes {
			t.Fatalf("%s: got %s with %d bytes, want %d with %d", tt.name, resp.Status, len(body), tt.status, tt.wantBytes)
		}
		if got := proxy.BytesServed(); got != tt.wantBytes {
			t.Errorf("%s: BytesServed = %d, want %d", tt.name, got, tt.wantBytes)
		}
		reqs := proxy.Requests()
		if len(reqs) != 1 || reqs[0].Bytes != tt.wantBytes || reqs[0].Range != tt.rangeHdr || reqs[0].Status != tt.status {
			t.Errorf("%s: Requests = %+v", tt.name, reqs)
		}
	}

	// The registry's own access log agrees with the proxy.
	var logged int64
	for _, e := range reg.AccessLog() {
		if e.Method == http.MethodGet && strings.Contains(e.Path, "/blobs/"+digest.String()) {
			logged += e.Bytes
		}
	}
	if logged != size+1000 {
		t.Errorf("access log: %d blob bytes, want %d", logged, size+1000)
	}

	// A dead registry is a 502 from the proxy, not a hang.
	reg.Stop()
	resp, _, err := get(t, blobURL, "")
	if err != nil || resp.StatusCode != http.StatusBadGateway {
		t.Errorf("GET with the registry stopped: %v, %v; want 502", resp, err)
	}
}

// synthetic builds a small root filesystem tarball with each kind of entry the
// split must keep, and the paths layer 3 changes.
func synthetic(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 1, 2, 3, 4, 5, 600, time.UTC) // sub-second: must be truncated
	dir := func(n string) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeDir, Name: "./" + n + "/", Mode: 0o755, ModTime: mtime}
	}
	reg := func(n, content string) (*tar.Header, string) {
		return &tar.Header{Typeflag: tar.TypeReg, Name: "./" + n, Mode: 0o644, Size: int64(len(content)), ModTime: mtime, Uid: 100, Gid: 101}, content
	}
	type entry struct {
		h *tar.Header
		c string
	}
	var es []entry
	add := func(h *tar.Header, c string) { es = append(es, entry{h, c}) }
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: mtime}, "")
	for _, d := range []string{"dev", "etc", "usr", "usr/bin", "usr/lib", PythonStdlibDir, WhitedOutDir, "usr/local", "usr/local/bin", "usr/local/share", "usr/share", OpaqueDir, OpaqueDir + "/pkg"} {
		add(dir(d), "")
	}
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "./dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime}, "")
	add(reg(WhitedOutFile, "hello\n"))
	add(reg(OverwrittenFile, "host\n"))
	h, c := reg("usr/bin/ping", "ping")
	h.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
	add(h, c)
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "./usr/bin/ping6", Linkname: "./usr/bin/ping", ModTime: mtime}, "")
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "./usr/bin/python3", Linkname: "python3.11", Mode: 0o777, ModTime: mtime}, "")
	add(reg(PythonStdlibDir+"/os.py", "import sys\n"))
	add(reg(WhitedOutDir+"/topics.py", "topics = {}\n"))
	add(reg(OpaqueDir+"/pkg/copyright", "GPL\n"))
	for _, e := range es {
		if err := tw.WriteHeader(e.h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.c); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func split(t *testing.T, src []byte) [numLayers][]byte {
	t.Helper()
	var bufs [numLayers]bytes.Buffer
	var ws [numLayers]io.Writer
	for i := range bufs {
		ws[i] = &bufs[i]
	}
	if err := splitRootfs(bytes.NewReader(src), ws); err != nil {
		t.Fatalf("splitRootfs: %v", err)
	}
	var out [numLayers][]byte
	for i := range bufs {
		out[i] = bufs[i].Bytes()
	}
	return out
}

func tarEntries(t *testing.T, r io.Reader) (map[string]*tar.Header, map[string]string, []string) {
	t.Helper()
	hs := map[string]*tar.Header{}
	contents := map[string]string{}
	var order []string
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return hs, contents, order
		}
		if err != nil {
			t.Fatal(err)
		}
		n := strings.TrimSuffix(path.Clean(h.Name), "/")
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		hs[n], contents[n] = h, string(b)
		order = append(order, n)
	}
}

func TestSplitRootfs(t *testing.T) {
	t.Parallel()
	src := synthetic(t)
	a, b := split(t, src), split(t, src)
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			t.Errorf("layer %d differs between two splits of the same input", i+1)
		}
	}

	l1, _, _ := tarEntries(t, bytes.NewReader(a[0]))
	l2, _, _ := tarEntries(t, bytes.NewReader(a[1]))
	for _, n := range []string{PythonStdlibDir + "/os.py", WhitedOutDir} {
		if l2[n] == nil || l1[n] != nil {
			t.Errorf("%s: want it in layer 2 only", n)
		}
	}
	ping := l1["usr/bin/ping"]
	if ping == nil || ping.PAXRecords["SCHILY.xattr.security.capability"] != "\x01\x00\x00\x02" || ping.Uid != 100 || ping.Gid != 101 {
		t.Errorf("usr/bin/ping lost its xattr or owner: %+v", ping)
	}
	if !ping.ModTime.Equal(time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Errorf("mtime = %v, want it truncated to the second", ping.ModTime)
	}
	if h := l1["usr/bin/ping6"]; h == nil || h.Typeflag != tar.TypeLink || h.Linkname != "usr/bin/ping" {
		t.Errorf("hard link: %+v", h)
	}
	if h := l1["dev/null"]; h == nil || h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
		t.Errorf("device node: %+v", h)
	}
	if l1[""] != nil || l1["."] != nil {
		t.Error("the root directory entry was kept")
	}

	// Compressed and cached, the same input gives the same digests.
	srcPath := filepath.Join(t.TempDir(), "rootfs.tar")
	if err := os.WriteFile(srcPath, src, 0o644); err != nil {
		t.Fatal(err)
	}
	var metas [2][]layerMeta
	for i := range metas {
		dir := t.TempDir()
		meta, err := writeLayerFiles(t.Context(), srcPath, dir)
		if err != nil {
			t.Fatalf("writeLayerFiles: %v", err)
		}
		metas[i] = meta
		if _, err := imageFromLayers(dir, meta, "synthetic"); err != nil {
			t.Fatal(err)
		}
	}
	if !reflect.DeepEqual(metas[0], metas[1]) {
		t.Errorf("two builds of the same input: %+v and %+v", metas[0], metas[1])
	}
	for i, m := range metas[0] {
		if want := sha256.Sum256(a[i]); m.DiffID.Hex != hex.EncodeToString(want[:]) {
			t.Errorf("layer %d: diffID %s, want sha256 of the split layer", i+1, m.DiffID)
		}
	}

	// Flattened, the layers must show layer 3's changes.
	img := empty.Image
	for i, data := range a {
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatalf("layer %d: %v", i+1, err)
		}
	}
	checkFlattened(t, img, false)
}

// checkFlattened checks the effect of layer 3 on a flattened image and
// returns the number of entries and the bytes of regular files.
func checkFlattened(t *testing.T, img v1.Image, debian bool) (entries int, size int64) {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	hs, contents, order := tarEntries(t, rc)
	for _, h := range hs {
		if h.Typeflag == tar.TypeReg {
			size += h.Size
		}
	}

	if h := hs["usr/bin/python3"]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "python3.11" {
		t.Errorf("usr/bin/python3: %+v, want a symlink to python3.11", h)
	}
	for _, n := range []string{WhitedOutFile, WhitedOutDir, WhitedOutDir + "/topics.py"} {
		if hs[n] != nil {
			t.Errorf("%s survived its whiteout", n)
		}
	}
	for n := range hs {
		if strings.HasPrefix(n, OpaqueDir+"/") && n != OpaqueDirFile && n != path.Dir(OpaqueDirFile) {
			t.Errorf("%s survived the opaque directory %s", n, OpaqueDir)
			break
		}
		if strings.Contains(n, ".wh.") {
			t.Errorf("whiteout marker %s in the flattened tree", n)
		}
	}
	if hs[OpaqueDir] == nil || hs[OpaqueDirFile] == nil {
		t.Errorf("%s or %s missing", OpaqueDir, OpaqueDirFile)
	}
	if contents[OverwrittenFile] != OverwrittenContent {
		t.Errorf("%s = %q, want %q", OverwrittenFile, contents[OverwrittenFile], OverwrittenContent)
	}
	if contents[AddedFile] != AddedContent {
		t.Errorf("%s = %q", AddedFile, contents[AddedFile])
	}
	if h := hs[AddedHardlink]; h == nil || h.Typeflag != tar.TypeLink || h.Linkname != AddedFile {
		t.Errorf("%s: %+v, want a hard link to %s", AddedHardlink, h, AddedFile)
	}
	if h := hs[AddedSymlink]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != AddedSymlinkTarget {
		t.Errorf("%s: %+v", AddedSymlink, h)
	}
	if h := hs["dev/null"]; h == nil || h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
		t.Errorf("dev/null: %+v", h)
	}
	if debian {
		for _, n := range []string{"usr/bin/python3.11", PythonStdlibDir + "/json/__init__.py", PythonStdlibDir + "/http/server.py", "usr/bin/bash"} {
			if h := hs[n]; h == nil || h.Typeflag != tar.TypeReg || h.Size == 0 {
				t.Errorf("%s missing or empty: %+v", n, h)
			}
		}
		if h := hs["usr/bin/perl5.36.0"]; h == nil || h.Typeflag != tar.TypeLink {
			t.Errorf("debootstrap's hard link usr/bin/perl5.36.0: %+v", h)
		}
	}
	return len(order), size
}

func TestDebianImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and pushes a Debian image (debootstrap on the first run)")
	}
	t.Parallel()
	reg := StartRegistry(t)
	ref := reg.Ref("debian:bookworm")
	pushed := PushDebianImage(t, ref)
	want, err := pushed.Digest()
	if err != nil {
		t.Fatal(err)
	}

	// The same tarball gives the same image.
	if again, _ := DebianImage(t).Digest(); again != want {
		t.Errorf("second build: digest %s, want %s", again, want)
	}

	proxy := reg.Proxy(t)
	r, err := name.ParseReference(proxy.Ref("debian:bookworm"), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithContext(t.Context()), remote.WithPlatform(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}))
	if err != nil {
		t.Fatalf("pull %s: %v", r, err)
	}
	if got, _ := img.Digest(); got != want {
		t.Errorf("pulled digest %s, want %s", got, want)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != numLayers {
		t.Fatalf("%d layers, want %d", len(layers), numLayers)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH || len(cfg.RootFS.DiffIDs) != numLayers {
		t.Errorf("config: os %s arch %s, %d diff IDs", cfg.OS, cfg.Architecture, len(cfg.RootFS.DiffIDs))
	}

	proxy.Reset()
	var compressed int64
	for _, l := range layers {
		s, _ := l.Size()
		compressed += s
	}
	entries, size := checkFlattened(t, img, true)
	if got := proxy.BytesServed(); got != compressed {
		t.Errorf("proxy counted %d bytes for the layers, want %d", got, compressed)
	}
	t.Logf("image %s: %d layers, %d bytes gzipped, flattened %d entries, %d bytes in regular files", want, len(layers), compressed, entries, size)
}
