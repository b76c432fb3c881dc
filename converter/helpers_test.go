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

// fileInfo is what the oracle comparison looks at for one entry.
type fileInfo struct {
	typ      flat.Type
	mode     uint32
	uid, gid uint32
	link     string
	sha      string
	xattrs   string
	dev      [2]uint32
}

// readFlat fetches a pushed flat image and returns its index and every
// regular file's contents (hard links resolved), verifying every block.
func readFlat(t testing.TB, ref string) (*flat.Index, map[string]fileInfo) {
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

func treeOf(t testing.TB, x *flat.Index, block func(flat.Block) []byte) map[string]fileInfo {
	t.Helper()
	cache := map[uint32][]byte{}
	out := map[string]fileInfo{}
	for i := range x.Entries {
		e := &x.Entries[i]
		if e.Path == "" {
			continue
		}
		src := &x.Entries[x.Resolve(i)]
		fi := fileInfo{typ: src.Type, mode: src.Mode, uid: src.UID, gid: src.GID, dev: [2]uint32{src.DevMajor, src.DevMinor}}
		if e.Type == flat.TypeSymlink {
			fi.link = e.Linkname
		}
		var xs []string
		for _, xa := range src.Xattrs {
			xs = append(xs, xa.Name+"="+string(xa.Value))
		}
		fi.xattrs = strings.Join(xs, ",")
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
			fi.sha = hex.EncodeToString(h.Sum(nil))
		}
		out[e.Path] = fi
	}
	return out
}

// extracted flattens img with go-containerregistry's mutate.Extract, which
// none of Shoal's code takes part in, and returns the same view as readFlat.
func extracted(t testing.TB, img v1.Image) map[string]fileInfo {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	out := map[string]fileInfo{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := strings.TrimPrefix(h.Name, "/")
		if p == "." || p == "" {
			continue
		}
		if _, seen := out[p]; seen {
			continue // Extract writes upper layers first: the first header wins
		}
		fi := fileInfo{mode: uint32(h.Mode) & 0o7777, uid: uint32(h.Uid), gid: uint32(h.Gid)}
		var xs []string
		ks := []string{}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, xattrPAXPrefix) {
				ks = append(ks, k)
			}
		}
		sortStrings(ks)
		for _, k := range ks {
			xs = append(xs, strings.TrimPrefix(k, xattrPAXPrefix)+"="+h.PAXRecords[k])
		}
		fi.xattrs = strings.Join(xs, ",")
		switch h.Typeflag {
		case tar.TypeDir:
			fi.typ = flat.TypeDir
		case tar.TypeReg:
			fi.typ = flat.TypeReg
			sum := sha256.New()
			if _, err := io.Copy(sum, tr); err != nil {
				t.Fatal(err)
			}
			fi.sha = hex.EncodeToString(sum.Sum(nil))
		case tar.TypeSymlink:
			fi.typ, fi.link = flat.TypeSymlink, h.Linkname
		case tar.TypeLink:
			target, ok := out[strings.TrimPrefix(h.Linkname, "/")]
			if !ok {
				t.Fatalf("extract: hard link %s to unseen %s", p, h.Linkname)
			}
			fi = target
		case tar.TypeChar, tar.TypeBlock:
			fi.typ = flat.TypeChar
			if h.Typeflag == tar.TypeBlock {
				fi.typ = flat.TypeBlock
			}
			fi.dev = [2]uint32{uint32(h.Devmajor), uint32(h.Devminor)}
		case tar.TypeFifo:
			fi.typ = flat.TypeFIFO
		}
		out[p] = fi
	}
	return out
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// compareTrees reports every difference between the oracle and the flat tree.
// Directories the flat tree made for parents a layer never listed are allowed.
func compareTrees(t testing.TB, want, got map[string]fileInfo) {
	t.Helper()
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: missing from flat image", p)
			continue
		}
		if g != w {
			t.Errorf("%s: flat %+v, extract %+v", p, g, w)
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok && g.typ != flat.TypeDir {
			t.Errorf("%s: in flat image only (%+v)", p, g)
		}
	}
}
