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
