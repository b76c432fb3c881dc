package fetch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
)

// Image is a flat image opened from its registry: the decoded index, and the
// Registry source that reads its blocks.
type Image struct {
	ref               string
	digest            string
	index             *flat.Index
	indexRaw          []byte
	indexDsc          v1.Descriptor
	indexFromPeers    bool
	manifestRaw       []byte
	manifestDsc       v1.Descriptor
	manifestFromPeers bool
	public            bool
	registry          *Registry
}

// Manifest returns the flat manifest as the registry served it, and
// whether the image's repository is public.
func (im *Image) Manifest() Manifest {
	return Manifest{Desc: im.manifestDsc, Raw: im.manifestRaw, Public: im.public}
}

// Public reports whether the image's repository is public (Visibility):
// its manifest may come from peers, and peers share it with anyone.
func (im *Image) Public() bool { return im.public }

// IndexBlob returns the index blob's descriptor and bytes (verified), so
// the node can keep it where its peers can fetch it.
func (im *Image) IndexBlob() (v1.Descriptor, []byte) { return im.indexDsc, im.indexRaw }

// IndexFromPeers reports whether the index came from the IndexSource.
func (im *Image) IndexFromPeers() bool { return im.indexFromPeers }

// ManifestBlob returns the flat manifest's descriptor and bytes (they hash
// to the descriptor's digest, Digest), so the node can keep them where its
// peers can fetch them.
func (im *Image) ManifestBlob() (v1.Descriptor, []byte) { return im.manifestDsc, im.manifestRaw }

// ManifestFromPeers reports whether the manifest came from the
// IndexSource (as a ManifestSource) rather than the registry.
func (im *Image) ManifestFromPeers() bool { return im.manifestFromPeers }

// Index returns the image's decoded, validated index. Callers must not
// modify it.
func (im *Image) Index() *flat.Index { return im.index }

// Digest returns the digest of the flat image's manifest ("sha256:...").
func (im *Image) Digest() string { return im.digest }

// Ref returns the image's reference pinned to its digest
// ("registry/repo:tag@sha256:...", or "registry/repo@sha256:...").
func (im *Image) Ref() string { return im.ref }

// Registry returns the source that reads the image's blocks from the
// registry. It is made once per Image and shares its counters.
func (im *Image) Registry() *Registry { return im.registry }

// FlatRef names the flat form of the source image src as the converter
// pushes it by default: the same repository, tag "<tag>-shoal" (or
// "sha256-<hex>-shoal" for a digest reference).
func FlatRef(src string) (string, error) {
	r, err := name.ParseReference(src)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", src, err)
	}
	t, err := converter.DefaultDestination(r)
	if err != nil {
		return "", err
	}
	return t.Name(), nil
}

