package converter

import (
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// TestConvertPicksPlatformFromIndex: an image index resolves to the host's
// platform by default and to --platform when given; Docker v2 manifests
// convert like OCI ones.
func TestConvertPicksPlatformFromIndex(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	host := HostPlatform()
	other := v1.Platform{OS: "linux", Architecture: "riscv64"}
	mk := func(p v1.Platform, marker string, docker bool) v1.Image {
		img := imageOf(t, []ent{{name: "etc/arch", body: marker}})
		cf, _ := img.ConfigFile()
		cf.Architecture, cf.Variant = p.Architecture, p.Variant
		img, err := mutate.ConfigFile(img, cf)
		if err != nil {
			t.Fatal(err)
		}
		if docker {
			img = mutate.MediaType(img, types.DockerManifestSchema2)
			img = mutate.ConfigMediaType(img, types.DockerConfigJSON)
		}
		return img
	}
	hostImg, otherImg := mk(host, "host", true), mk(other, "other", false)
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: otherImg, Descriptor: v1.Descriptor{Platform: &other}},
		mutate.IndexAddendum{Add: hostImg, Descriptor: v1.Descriptor{Platform: &host}},
	)
	pushIndex(t, reg+"/multi:v1", idx)

	for i, tc := range []struct {
		name string
		opts []Option
		want v1.Image
	}{
		{"default is the host", nil, hostImg},
		{"explicit platform", []Option{WithPlatform(other)}, otherImg},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := reg + "/multi:flat" + string(rune('a'+i))
			res, err := Convert(t.Context(), reg+"/multi:v1", dst, append(tc.opts, WithPlainHTTP(true), quiet())...)
			if err != nil {
				t.Fatal(err)
			}
			if d, _ := tc.want.Digest(); res.SourceDigest != d.String() {
				t.Errorf("converted %s, want %s", res.SourceDigest, d)
			}
		})
	}
}

func pushIndex(t *testing.T, ref string, idx v1.ImageIndex) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
}
