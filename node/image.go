package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
	"github.com/shoal-project/shoal/trace"
)

// Image is an image ready to mount: its index and the chain that reads its
// blocks.
type Image struct {
	Source   string          // the reference the user named
	Ref      string          // the flat image, pinned; "local:<source digest>" for a local conversion
	Local    bool            // converted on this node: every block is in the cache, pinned
	Index    *flat.Index     //
	Chain    *fetch.Chain    //
	Registry *fetch.Registry // nil for a local conversion
	Config   *v1.ConfigFile  // the source image's config (Env, WorkingDir, ...), if it could be read
	Digest   string          // the flat image's manifest digest; "" for a local conversion
	// SwarmName is the image's name in the swarm (Peers.ImageName); ""
	// for a local conversion.
	SwarmName string
	// Private says the image's repository is not public: its registry
	// refuses anonymous reads (or the configuration does not list it as
	// public), so peers share it only with nodes that prove they could
	// read it themselves, and it is never shown to unauthenticated
	// viewers.
	Private bool
	Trace   *trace.Trace // the newest start-up trace published for it, if any

	localKey string // a local conversion's source digest (hex): its kept index
}

func (n *Node) fetchOpts(kc authn.Keychain) []fetch.Option {
	opts := []fetch.Option{fetch.WithPlainHTTP(n.cfg.plainHTTP), fetch.WithLogger(n.cfg.log),
		fetch.WithKeychain(kc), fetch.WithVisibility(n.cfg.visibility)}
	if src, ok := n.cfg.peers.(fetch.IndexSource); ok {
		// The swarm is also a fetch.ManifestSource: OpenImage asks it for
		// the manifest too.
		opts = append(opts, fetch.WithIndexSource(src))
	}
	if n.cfg.peers != nil {
		opts = append(opts, fetch.WithOnManifest(n.keepManifest))
	}
	return opts
}

// keepManifest keeps a public flat manifest in the block cache, as a block
// whose ID is its digest, so that peers of the image can have it from here
// instead of the registry (fetch.ManifestSource). OpenImage calls it as
// soon as it has the manifest, before it fetches the index: the swarm's
// designated fetcher of the manifest must serve it while it waits for the
// index, which may come from a node that waits for the manifest. A private
// manifest is not shared: each node reads it from the registry itself.
func (n *Node) keepManifest(ctx context.Context, m fetch.Manifest) {
	if !m.Public || len(m.Raw) == 0 || len(m.Raw) > flat.MaxBlockSize {
		return
	}
	if err := n.store.Put(ctx, flat.Sum(m.Raw), m.Raw); err != nil {
		n.log.Debug("could not keep the manifest for peers", "manifest", m.Desc.Digest.String(), "err", err)
	}
}

func (n *Node) nameOpts() []name.Option {
	if n.cfg.plainHTTP {
		return []name.Option{name.Insecure}
	}
	return nil
}

func (n *Node) chainOpts() []fetch.Option {
	opts := []fetch.Option{fetch.WithLogger(n.cfg.log)}
	if n.cfg.observer != nil {
		opts = append(opts, fetch.WithObserver(n.cfg.observer))
	}
	return opts
}

// Resolve finds the flat form of ref (ref's tag + "-shoal", or ref itself if
// it is a flat image) and opens it. When there is none, it converts ref here
// (a full pull, as a standard client would), keeps every block in the cache,
// and says so in one notice line — unless WithoutFallback. It reads the
// registry with the node's credentials (WithKeychain).
func (n *Node) Resolve(ctx context.Context, ref string) (*Image, error) {
	return n.ResolveWith(ctx, ref, n.cfg.keychain)
}

