package converter

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// ent describes one tar entry of a synthetic layer.
type ent struct {
	name     string
	typ      byte
	body     string
	mode     int64
	link     string
	uid, gid int
	xattrs   map[string]string
}

func layerTar(t testing.TB, ents []ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link,
			Uid: e.uid, Gid: e.gid, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords[xattrPAXPrefix+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func imageOf(t testing.TB, layers ...[]ent) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		raw := layerTar(t, l)
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(raw)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: HostPlatform().Architecture})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// memRegistry starts go-containerregistry's in-memory registry.
func memRegistry(t testing.TB) string {
	t.Helper()
	s := httptest.NewServer(registry.New(registry.Logger(nopLogger())))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

func push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

// readFlat fetches a pushed flat image and returns its index and every
// regular file's contents (hard links resolved), verifying every block.
func readFlat(t testing.TB, ref string) (*flat.Index, testenv.Tree) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) == 0 || m.Layers[0].MediaType != flat.MediaTypeIndex {
		t.Fatalf("manifest has no index layer first: %+v", m.Layers)
	}
	blob := func(d v1.Hash) []byte {
		l, err := img.LayerByDigest(d)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		b, err := io.ReadAll(rc)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	x, err := flat.DecodeBlob(blob(m.Layers[0].Digest))
	if err != nil {
		t.Fatal(err)
	}
	blobs := map[string][]byte{}
	for _, b := range x.Blobs {
		if _, ok := blobs[b.Digest]; !ok {
			h, _ := v1.NewHash(b.Digest)
			blobs[b.Digest] = blob(h)
		}
	}
	return x, treeOf(t, x, func(b flat.Block) []byte {
		raw := blobs[x.Blobs[b.Blob].Digest][b.Offset : b.Offset+uint64(b.CLen)]
		out, err := flat.DecodeBlock(b, raw, nil)
		if err != nil {
			t.Fatal(err)
		}
		return out
	})
}

func treeOf(t testing.TB, x *flat.Index, block func(flat.Block) []byte) testenv.Tree {
	t.Helper()
	cache := map[uint32][]byte{}
	out := testenv.Tree{}
	for i := range x.Entries {
		e := &x.Entries[i]
		if e.Path == "" {
			continue
		}
		src := &x.Entries[x.Resolve(i)]
		fi := testenv.TreeEntry{Kind: src.Type.String(), Mode: src.Mode, UID: src.UID, GID: src.GID, Dev: [2]uint32{src.DevMajor, src.DevMinor}}
		if e.Type == flat.TypeSymlink {
			fi.Link = e.Linkname
		}
		var xs []string
		for _, xa := range src.Xattrs {
			xs = append(xs, xa.Name+"="+string(xa.Value))
		}
		fi.Xattrs = strings.Join(xs, ",")
		if src.Type == flat.TypeReg {
			h := sha256.New()
			for _, ex := range src.Extents {
				data, ok := cache[ex.Block]
				if !ok {
					data = block(x.Blocks[ex.Block])
					cache[ex.Block] = data
				}
				h.Write(data[ex.Offset : ex.Offset+ex.Length])
			}
			fi.SHA256 = hex.EncodeToString(h.Sum(nil))
		}
		out[e.Path] = fi
	}
	return out
}
