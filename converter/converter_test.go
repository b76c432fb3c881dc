package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

func quiet() Option { return WithLogger(slog.New(slog.DiscardHandler)) }

// oracleLayers exercise whiteouts, opaque directories, hard links, symlinks
// replacing files and files replacing symlinks, xattrs, devices and owners.
func oracleLayers() [][]ent {
	big := strings.Repeat("0123456789abcdef", 40000) // 640 KB: spans blocks
	return [][]ent{
		{
			{name: "./", typ: tar.TypeDir, mode: 0o755},
			{name: "etc/", typ: tar.TypeDir},
			{name: "etc/passwd", body: "root:x:0:0::/root:/bin/sh\n"},
			{name: "etc/hostname", body: "lower\n"},
			{name: "etc/old/", typ: tar.TypeDir},
			{name: "etc/old/a", body: "a"},
			{name: "etc/old/sub/", typ: tar.TypeDir},
			{name: "etc/old/sub/b", body: "b"},
			{name: "usr/bin/", typ: tar.TypeDir},
			{name: "usr/bin/tool", body: "#!/bin/sh\necho tool\n", mode: 0o4755, uid: 0, gid: 50},
			{name: "usr/bin/tool-link", typ: tar.TypeLink, link: "usr/bin/tool"},
			{name: "usr/bin/alias", typ: tar.TypeSymlink, link: "tool"},
			{name: "usr/lib/big.bin", body: big},
			{name: "usr/lib/cap", body: "cap", xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02", "user.note": "hi"}},
			{name: "var/lib/data", body: "to be replaced by a symlink"},
			{name: "var/link-then-file", typ: tar.TypeSymlink, link: "/etc/passwd"},
			{name: "dev/null", typ: tar.TypeChar, mode: 0o666},
			{name: "run/fifo", typ: tar.TypeFifo},
			{name: "home/user/", typ: tar.TypeDir, uid: 1000, gid: 1000, mode: 0o700},
			{name: "home/user/.profile", body: "export X=1\n", uid: 1000, gid: 1000},
			{name: "opt/app/", typ: tar.TypeDir},
			{name: "opt/app/lib1", body: "lib1"},
			{name: "opt/app/lib2", body: "lib2"},
		},
		{
			{name: "etc/.wh.hostname"},
			{name: "etc/.wh.old"},
			{name: "var/lib/data", typ: tar.TypeSymlink, link: "../../etc/passwd"},
			{name: "var/link-then-file", body: "now a file"},
			{name: "opt/app/.wh..wh..opq"},
			{name: "opt/app/lib3", body: "lib3"},
			{name: "usr/lib/big.bin", body: big[:1000] + "changed" + big[1007:]},
			{name: "usr/share/doc/", typ: tar.TypeDir, mode: 0o750},
			{name: "usr/share/doc/README", body: "readme"},
			{name: "usr/share/doc/README.hard", typ: tar.TypeLink, link: "usr/share/doc/README"},
			{name: "/abs/file", body: "absolute name made relative"},
		},
		{
			{name: "etc/old/", typ: tar.TypeDir, mode: 0o700},
			{name: "etc/old/new", body: "recreated after whiteout"},
			{name: "home/user/", typ: tar.TypeDir, uid: 1000, gid: 1000, mode: 0o750},
			{name: "usr/bin/alias", typ: tar.TypeDir},
			{name: "usr/bin/alias/inside", body: "symlink replaced by a dir"},
			{name: "opt/app/lib4", body: "lib4"},
			{name: "opt/app/.wh..wh..opq"},
		},
	}
}

func TestConvertMatchesOracle(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	img := imageOf(t, oracleLayers()...)
	push(t, reg+"/oracle:v1", img)

	res, err := Convert(t.Context(), reg+"/oracle:v1", "", WithPlainHTTP(true), WithAvgBlockSize(64<<10), quiet())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.Ref, reg+"/oracle:v1-shoal@sha256:") {
		t.Errorf("pushed to %s, want the -shoal tag beside the source", res.Ref)
	}
	srcDigest, _ := img.Digest()
	if res.SourceDigest != srcDigest.String() || res.Index.Source != srcDigest.String() {
		t.Errorf("source digest %s / %s, want %s", res.SourceDigest, res.Index.Source, srcDigest)
	}
	x, got := readFlat(t, res.Ref)
	testenv.CompareTrees(t, testenv.ExtractTree(t, img), got)

	// Spot checks of semantics the oracle comparison alone would not name.
	for _, p := range []string{"etc/hostname", "etc/old/a", "etc/old/sub", "opt/app/lib1", "opt/app/lib2", "opt/app/lib3"} {
		if _, ok := got[p]; ok {
			t.Errorf("%s should be gone", p)
		}
	}
	for _, p := range []string{"opt/app/lib4", "etc/old/new", "abs/file", "usr/bin/alias/inside"} {
		if _, ok := got[p]; !ok {
			t.Errorf("%s should exist", p)
		}
	}
	i, _ := x.Lookup("usr/bin/tool-link")
	j, _ := x.Lookup("usr/share/doc/README.hard")
	if x.Entries[i].Type != flat.TypeHardlink || x.Entries[j].Type != flat.TypeHardlink {
		t.Errorf("hard links not kept as links: %v %v", x.Entries[i].Type, x.Entries[j].Type)
	}
	if i, _ := x.Lookup("home/user"); x.Entries[i].Mode != 0o750 {
		t.Errorf("upper layer's directory mode not applied: %o", x.Entries[i].Mode)
	}
}