// OpenImage resolves ref, checks that it names a flat image, and downloads,
// verifies and decodes its index. ctx bounds the whole call and is not kept.
// Credentials come from the keychain (WithKeychain); the authenticated
// transport made here is the one the image's Registry source uses.
//
// With an IndexSource (WithIndexSource) the index comes from it if it can;
// if the source is also a ManifestSource, so does the manifest: the
// reference is resolved with a HEAD request (digest, size and media type,
// no body), the source is asked for those bytes, and the registry serves
// the manifest — by the HEAD's digest — only when the source cannot. A
// rollout of thousands of nodes then costs the registry a HEAD per node
// and about one copy of each blob, rather than a copy per node.
func OpenImage(ctx context.Context, ref string, opts ...Option) (*Image, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", ref, err)
	}
	r, err := name.ParseReference(ref, cfg.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	repo := r.Context()
	fail := func(what string, err error) (*Image, error) {
		return nil, fmt.Errorf("open %s: %s: %w", ref, what, err)
	}

	auth, err := authn.Resolve(ctx, cfg.keychain, repo)
	if err != nil {
		return fail("credentials", err)
	}
	var rt http.RoundTripper
	err = cfg.retry(ctx, "registry handshake", func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
		defer cancel()
		var err error
		// Manifests read through rt are bounded; blobs pass untouched.
		rt, err = transport.NewWithContext(ctx, repo.Registry, auth, bounded.Transport(cfg.transport), []string{repo.Scope(transport.PullScope)})
		return translate(err)
	})
	if err != nil {
		return fail("registry handshake", err)
	}

	// Only a public image's manifest may come from peers: holding a
	// private one's bytes is what a node proves to its peers.
	var public bool
	var head *v1.Descriptor
	if err := cfg.retry(ctx, "visibility probe", func(ctx context.Context) error {
		var err error
		public, head, err = cfg.visibility.Public(ctx, r, cfg.transport)
		return err
	}); err != nil {
		cfg.log.Debug("the repository's visibility is unknown; treating it as private", "component", "fetch", "ref", ref, "err", err)
	}
	mdesc, raw, fromPeers, err := resolveManifest(ctx, &cfg, ref, r, rt, public, head)
	if err != nil {
		return nil, err
	}
	m, err := flatManifest(ref, mdesc.MediaType, raw)
	if err != nil {
		return nil, err
	}
	if _, salted := m.Annotations[flat.AnnotationAccessSalt]; !public && !salted && cfg.indexSrc != nil {
		cfg.log.Warn("private flat image without an access salt: a peer that knew all its digests could pass for a reader; convert it again with this version",
			"component", "fetch", "ref", ref, "digest", mdesc.Digest.String())
	}
	fm := Manifest{Desc: mdesc, Raw: raw, Public: public}
	if cfg.onManifest != nil {
		cfg.onManifest(ctx, fm)
	}

	im := &Image{digest: mdesc.Digest.String(), manifestRaw: raw, manifestDsc: mdesc, manifestFromPeers: fromPeers, public: public}
	if t, ok := r.(name.Tag); ok {
		im.ref = t.Name() + "@" + im.digest
	} else {
		im.ref = repo.Digest(im.digest).Name()
	}
	reg := &Registry{cfg: &cfg, c: newBlobClient(&cfg, repo, rt), ref: im.ref, sched: newScheduler(2 * cfg.parallel)}

	layer := m.Layers[0]
	im.indexDsc = layer
	check := func(blob []byte) error {
		if err := checkBlob(layer, blob); err != nil {
			return err
		}
		x, err := flat.DecodeBlob(blob)
		if err != nil {
			return err
		}
		im.index, im.indexRaw = x, blob
		return nil
	}
	// Peers of the image hold its index: one copy from the registry serves
	// the swarm, as with blocks.
	if src := cfg.indexSrc; src != nil {
		blob, err := src.FetchIndex(ctx, fm, layer)
		if err == nil {
			err = check(blob)
		}
		if err == nil {
			im.indexFromPeers = true
		} else {
			cfg.log.Debug("index not had from peers; asking the registry", "component", "fetch", "ref", im.ref, "err", err)
		}
	}
	timeout := cfg.timeout + time.Duration(layer.Size/minIndexRate)*time.Second
	if im.index == nil {
		err = cfg.retry(ctx, "index", func(ctx context.Context) error {
			blob, err := reg.c.get(ctx, layer.Digest.String(), 0, layer.Size, layer.Size, true, timeout)
			if err != nil {
				return err
			}
			return check(blob)
		})
	}
	if err != nil {
		return fail("index", err)
	}
	if err := checkBlobs(im.index, m); err != nil {
		return fail("index", err)
	}
	reg.blobs = im.index.Blobs
	im.registry = reg
	cfg.log.Info("opened flat image", "component", "fetch", "ref", im.ref, "public", public,
		"manifest_from_peers", im.manifestFromPeers, "index_bytes", layer.Size, "index_from_peers", im.indexFromPeers,
		"blobs", len(im.index.Blobs), "blocks", len(im.index.Blocks), "entries", len(im.index.Entries))
	return im, nil
}

// resolveManifest resolves r to its manifest: its descriptor, its bytes
// (which hash to the descriptor's digest) and whether they came from the
// IndexSource as a ManifestSource. Without one, or for a private image
// (public false), it is one registry GET. With one, a HEAD — the
// visibility probe's (head), or one of its own, under the same retries and timeout as the
// GET) gives the descriptor, and the source is asked for the bytes; if the
// HEAD fails, the source fails, or its bytes are not the HEAD's, the
// registry serves the manifest — by the HEAD's digest when there was one,
// so that a tag moved meanwhile cannot mix two images; by r otherwise. An
// image index (as the HEAD's media type says) is not asked of the source:
// it has no flat form, and flatManifest says so.
func resolveManifest(ctx context.Context, cfg *config, ref string, r name.Reference, rt http.RoundTripper, public bool, head *v1.Descriptor) (v1.Descriptor, []byte, bool, error) {
	target := r
	if src, ok := cfg.indexSrc.(ManifestSource); ok && public {
		var err error
		if head == nil {
			err = cfg.retry(ctx, "manifest head", func(ctx context.Context) error {
				ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
				defer cancel()
				var err error
				head, err = remote.Head(r, remote.WithContext(ctx), remote.WithTransport(rt))
				return translate(err)
			})
		}
		switch {
		case err != nil:
			// A HEAD has no body to explain itself: the GET says why.
			cfg.log.Debug("manifest HEAD failed; asking the registry for the manifest", "component", "fetch", "ref", ref, "err", err)
		case head.MediaType.IsIndex():
			return *head, nil, false, nil
		case head.Size > bounded.MaxManifestSize:
			return v1.Descriptor{}, nil, false, fmt.Errorf("open %s: manifest of %d bytes (limit %d): %w", ref, head.Size, bounded.MaxManifestSize, bounded.ErrTooLarge)
		default:
			target = r.Context().Digest(head.Digest.String())
			raw, err := src.FetchManifest(ctx, *head)
			if err == nil {
				err = checkBlob(*head, raw)
			}
			if err == nil {
				return *head, raw, true, nil
			}
			cfg.log.Debug("manifest not had from peers; asking the registry", "component", "fetch", "ref", ref, "digest", head.Digest.String(), "err", err)
		}
	}
	var desc *remote.Descriptor
	err := cfg.retry(ctx, "manifest", func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
		defer cancel()
		var err error
		desc, err = remote.Get(target, remote.WithContext(ctx), remote.WithTransport(rt))
		return translate(err)
	})
	if err != nil {
		return v1.Descriptor{}, nil, false, fmt.Errorf("open %s: manifest: %w", ref, err)
	}
	return v1.Descriptor{MediaType: desc.MediaType, Size: int64(len(desc.Manifest)), Digest: desc.Digest}, desc.Manifest, false, nil
}

