package converter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/flat"
)

// Config is the config blob of a flat image.
type Config struct {
	FormatVersion int         `json:"formatVersion"`
	Source        string      `json:"source"` // source manifest digest
	Platform      v1.Platform `json:"platform"`
	ImageBytes    int64       `json:"imageBytes"`
	Entries       int         `json:"entries"`
	Blocks        int         `json:"blocks"`
}

// blobLayer is a layer of the flat image: the index (in memory) or a data
// blob (a file on disk).
type blobLayer struct {
	digest v1.Hash
	size   int64
	media  types.MediaType
	data   []byte // when in memory
	path   string // when on disk
}

func (l *blobLayer) Digest() (v1.Hash, error)            { return l.digest, nil }
func (l *blobLayer) Size() (int64, error)                { return l.size, nil }
func (l *blobLayer) MediaType() (types.MediaType, error) { return l.media, nil }
func (l *blobLayer) Compressed() (io.ReadCloser, error) {
	if l.data != nil {
		return io.NopCloser(bytes.NewReader(l.data)), nil
	}
	f, err := os.Open(l.path)
	if err != nil {
		return nil, fmt.Errorf("open data blob: %w", err)
	}
	return f, nil
}

// flatImage is the OCI manifest of a flat image, built by hand so that every
// byte of it is determined by the content.
type flatImage struct {
	config   []byte
	manifest []byte
	layers   map[v1.Hash]*blobLayer
}

var _ partial.CompressedImageCore = (*flatImage)(nil)

func (im *flatImage) RawConfigFile() ([]byte, error)      { return im.config, nil }
func (im *flatImage) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }
func (im *flatImage) RawManifest() ([]byte, error)        { return im.manifest, nil }
func (im *flatImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if l, ok := im.layers[h]; ok {
		return l, nil
	}
	return nil, fmt.Errorf("flat image has no blob %s", h)
}

// newFlatImage assembles the manifest: the index blob first, then the data
// blobs in block-table order.
func newFlatImage(cfg Config, indexBlob []byte, blobs []blobFile) (v1.Image, error) {
	rawCfg, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgHash, cfgSize, err := v1.SHA256(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, err
	}
	idxHash, idxSize, err := v1.SHA256(bytes.NewReader(indexBlob))
	if err != nil {
		return nil, err
	}
	im := &flatImage{config: rawCfg, layers: map[v1.Hash]*blobLayer{}}
	m := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		ArtifactType:  flat.ArtifactType,
		Config:        v1.Descriptor{MediaType: flat.MediaTypeConfig, Digest: cfgHash, Size: cfgSize},
		Annotations: map[string]string{
			flat.AnnotationSource:     cfg.Source,
			flat.AnnotationFormat:     strconv.Itoa(flat.Version),
			flat.AnnotationAccessSalt: flat.AccessSalt(indexBlob),
		},
	}
	add := func(l *blobLayer) {
		im.layers[l.digest] = l
		m.Layers = append(m.Layers, v1.Descriptor{MediaType: l.media, Digest: l.digest, Size: l.size})
	}
	add(&blobLayer{digest: idxHash, size: idxSize, media: flat.MediaTypeIndex, data: indexBlob})
	for _, b := range blobs {
		h, err := v1.NewHash(b.digest)
		if err != nil {
			return nil, err
		}
		if _, dup := im.layers[h]; dup {
			continue // identical blobs are stored once
		}
		add(&blobLayer{digest: h, size: b.size, media: flat.MediaTypeBlocks, path: b.path})
	}
	if im.manifest, err = json.Marshal(m); err != nil {
		return nil, err
	}
	return partial.CompressedToImage(im)
}
