package converter

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/internal/bounded"
	"github.com/shoal-project/shoal/internal/hostile"
	"github.com/shoal-project/shoal/internal/memcheck"
)

// imageOfBlob is an image of one zstd layer whose blob is blob.
func imageOfBlob(t testing.TB, blob []byte) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, static.NewLayer(blob, types.OCILayerZStd))
	if err != nil {
		t.Fatal(err)
	}
	if img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: HostPlatform().Architecture}); err != nil {
		t.Fatal(err)
	}
	return img
}

// windowLayer is a zstd layer blob whose frame asks for a window of
// 1<<windowLog bytes and holds n zeros (an empty tar, then zeros the
// converter drains to reach the end of the blob), padded with a skippable
// frame so that it inflates no more than the per-layer ratio allows.
func windowLayer(windowLog uint, n int64) []byte {
	blob := hostile.Zstd(windowLog, -1, hostile.Run(0, n))
	return append(blob, hostile.Skippable(int(n/150))...)
}

// A zstd layer whose frame asks for a 512 MiB window, klauspost's default
// limit, and fills it: 3.6 MB of blob (mostly padding) made the converter
// hold 540 MB, and convert the layer. The window is now refused at the
// frame header, in one line that names the limit; a layer at the limit
// (zstd's own, 128 MiB) converts, and costs what its window does.
func TestZstdLayerWindow(t *testing.T) {
	for _, tc := range []struct {
		name      string
		windowLog uint
		n         int64
		ok        bool
	}{
		{"512 MiB window", 29, 540 << 20, false},
		{"128 MiB window", 27, 160 << 20, true},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			convert := func(blob []byte) error {
				_, _, cleanup, err := Build(t.Context(), imageOfBlob(t, blob), quiet())
				if cleanup != nil {
					cleanup()
				}
				return err
			}
			blob := memcheck.UnderBar(t, func() []byte { return windowLayer(tc.windowLog, tc.n) }, func(blob []byte) string {
				return fmt.Sprint(convert(blob))
			})
			var err error
			got := memcheck.Allocated(func() { err = convert(blob) })
			t.Logf("%d-byte layer: %d bytes allocated: %v", len(blob), got, err)
			if tc.ok {
				if err != nil {
					t.Fatalf("a layer within the window limit: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "window over 128 MiB") {
				t.Fatalf("got %v, want ErrTooLarge naming the window limit", err)
			}
			if got > 32<<20 {
				t.Errorf("refusing the window allocated %d bytes", got)
			}
		})
	}
}

// rawImage is an image of no layers whose config is whatever bytes it is
// given: what a hostile registry serves.
type rawImage struct{ manifest, config []byte }

func (r rawImage) RawConfigFile() ([]byte, error)      { return r.config, nil }
func (r rawImage) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }
func (r rawImage) RawManifest() ([]byte, error)        { return r.manifest, nil }
func (r rawImage) LayerByDigest(v1.Hash) (partial.CompressedLayer, error) {
	return nil, errors.New("no layers")
}

func imageOfConfig(t testing.TB, config []byte) v1.Image {
	t.Helper()
	h, size, err := v1.SHA256(bytes.NewReader(config))
	if err != nil {
		t.Fatal(err)
	}
	m, err := json.Marshal(v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Size: size, Digest: h}})
	if err != nil {
		t.Fatal(err)
	}
	img, err := partial.CompressedToImage(rawImage{manifest: m, config: config})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// A source image whose config is 4 MiB of empty history entries: parsing
// it allocated 674 MB (and the conversion went on). The config is now
// refused before it is parsed, for the JSON values it holds.
func TestConfigBomb(t *testing.T) {
	bomb := func() []byte {
		n := (bounded.MaxConfigSize - 100) / 3
		return []byte(`{"os":"linux","history":[{}` + strings.Repeat(",{}", n-1) + `]}`)
	}
	convert := func(config []byte) error {
		_, _, cleanup, err := Build(t.Context(), imageOfConfig(t, config), quiet())
		if cleanup != nil {
			cleanup()
		}
		return err
	}
	config := memcheck.UnderBar(t, bomb, func(c []byte) string { return fmt.Sprint(convert(c)) })
	var err error
	got := memcheck.Allocated(func() { err = convert(config) })
	t.Logf("%d-byte config: %d bytes allocated: %v", len(config), got, err)
	if !errors.Is(err, bounded.ErrTooLarge) || !strings.Contains(err.Error(), "JSON values") {
		t.Fatalf("got %v, want bounded.ErrTooLarge for its JSON values", err)
	}
	if got > 32<<20 {
		t.Errorf("refusing the config allocated %d bytes", got)
	}
}
