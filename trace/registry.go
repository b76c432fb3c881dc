package trace

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/internal/bounded"
)

// Artifact layout in the registry (docs/traces.md):
//
//	manifest (application/vnd.oci.image.manifest.v1+json)
//	  artifactType: application/vnd.shoal.trace.v1+json
//	  config:       the empty descriptor (application/vnd.oci.empty.v1+json, "{}")
//	  layers:       [ the trace, application/vnd.shoal.trace.v1+json ]
//	  subject:      the flat image's manifest
//	  annotations:  org.opencontainers.image.created, io.shoal.trace.blocks
const (
	emptyMediaType = "application/vnd.oci.empty.v1+json"
	annCreated     = "org.opencontainers.image.created"
	annBlocks      = "io.shoal.trace.blocks"
	// maxTraceBytes bounds a trace blob read from a registry.
	maxTraceBytes = 64 << 20
)

// ErrNotFound means the registry holds no trace for the image.
var ErrNotFound = errors.New("trace: no usable trace published for this image")

// Push publishes t beside the flat image it belongs to (repo@t.Image in
// the repository of ref) as an OCI artifact whose subject is that image, and
// returns the artifact's manifest digest. The flat image and its tags are
// not modified.
func Push(ctx context.Context, ref string, t *Trace, nameOpts []name.Option, opts ...remote.Option) (string, error) {
	data, err := Marshal(t)
	if err != nil {
		return "", err
	}
	r, err := name.ParseReference(ref, nameOpts...)
	if err != nil {
		return "", fmt.Errorf("trace push: %w", err)
	}
	repo := r.Context()
	opts = append([]remote.Option{remote.WithContext(ctx)}, opts...)
	subject, err := remote.Head(repo.Digest(t.Image), opts...)
	if err != nil {
		return "", fmt.Errorf("trace push: the image %s@%s: %w", repo, t.Image, err)
	}

	layer := static.NewLayer(data, types.MediaType(MediaType))
	empty := static.NewLayer([]byte("{}"), types.MediaType(emptyMediaType))
	for _, l := range []v1.Layer{layer, empty} {
		if err := remote.WriteLayer(repo, l, opts...); err != nil {
			return "", fmt.Errorf("trace push: upload: %w", err)
		}
	}
	ld, _ := layer.Digest()
	ed, _ := empty.Digest()
	m := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        v1.Descriptor{MediaType: emptyMediaType, Digest: ed, Size: 2},
		Layers:        []v1.Descriptor{{MediaType: MediaType, Digest: ld, Size: int64(len(data))}},
		Subject:       &v1.Descriptor{MediaType: subject.MediaType, Digest: subject.Digest, Size: subject.Size},
		Annotations: map[string]string{
			annCreated: time.Now().UTC().Format(time.RFC3339Nano),
			annBlocks:  fmt.Sprint(len(t.Events)),
		},
	}
	raw, err := json.Marshal(struct {
		v1.Manifest
		ArtifactType string `json:"artifactType"`
	}{m, MediaType})
	if err != nil {
		return "", err
	}
	h, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return "", err
	}
	if err := remote.Put(repo.Digest(h.String()), rawManifest{raw}, opts...); err != nil {
		return "", fmt.Errorf("trace push: manifest: %w", err)
	}
	return h.String(), nil
}

type rawManifest struct{ raw []byte }

func (m rawManifest) RawManifest() ([]byte, error)        { return m.raw, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// Find returns the newest trace published for the flat image digest (in the
// repository of ref), or ErrNotFound. A trace that does not parse, or
// belongs to another image, is skipped; when none is usable the error
// wraps ErrNotFound and says why the newest was not. The manifests it
// reads are bounded (bounded.Transport over remote.DefaultTransport); a
// caller that passes its own transport should wrap it so.
func Find(ctx context.Context, ref, digest string, nameOpts []name.Option, opts ...remote.Option) (*Trace, error) {
	r, err := name.ParseReference(ref, nameOpts...)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	repo := r.Context()
	opts = append([]remote.Option{remote.WithContext(ctx), remote.WithFilter("artifactType", MediaType),
		remote.WithTransport(bounded.Transport(nil))}, opts...)
	idx, err := remote.Referrers(repo.Digest(digest), opts...)
	if err != nil {
		var te *transport.Error
		if errors.As(err, &te) && te.StatusCode == 404 {
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("trace: referrers of %s: %w", digest, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("trace: referrers of %s: %w", digest, err)
	}
	cands := make([]v1.Descriptor, 0, len(im.Manifests))
	for _, d := range im.Manifests {
		if d.ArtifactType == MediaType {
			cands = append(cands, d)
		}
	}
	// Newest first (RFC 3339 in UTC sorts as text).
	sort.SliceStable(cands, func(i, j int) bool {
		return cands[i].Annotations[annCreated] > cands[j].Annotations[annCreated]
	})
	var newest error
	for _, d := range cands {
		t, err := fetchTrace(repo, d.Digest, digest, opts)
		if err == nil {
			return t, nil
		}
		newest = cmp.Or(newest, err)
	}
	if newest != nil {
		// One line: the newest trace's reason stands for the others.
		return nil, fmt.Errorf("%w (%d published; the newest: %v)", ErrNotFound, len(cands), newest)
	}
	return nil, ErrNotFound
}

func fetchTrace(repo name.Repository, manifest v1.Hash, image string, opts []remote.Option) (*Trace, error) {
	desc, err := remote.Get(repo.Digest(manifest.String()), opts...)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", manifest, err)
	}
	var m v1.Manifest
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		return nil, fmt.Errorf("trace %s: manifest: %w", manifest, err)
	}
	if len(m.Layers) != 1 || string(m.Layers[0].MediaType) != MediaType || m.Layers[0].Size > maxTraceBytes {
		return nil, fmt.Errorf("trace %s: %w: not a trace artifact", manifest, ErrMalformed)
	}
	l, err := remote.Layer(repo.Digest(m.Layers[0].Digest.String()), opts...)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", manifest, err)
	}
	rc, err := l.Compressed() // verified against the digest as it is read
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", manifest, err)
	}
	defer rc.Close()
	// Decode reads to the end, so the digest is checked.
	t, err := Decode(rc, maxTraceBytes)
	if err != nil {
		return nil, fmt.Errorf("trace %s: %w", manifest, err)
	}
	if t.Image != image {
		return nil, fmt.Errorf("trace %s: %w: recorded for %s, not %s", manifest, ErrMalformed, t.Image, image)
	}
	return t, nil
}