// checkBlob checks that blob is the one desc describes: its length, and its
// sha256 (the only digest algorithm accepted).
func checkBlob(desc v1.Descriptor, blob []byte) error {
	if desc.Digest.Algorithm != "sha256" {
		return fmt.Errorf("blob %s: only sha256 is supported", desc.Digest)
	}
	if int64(len(blob)) != desc.Size {
		return fmt.Errorf("blob %s: %d bytes, want %d", desc.Digest, len(blob), desc.Size)
	}
	if sum := sha256.Sum256(blob); hex.EncodeToString(sum[:]) != desc.Digest.Hex {
		return fmt.Errorf("blob %s hashes to sha256:%x", desc.Digest, sum)
	}
	return nil
}

// flatManifest parses raw, a manifest of media type mediaType, and checks
// that it is a flat image manifest. An image index is refused before raw is
// looked at (raw may be nil then).
func flatManifest(ref string, mediaType types.MediaType, raw []byte) (*v1.Manifest, error) {
	if mediaType.IsIndex() {
		return nil, fmt.Errorf("open %s: this is an image index (a multi-platform image) and has no flat form here; "+
			"convert it with `shoal convert %s`, which flattens one platform, then open its -shoal tag: %w", ref, ref, ErrNotFlat)
	}
	// raw may come from peers, not through the bounded transport.
	if err := bounded.CheckJSON(raw, "manifest"); err != nil {
		return nil, fmt.Errorf("open %s: %w", ref, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("open %s: parse manifest: %w", ref, err)
	}
	if m.Config.MediaType != flat.MediaTypeConfig || len(m.Layers) == 0 || m.Layers[0].MediaType != flat.MediaTypeIndex {
		hint := ref + flat.TagSuffix
		if fr, err := FlatRef(ref); err == nil {
			hint = fr
		}
		return nil, fmt.Errorf("open %s: this is a plain image (config %s) and has no flat form here; "+
			"convert it with `shoal convert %s`, then open %s: %w", ref, m.Config.MediaType, ref, hint, ErrNotFlat)
	}
	if v, ok := m.Annotations[flat.AnnotationFormat]; ok && v != strconv.Itoa(flat.Version) {
		return nil, fmt.Errorf("open %s: flat format version %s, this build reads version %d: %w", ref, v, flat.Version, ErrNotFlat)
	}
	for i, l := range m.Layers[1:] {
		if l.MediaType != flat.MediaTypeBlocks {
			return nil, fmt.Errorf("open %s: layer %d has media type %s, want %s: %w", ref, i+1, l.MediaType, flat.MediaTypeBlocks, flat.ErrMalformed)
		}
	}
	idx := m.Layers[0]
	if idx.Digest.Algorithm != "sha256" {
		return nil, fmt.Errorf("open %s: index digest %s: only sha256 is supported: %w", ref, idx.Digest, flat.ErrMalformed)
	}
	if idx.Size <= 0 || idx.Size > flat.MaxIndexSize {
		return nil, fmt.Errorf("open %s: index blob of %d bytes (limit %d): %w", ref, idx.Size, flat.MaxIndexSize, flat.ErrMalformed)
	}
	return m, nil
}

// checkBlobs checks that every data blob the index names is a layer of the
// manifest with the same size: the registry keeps only blobs a manifest
// references, so any other would 404 at the first read.
func checkBlobs(x *flat.Index, m *v1.Manifest) error {
	sizes := make(map[string]int64, len(m.Layers))
	for _, l := range m.Layers[1:] {
		sizes[l.Digest.String()] = l.Size
	}
	var errs []error
	for _, b := range x.Blobs {
		size, ok := sizes[b.Digest]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("data blob %s is not a layer of the manifest", b.Digest))
		case size != int64(b.Size):
			errs = append(errs, fmt.Errorf("data blob %s has %d bytes in the manifest, %d in the index", b.Digest, size, b.Size))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", flat.ErrMalformed, joinErrors(errs...))
	}
	return nil
}
