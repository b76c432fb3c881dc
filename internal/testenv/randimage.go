//go:build linux

package testenv

import (
	"runtime"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// RandomImage is an OCI image of layers random layers of size bytes each
// (OCI media types throughout, as clients that ask only for OCI manifests
// need), whose config names this machine's platform, so that containerd
// pulls and unpacks it.
func RandomImage(tb testing.TB, layers int, size int64) v1.Image {
	tb.Helper()
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	for range layers {
		l, err := random.Layer(size, types.OCILayer)
		if err != nil {
			tb.Fatalf("testenv: random layer: %v", err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			tb.Fatalf("testenv: %v", err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return img
}

// ImageBlobs lists the digests a pull of img reads: its manifest, its
// config and its layers, in that order.
func ImageBlobs(tb testing.TB, img v1.Image) []string {
	tb.Helper()
	m, err := img.Manifest()
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	d, err := img.Digest()
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	out := []string{d.String(), m.Config.Digest.String()}
	for _, l := range m.Layers {
		out = append(out, l.Digest.String())
	}
	return out
}
