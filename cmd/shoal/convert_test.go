package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/trace"
)

// TestConvertTrace: `shoal convert --trace FILE` and `--published-trace`
// lay out a trace's files first; a trace that does not fit the image it
// names, or names an image the repository lacks, is one line of error.
func TestConvertTrace(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 8 {
		b := make([]byte, 40<<10)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		_ = tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%d", i), Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg})
		_, _ = tw.Write(b)
	}
	_ = tw.Close()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	src := host + "/app:v1"
	ref, _ := name.ParseReference(src, name.Insecure)
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	convert := func(args ...string) (code int, lead int, stderr string) {
		var so, se bytes.Buffer
		code = run(append([]string{"convert", "--plain-http", "--block-size", "16384", "--json"}, args...), &so, &se)
		var res struct {
			Stats struct {
				LeadFiles int `json:"lead_files"`
			} `json:"stats"`
		}
		if code == 0 {
			if err := json.Unmarshal(so.Bytes(), &res); err != nil {
				t.Fatalf("convert --json: %v\n%s", err, so.String())
			}
		}
		return code, res.Stats.LeadFiles, se.String()
	}
	if code, _, se := convert(src); code != 0 {
		t.Fatalf("convert: exit %d: %s", code, se)
	}
	im, err := fetch.OpenImage(t.Context(), host+"/app:v1-shoal", fetch.WithPlainHTTP(true))
	if err != nil {
		t.Fatal(err)
	}
	x := im.Index()
	// Start-up reads f5, then f2.
	tr := &trace.Trace{Version: trace.Version, Image: im.Digest(), Blocks: len(x.Blocks)}
	for _, p := range []string{"f5", "f2"} {
		i, _ := x.Lookup(p)
		for _, e := range x.Entries[i].Extents {
			b := x.Blocks[e.Block]
			if !slices.Contains(tr.BlockOrder(), e.Block) {
				tr.Events = append(tr.Events, trace.Event{Block: e.Block, Size: b.ULen, Stored: b.CLen})
			}
		}
	}
	dir := t.TempDir()
	write := func(name string, tr *trace.Trace) string {
		p := filepath.Join(dir, name)
		if err := trace.WriteFile(p, tr); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.json", tr)

	if code, lead, se := convert("--trace", good, src, host+"/app:traced"); code != 0 || lead < 2 {
		t.Fatalf("--trace: exit %d, %d lead files: %s", code, lead, se)
	}
	if code, lead, se := convert("--published-trace", src); code != 0 || lead != 0 || !strings.Contains(se, "no trace published") {
		t.Fatalf("--published-trace with none published: exit %d, %d lead files: %s", code, lead, se)
	}
	if _, err := trace.Push(t.Context(), host+"/app:v1-shoal", tr, []name.Option{name.Insecure}); err != nil {
		t.Fatal(err)
	}
	if code, lead, se := convert("--published-trace", src); code != 0 || lead < 2 {
		t.Fatalf("--published-trace: exit %d, %d lead files: %s", code, lead, se)
	}

	other := *tr
	other.Events = append([]trace.Event(nil), tr.Events...)
	other.Events[0].Size++
	elsewhere := *tr
	elsewhere.Image = "sha256:" + strings.Repeat("0", 64)
	for name, p := range map[string]string{
		"sizes of another image": write("other.json", &other),
		"image not in the repo":  write("elsewhere.json", &elsewhere),
		"no such file":           filepath.Join(dir, "none.json"),
	} {
		code, _, se := convert("--trace", p, src, host+"/app:bad")
		if code != 1 || strings.Count(strings.TrimSpace(se), "\n") > 0 {
			t.Errorf("%s: exit %d, want 1 and one line: %q", name, code, se)
		}
		t.Logf("%s: %s", name, strings.TrimSpace(se))
	}
	if code, _, _ := convert("--trace", good, "--published-trace", src); code != 2 {
		t.Errorf("--trace with --published-trace: exit %d, want 2", code)
	}
}
