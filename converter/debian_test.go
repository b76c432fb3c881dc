//go:build linux && !race

// Heavy integration test (a 150–500 MB image end to end): built without the
// race detector, which slows it tenfold; `make test` runs it in a second pass.

package converter

import (
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestConvertDebianImage converts a real Debian root filesystem image (three
// layers with whiteouts, an opaque directory, hard links and symlinks) from
// the real docker-registry and checks the flat tree against
// go-containerregistry's own flattening, file by file.
func TestConvertDebianImage(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: real registry and Debian image")
	}
	t.Parallel()
	reg := testenv.StartRegistry(t)
	src := reg.Ref("debian:bookworm")
	img := testenv.PushDebianImage(t, src)

	res, err := Convert(t.Context(), src, "", WithPlainHTTP(true), quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("converted %d entries, %d files, %d bytes into %d blocks (%d compressed bytes, index %d bytes)",
		res.Stats.Entries, res.Stats.Files, res.Stats.ImageBytes, res.Stats.UniqueBlocks, res.Stats.CompressedBytes, res.Stats.IndexBytes)
	checkIndexLimits(t, res)
	x, got := readFlat(t, res.Ref)
	want := testenv.ExtractTree(t, img)
	testenv.CompareTrees(t, want, got)
	if len(want) < 3000 {
		t.Errorf("oracle saw only %d entries: is this really a Debian root filesystem?", len(want))
	}
	for _, p := range []string{testenv.WhitedOutFile, testenv.WhitedOutDir} {
		if _, ok := x.Lookup(p); ok {
			t.Errorf("%s survived its whiteout", p)
		}
	}
	if i, ok := x.Lookup(testenv.AddedHardlink); !ok || x.Entries[i].Type != flat.TypeHardlink {
		t.Errorf("%s is not a hard link", testenv.AddedHardlink)
	}
	if i, ok := x.Lookup("usr/bin/python3"); !ok || x.Entries[i].Type != flat.TypeSymlink {
		t.Errorf("usr/bin/python3 missing or not a symlink")
	}

	// The source tag still names the untouched source image.
	r, _ := name.ParseReference(src, name.Insecure)
	desc, err := remote.Head(r)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := img.Digest(); desc.Digest != d {
		t.Errorf("source tag now names %s, want %s", desc.Digest, d)
	}
	// Converting again gives the same flat image.
	again, err := Convert(t.Context(), src, reg.Ref("debian:again"), WithPlainHTTP(true), quiet())
	if err != nil {
		t.Fatal(err)
	}
	if again.Digest != res.Digest {
		t.Errorf("second conversion gave %s, first %s", again.Digest, res.Digest)
	}
}

// checkIndexLimits checks that a real image's index is far from the
// limits the decoder puts on hostile ones (flat.MaxIndexRatio and the
// rest): a change of the encoding that brought real indexes near them
// would make the limits refuse real images.
func checkIndexLimits(t *testing.T, res *Result) {
	t.Helper()
	raw, err := flat.Encode(res.Index)
	if err != nil {
		t.Fatal(err)
	}
	ratio := float64(len(raw)) / float64(res.Stats.IndexBytes)
	decoded := float64(res.Index.DecodedSize()) / float64(len(raw))
	t.Logf("index: %d bytes compressed, %d decompressed (%.1fx), decoded size %d (%.1fx)",
		res.Stats.IndexBytes, len(raw), ratio, res.Index.DecodedSize(), decoded)
	if ratio > flat.MaxIndexRatio/8 || decoded > flat.MaxDecodedRatio/4 || len(raw) > flat.MaxIndexSize/16 {
		t.Errorf("a real index comes near the decoder's limits (inflates %.1fx, limit %d; decodes %.1fx, limit %d; %d bytes, limit %d)",
			ratio, flat.MaxIndexRatio, decoded, flat.MaxDecodedRatio, len(raw), flat.MaxIndexSize)
	}
}