func TestConvertIsDeterministic(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	push(t, reg+"/det:v1", imageOf(t, oracleLayers()...))
	var digests []string
	for i, workers := range []int{1, 4, 2} {
		dst := reg + "/det:out" + string(rune('a'+i))
		res, err := Convert(t.Context(), reg+"/det:v1", dst, WithPlainHTTP(true), WithWorkers(workers), WithAvgBlockSize(16<<10), quiet())
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, res.Digest)
	}
	if digests[0] != digests[1] || digests[1] != digests[2] {
		t.Errorf("same source gave different flat images: %v", digests)
	}
}

// The manifest carries the index's access salt, so its bytes cannot be
// rebuilt from the digests it names.
func TestConvertAccessSalt(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	push(t, reg+"/salt:v1", imageOf(t, oracleLayers()...))
	res, err := Convert(t.Context(), reg+"/salt:v1", "", WithPlainHTTP(true), WithAvgBlockSize(16<<10), quiet())
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(res.Ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	idx, err := img.LayerByDigest(m.Layers[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := idx.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	salt := m.Annotations[flat.AnnotationAccessSalt]
	if salt != flat.AccessSalt(blob) || len(salt) != 64 {
		t.Errorf("access salt %q, want %q", salt, flat.AccessSalt(blob))
	}
	if strings.Contains(salt, m.Layers[0].Digest.Hex) || salt == m.Config.Digest.Hex {
		t.Errorf("the salt is a digest the manifest names")
	}
}

func TestConvertRejectsUnsafeEntries(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	cases := []struct {
		name    string
		layer   []ent
		wantErr string
		absent  string
	}{
		{name: "dotdot", layer: []ent{{name: "../etc/passwd", body: "x"}}, wantErr: "climbs out of the image root"},
		{name: "nested dotdot", layer: []ent{{name: "a/../../b", body: "x"}}, wantErr: "climbs out of the image root"},
		{name: "rooted dotdot", layer: []ent{{name: "/../b", body: "x"}}, wantErr: "climbs out of the image root"},
		{name: "hardlink to nothing", layer: []ent{{name: "a", typ: tar.TypeLink, link: "missing"}}, wantErr: "missing or directory target"},
		{name: "long name", layer: []ent{{name: strings.Repeat("n", 300), body: "x"}}, wantErr: "longer than 255"},
		{name: "escaping symlink is dropped", layer: []ent{{name: "ok", body: "x"}, {name: "d/evil", typ: tar.TypeSymlink, link: "../../../etc/shadow"}}, absent: "d/evil"},
		{name: "escaping hard link is dropped", layer: []ent{{name: "ok", body: "x"}, {name: "evil", typ: tar.TypeLink, link: "../../etc/shadow"}}, absent: "evil"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ref := reg + "/unsafe:" + strings.ReplaceAll(tc.name, " ", "-")
			push(t, ref, imageOf(t, tc.layer))
			res, err := Convert(t.Context(), ref, "", WithPlainHTTP(true), quiet())
			if tc.wantErr != "" {
				if err == nil || !errors.Is(err, ErrUnsafe) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want ErrUnsafe containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error is more than one line: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := res.Index.Lookup(tc.absent); ok {
				t.Errorf("%s was kept", tc.absent)
			}
		})
	}
}

func TestConvertRefusesDecompressionBomb(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	zeros := string(make([]byte, 8<<20))
	push(t, reg+"/bomb:v1", imageOf(t, []ent{{name: "zeros", body: zeros}}))
	_, err := Convert(t.Context(), reg+"/bomb:v1", "", WithPlainHTTP(true), WithLimits(4<<20, 1000), quiet())
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("total limit: err = %v, want ErrTooLarge", err)
	}
	c := defaults()
	c.limits.ratioFloor = 1 << 20
	c.limits.maxRatio = 50
	ref, _ := name.ParseReference(reg+"/bomb:v1", name.Insecure)
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	c.log = slog.New(slog.DiscardHandler)
	if _, _, _, err := build(t.Context(), img, &c); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "inflates") {
		t.Fatalf("ratio limit: err = %v, want ErrTooLarge about the ratio", err)
	}
}

func TestConvertRegistryErrorsAreOneLine(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	push(t, reg+"/present:v1", imageOf(t, []ent{{name: "a", body: "a"}}))

	dead := httptest.NewServer(http.NotFoundHandler())
	deadHost := strings.TrimPrefix(dead.URL, "http://")
	dead.Close()

	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(auth.Close)
	authHost := strings.TrimPrefix(auth.URL, "http://")

	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "internal error", http.StatusInternalServerError)
	}))
	t.Cleanup(broken.Close)
	brokenHost := strings.TrimPrefix(broken.URL, "http://")

	tls := httptest.NewServer(registry.New(registry.Logger(nopLogger())))
	t.Cleanup(tls.Close)
	plainHost := strings.TrimPrefix(tls.URL, "http://")

	cases := []struct {
		name, src string
		plain     bool
		want      string
	}{
		{"missing tag", reg + "/present:nope", true, "not found"},
		{"missing repo", reg + "/absent:v1", true, "not found"},
		{"dead registry", deadHost + "/x:v1", true, "unreachable"},
		{"bad auth", authHost + "/x:v1", true, "access denied"},
		{"broken registry", brokenHost + "/x:v1", true, "registry failed (HTTP 500)"},
		{"https to plain http", plainHost + "/x:v1", false, ""},
		{"bad reference", "UPPER/Case::", true, "reference"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			_, err := Convert(ctx, tc.src, "", WithPlainHTTP(tc.plain), quiet())
			if err == nil {
				t.Fatal("no error")
			}
			if strings.Contains(err.Error(), "\n") || len(err.Error()) > 300 {
				t.Errorf("not one clear line: %q", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %q, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestConvertRejectsFlatSource(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	push(t, reg+"/twice:v1", imageOf(t, []ent{{name: "a", body: "a"}}))
	res, err := Convert(t.Context(), reg+"/twice:v1", "", WithPlainHTTP(true), quiet())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Convert(t.Context(), res.Ref, reg+"/twice:again", WithPlainHTTP(true), quiet()); err == nil || !strings.Contains(err.Error(), "already a shoal flat image") {
		t.Fatalf("err = %v", err)
	}
}

// TestBlockReuseAcrossVersions: two versions of an image that differ in one
// 1 MB file share almost all block bytes.
func TestBlockReuseAcrossVersions(t *testing.T) {
	t.Parallel()
	v1, v2 := versionPair(t, 64, 1<<20)
	shared, total := sharedBytes(t, v1, v2)
	if ratio := float64(shared) / float64(total); ratio < 0.95 {
		t.Errorf("v2 shares %.1f%% of its block bytes with v1, want at least 95%%", 100*ratio)
	}
}

// versionPair returns the indexes of two image versions with n random 1 MB
// files, differing in the contents of one file.
func versionPair(t testing.TB, n, size int) (*flat.Index, *flat.Index) {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	files := make([][]byte, n)
	for i := range files {
		files[i] = make([]byte, size)
		for j := range files[i] {
			files[i][j] = byte(rng.Uint32())
		}
	}
	mk := func() *flat.Index {
		var es []ent
		for i, f := range files {
			es = append(es, ent{name: "data/f" + string(rune('a'+i/26)) + string(rune('a'+i%26)), body: string(f)})
		}
		res, flatImg, cleanup, err := Build(t.Context(), imageOf(t, es), quiet())
		if err != nil {
			t.Fatal(err)
		}
		defer cleanup()
		_ = flatImg
		return res.Index
	}
	a := mk()
	mid := files[n/2]
	files[n/2] = bytes.Clone(mid)
	for j := range files[n/2] {
		files[n/2][j] ^= 0x5a
	}
	b := mk()
	files[n/2] = mid
	return a, b
}

func sharedBytes(t testing.TB, a, b *flat.Index) (shared, total int64) {
	t.Helper()
	have := map[flat.BlockID]bool{}
	for _, bl := range a.Blocks {
		have[bl.ID] = true
	}
	for _, bl := range b.Blocks {
		total += int64(bl.ULen)
		if have[bl.ID] {
			shared += int64(bl.ULen)
		}
	}
	return shared, total
}

// TestLayerSemantics covers the corner cases of applying layers where
// go-containerregistry's Extract is no oracle: whiteouts and opaque markers
// apply to lower layers only, wherever they stand in the tar; symlinks in
// parent paths are followed inside the root, as containerd does.
func TestLayerSemantics(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		layers  [][]ent
		present []string
		absent  []string
	}{
		{
			name: "whiteout then recreate",
			layers: [][]ent{
				{{name: "x", typ: tar.TypeSymlink, link: "y"}},
				{{name: ".wh.x"}, {name: "x/inside", body: "in"}},
			},
			present: []string{"x", "x/inside"},
		},
		{
			name: "recreate then whiteout",
			layers: [][]ent{
				{{name: "x", body: "old"}},
				{{name: "x", body: "new"}, {name: ".wh.x"}},
			},
			present: []string{"x"},
		},
		{
			name: "opaque after new entries",
			layers: [][]ent{
				{{name: "d/old", body: "old"}},
				{{name: "d/new", body: "new"}, {name: "d/.wh..wh..opq"}},
			},
			present: []string{"d/new"},
			absent:  []string{"d/old"},
		},
		{
			name: "opaque hides lower files below a relisted dir",
			layers: [][]ent{
				{{name: "d/a/old", body: "old"}, {name: "d/b/old", body: "old"}},
				{{name: "d/.wh..wh..opq"}, {name: "d/a/", typ: tar.TypeDir}},
			},
			present: []string{"d/a"},
			absent:  []string{"d/a/old", "d/b", "d/b/old"},
		},
		{
			name: "opaque keeps new files below an unlisted dir",
			layers: [][]ent{
				{{name: "d/a/old", body: "old"}},
				{{name: "d/.wh..wh..opq"}, {name: "d/a/new", body: "new"}},
			},
			present: []string{"d/a/new"},
			absent:  []string{"d/a/old"},
		},
		{
			name: "symlinked parent is followed",
			layers: [][]ent{
				{{name: "usr/lib/", typ: tar.TypeDir}, {name: "lib", typ: tar.TypeSymlink, link: "usr/lib"}},
				{{name: "lib/x", body: "x"}, {name: "usr/abs", typ: tar.TypeSymlink, link: "/usr/lib"}, {name: "usr/abs/y", body: "y"}},
			},
			present: []string{"lib", "usr/lib/x", "usr/lib/y"},
			absent:  []string{"lib/x"},
		},
		{
			name: "symlinked parent escaping is clamped to the root",
			layers: [][]ent{
				{{name: "up", typ: tar.TypeSymlink, link: "/../../.."}},
				{{name: "up/z", body: "z"}},
			},
			present: []string{"z", "up"},
		},
		{
			name:    "backslash is an ordinary character",
			layers:  [][]ent{{{name: `a\b`, body: "x"}}},
			present: []string{`a\b`},
			absent:  []string{"a/b"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			res, _, cleanup, err := Build(t.Context(), imageOf(t, tc.layers...), quiet())
			if err != nil {
				t.Fatal(err)
			}
			defer cleanup()
			for _, p := range tc.present {
				if _, ok := res.Index.Lookup(p); !ok {
					t.Errorf("%s missing", p)
				}
			}
			for _, p := range tc.absent {
				if _, ok := res.Index.Lookup(p); ok {
					t.Errorf("%s present", p)
				}
			}
		})
	}
}