// ResolveWith is Resolve with the credentials of one caller instead of the
// node's: everything this image reads from the registry, then and for as
// long as it is mounted, is read with kc (the snapshotter passes the
// credentials of the CRI pull that asked for the image).
func (n *Node) ResolveWith(ctx context.Context, ref string, kc authn.Keychain) (*Image, error) {
	if kc == nil {
		return nil, errors.New("resolve: nil keychain")
	}
	var im *fetch.Image
	var err error
	if flatRef, ferr := fetch.FlatRef(ref); ferr == nil && !strings.HasSuffix(refTag(ref), flat.TagSuffix) {
		im, err = fetch.OpenImage(ctx, flatRef, n.fetchOpts(kc)...)
		if err != nil && !errors.Is(err, fetch.ErrNotFound) && !errors.Is(err, fetch.ErrNotFlat) {
			return nil, openError(flatRef, err)
		}
	}
	if im == nil {
		im, err = fetch.OpenImage(ctx, ref, n.fetchOpts(kc)...)
		switch {
		case errors.Is(err, fetch.ErrNotFlat):
			if n.cfg.noFallback {
				return nil, fmt.Errorf("%s has no flat form (convert it with `shoal convert %s`)", ref, ref)
			}
			return n.convertLocally(ctx, ref, kc)
		case err != nil:
			return nil, openError(ref, err)
		}
	}
	var cache fetch.Cache = n.store
	sources := []fetch.Source{im.Registry()}
	swarmName := im.Digest()
	if p := n.cfg.peers; p != nil {
		swarmName = p.ImageName(im.Manifest())
		// Keep the index blob as a block, so peers of the image can have
		// it from here instead of the registry (fetch.IndexSource). The
		// manifest is kept already (keepManifest, during OpenImage).
		if desc, raw := im.IndexBlob(); len(raw) > 0 && len(raw) <= flat.MaxBlockSize {
			if err := n.store.Put(ctx, flat.Sum(raw), raw); err != nil {
				n.log.Debug("could not keep the index for peers", "image", im.Ref(), "index", desc.Digest.String(), "err", err)
			}
		}
		cache = announcingCache{Cache: n.store, peers: p}
		var registry fetch.Source = im.Registry()
		if srv, ok := p.(OriginServer); ok {
			// The registry, behind the cache, in one chain that both this
			// image's reads (after the peers) and the swarm's origin
			// fetches (for peers that ask this node as a block's
			// designated fetcher) go through, so that a block is fetched
			// once however many want it. No observer: the outer chain
			// reports what mounts read.
			// The swarm keeps the first such chain per image, shared by
			// every later mount of it.
			origin, err := fetch.NewChain(cache, []fetch.Source{im.Registry()}, fetch.WithLogger(n.cfg.log))
			if err != nil {
				return nil, err
			}
			registry = registrySource{srv.ServeOrigin(swarmName, origin)}
		}
		// One DHT lookup per image: the peers serving it then tell each
		// other what they hold. A failed join only means no peers yet.
		if err := p.JoinImage(ctx, swarmName, im.Index()); err != nil {
			n.log.Warn("could not join the image's swarm; using the registry", "image", im.Ref(), "err", err)
		}
		sources = []fetch.Source{p.PeerSource(swarmName), registry}
	}
	chain, err := fetch.NewChain(cache, sources, n.chainOpts()...)
	if err != nil {
		return nil, err
	}
	img := &Image{Source: ref, Ref: im.Ref(), Index: im.Index(), Chain: chain, Registry: im.Registry(), Digest: im.Digest(),
		Private: !im.Public(), SwarmName: swarmName}
	img.Config = n.sourceConfig(ctx, im.Ref(), im.Index().Source, kc)
	img.Trace = n.findTrace(ctx, im.Ref(), im.Digest(), kc)
	return img, nil
}

// openError is fetch.OpenImage's error for ref as the user sees it. One the
// registry answered (denied, not found, timed out) already names the
// reference and what failed; others get RegistryError's one line.
func openError(ref string, err error) error {
	if errors.Is(err, fetch.ErrDenied) || errors.Is(err, fetch.ErrNotFound) || errors.Is(err, fetch.ErrTimeout) {
		return err
	}
	return converter.RegistryError("open", ref, err)
}

func refTag(ref string) string {
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		return ref[i+1:]
	}
	return ""
}

// sourceConfig reads the source image's config (for its Env and working
// directory): two small requests, best effort.
func (n *Node) sourceConfig(ctx context.Context, flatRef, srcDigest string, kc authn.Keychain) *v1.ConfigFile {
	r, err := name.ParseReference(flatRef, n.nameOpts()...)
	if err != nil || srcDigest == "" {
		return nil
	}
	src := r.Context().Digest(srcDigest)
	img, err := remote.Image(src, remote.WithContext(ctx), remote.WithAuthFromKeychain(kc),
		remote.WithTransport(bounded.Transport(nil)))
	if err != nil {
		n.log.Debug("source config unavailable", "ref", src.String(), "err", err)
		return nil
	}
	cf, err := bounded.ConfigFile(img)
	if err != nil {
		n.log.Debug("source config unreadable", "ref", src.String(), "err", err)
		return nil
	}
	return cf
}

// convertLocally flattens ref on this node. The index is kept in
// indexes/<source digest> and every block is put in the cache and pinned:
// no registry can serve them again. A later call for the same source reuses
// both without pulling.
func (n *Node) convertLocally(ctx context.Context, ref string, kc authn.Keychain) (*Image, error) {
	r, err := name.ParseReference(ref, n.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	src, err := remote.Image(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(kc),
		remote.WithPlatform(converter.HostPlatform()), remote.WithTransport(bounded.Transport(nil)))
	if err != nil {
		return nil, converter.RegistryError("read", ref, err)
	}
	d, err := src.Digest()
	if err != nil {
		return nil, err
	}
	cf, _ := bounded.ConfigFile(src)
	chain, err := fetch.NewChain(n.store, nil, n.chainOpts()...)
	if err != nil {
		return nil, err
	}
	img := &Image{Source: ref, Ref: "local:" + d.String(), Local: true, Chain: chain, Config: cf, localKey: d.Hex}
	x, err := n.reuseLocal(ctx, d.Hex)
	if err == nil {
		img.Index = x
		n.trimLocalPins(ctx, d.Hex)
		return img, nil
	}
	held := x != nil // the kept index's pins are held: do not pin twice
	if n.cfg.notice != nil {
		fmt.Fprintf(n.cfg.notice, "shoal: %s has no flat form in its registry; converting it here (a full pull, as a standard client would)\n", ref)
	}
	res, flatImg, cleanup, err := converter.Build(ctx, src, converter.WithLogger(n.cfg.log))
	if err != nil {
		return nil, err
	}
	defer cleanup()
	// Pins before puts: no block is evicted between its put and its pin.
	if !held {
		if err := n.pinIndex(ctx, res.Index, +1); err != nil {
			return nil, errors.Join(fmt.Errorf("pin converted blocks: %w", err), n.pinIndex(context.WithoutCancel(ctx), res.Index, -1))
		}
	}
	blob, err := flat.EncodeBlob(res.Index)
	if err == nil {
		err = n.storeBlocks(ctx, res.Index, flatImg, d.Hex)
	}
	if err == nil {
		// No registry can serve these blocks again: make them durable
		// before the index that names them.
		err = n.store.Sync(ctx)
	}
	if err == nil {
		err = n.keepLocal(d.Hex, blob)
	}
	if err != nil {
		if !held {
			err = errors.Join(err, n.pinIndex(context.WithoutCancel(ctx), res.Index, -1))
		}
		return nil, err
	}
	img.Index = res.Index
	n.trimLocalPins(ctx, d.Hex)
	return img, nil
}

// storeBlocks reads the built data blobs and puts every block, verified, in
// the cache (the caller has pinned them). A cache full of pinned blocks
// releases the pins of other local images, least recently used first,
// before it gives up.
func (n *Node) storeBlocks(ctx context.Context, x *flat.Index, img v1.Image, keep string) error {
	byBlob := make(map[uint32][]flat.Block)
	for _, b := range x.Blocks {
		byBlob[b.Blob] = append(byBlob[b.Blob], b)
	}
	for bi, blocks := range byBlob {
		h, err := v1.NewHash(x.Blobs[bi].Digest)
		if err != nil {
			return err
		}
		l, err := img.LayerByDigest(h)
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		err = func() error {
			defer rc.Close()
			var pos uint64
			var comp []byte
			for _, b := range blocks { // in blob order
				if b.Offset > pos {
					if _, err := io.CopyN(io.Discard, rc, int64(b.Offset-pos)); err != nil {
						return err
					}
					pos = b.Offset
				}
				if cap(comp) < int(b.CLen) {
					comp = make([]byte, b.CLen)
				}
				comp = comp[:b.CLen]
				if _, err := io.ReadFull(rc, comp); err != nil {
					return err
				}
				pos += uint64(b.CLen)
				data, err := flat.DecodeBlock(b, comp, nil)
				if err != nil {
					return err
				}
				err = n.store.Put(ctx, b.ID, data)
				for errors.Is(err, blockstore.ErrFull) && n.releaseOldest(ctx, keep) {
					err = n.store.Put(ctx, b.ID, data)
				}
				if err != nil {
					return fmt.Errorf("cache block: %w", err)
				}
			}
			return nil
		}()
		if err != nil {
			return fmt.Errorf("store converted blocks: %w", err)
		}
	}
	return nil
}

func writeFileAtomic(p string, data []byte) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// runID is a fresh name for a run directory.
func runID(seed string) string {
	var rnd [8]byte
	f, err := os.Open("/dev/urandom")
	if err == nil {
		_, _ = io.ReadFull(f, rnd[:])
		f.Close()
	}
	h := sha256.Sum256(append([]byte(seed), rnd[:]...))
	return hex.EncodeToString(h[:6])
}
