package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
	"github.com/shoal-project/shoal/snapshotter"
)

// SnapshotterConfig configures the containerd snapshotter the daemon
// serves (see docs/containerd.md): containerd's proxy plugin talks gRPC to
// it on Socket.
type SnapshotterConfig struct {
	Disabled bool   `yaml:"disabled"`
	Socket   string `yaml:"socket"` // default <state_dir>/snapshotter.sock
	Root     string `yaml:"root"`   // snapshots and their metadata; default <state_dir>/snapshotter
}

// SnapshotterSocketPath is where a daemon with state directory dir serves
// its containerd snapshotter by default.
func SnapshotterSocketPath(stateDir string) string {
	return filepath.Join(stateDir, "snapshotter.sock")
}

// startSnapshotter opens the snapshotter and serves it in g until ctx is
// done; it closes it (unmounting its flat mounts) before g's goroutine
// returns.
func (d *Daemon) startSnapshotter(ctx context.Context, g *errgroup.Group) error {
	c := d.cfg.Snapshotter
	if c.Disabled {
		return nil
	}
	if c.Socket == "" {
		c.Socket = SnapshotterSocketPath(d.cfg.StateDir)
	}
	if c.Root == "" {
		c.Root = filepath.Join(d.cfg.StateDir, "snapshotter")
	}
	sn, err := snapshotter.New(c.Root, snapshotRemote{d}, d.base)
	if err != nil {
		return err
	}
	sn.Adopt(ctx, d.held)
	ln, err := listenUnix(c.Socket)
	if err != nil {
		sn.Close()
		return fmt.Errorf("snapshotter: %w", err)
	}
	g.Go(func() error {
		err := snapshotter.Serve(ctx, sn, ln)
		return errors.Join(err, sn.Close())
	})
	d.log.Info("serving the containerd snapshotter", "socket", c.Socket, "root", c.Root)
	return nil
}

// snapshotRemote finds flat forms in the registry and mounts them as the
// daemon's own mounts, so they show in the status and the metrics.
type snapshotRemote struct{ d *Daemon }

var (
	_ snapshotter.Remote       = snapshotRemote{}
	_ snapshotter.LayerFetcher = snapshotRemote{}
)

// keychain is whose credentials the snapshotter reads registries with:
// with the CRI proxy on, those of the latest CRI pull of each repository
// (anonymous for a repository no pull named), never the daemon's own;
// without it, the daemon's (registry.docker_config), for `shoal pull` and
// ctr.
func (r snapshotRemote) keychain() authn.Keychain {
	if r.d.criCreds != nil {
		return r.d.criCreds.Keychain()
	}
	return r.d.keychain
}

func (r snapshotRemote) nameOpts() []name.Option {
	if r.d.cfg.PlainHTTP {
		return []name.Option{name.Insecure}
	}
	return nil
}

// Lookup reads two small manifests: the flat form's (beside ref's tag),
// whose source annotation must be manifest, and the source's, for its
// layers.
func (r snapshotRemote) Lookup(ctx context.Context, ref, manifest string) (snapshotter.RemoteImage, error) {
	var img snapshotter.RemoteImage
	src, err := name.ParseReference(ref, r.nameOpts()...)
	if err != nil {
		return img, fmt.Errorf("image reference %q: %w", ref, err)
	}
	ropts := []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(r.keychain()), remote.WithTransport(bounded.Transport(nil))}
	if manifest == "" {
		desc, err := remote.Head(src, ropts...)
		if err != nil {
			return img, converter.RegistryError("read", ref, err)
		}
		manifest = desc.Digest.String()
	}
	flatName, err := fetch.FlatRef(ref)
	if err != nil {
		return img, err
	}
	fr, err := name.ParseReference(flatName, r.nameOpts()...)
	if err != nil {
		return img, err
	}
	desc, err := remote.Get(fr, ropts...)
	if err != nil {
		var te *transport.Error
		if errors.As(err, &te) && te.StatusCode == http.StatusNotFound {
			return img, fmt.Errorf("%s: %w", flatName, snapshotter.ErrNoFlat)
		}
		return img, converter.RegistryError("read", flatName, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil || m.Config.MediaType != flat.MediaTypeConfig {
		return img, fmt.Errorf("%s is not a flat image: %w", flatName, snapshotter.ErrNoFlat)
	}
	if s := m.Annotations[flat.AnnotationSource]; s != manifest {
		return img, fmt.Errorf("%s was made from %s, not from %s: %w", flatName, s, manifest, snapshotter.ErrNoFlat)
	}
	if img.Layers, err = r.SourceLayers(ctx, ref, manifest); err != nil {
		return img, err
	}
	img.FlatRef = fr.Context().Digest(desc.Digest.String()).String()
	img.Manifest = manifest
	return img, nil
}

// SourceLayers reads the manifest with digest manifest in ref's repository.
func (r snapshotRemote) SourceLayers(ctx context.Context, ref, manifest string) ([]string, error) {
	src, err := name.ParseReference(ref, r.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	sd, err := remote.Get(src.Context().Digest(manifest), remote.WithContext(ctx), remote.WithAuthFromKeychain(r.keychain()),
		remote.WithTransport(bounded.Transport(nil)))
	if err != nil {
		return nil, converter.RegistryError("read", ref, err)
	}
	sm, err := v1.ParseManifest(bytes.NewReader(sd.Manifest))
	if err != nil {
		return nil, fmt.Errorf("manifest %s of %s: %w", manifest, ref, err)
	}
	layers := make([]string, 0, len(sm.Layers))
	for _, l := range sm.Layers {
		layers = append(layers, l.Digest.String())
	}
	return layers, nil
}

// FetchLayer opens a layer blob of ref's repository; the snapshotter
// verifies its digest.
func (r snapshotRemote) FetchLayer(ctx context.Context, ref, layer string) (io.ReadCloser, error) {
	src, err := name.ParseReference(ref, r.nameOpts()...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	l, err := remote.Layer(src.Context().Digest(layer), remote.WithContext(ctx), remote.WithAuthFromKeychain(r.keychain()))
	if err != nil {
		return nil, converter.RegistryError("read", ref, err)
	}
	rc, err := l.Compressed()
	if err != nil {
		return nil, converter.RegistryError("read", ref, err)
	}
	return rc, nil
}

// Mount mounts flatRef as a daemon mount at dir.
func (r snapshotRemote) Mount(ctx context.Context, flatRef, dir string) (io.Closer, error) {
	mi, err := r.d.Mount(ctx, MountRequest{Ref: flatRef, Dir: dir, keychain: r.keychain()})
	if err != nil {
		return nil, err
	}
	return closerFunc(func() error {
		if r.d.leaving() {
			return nil // the daemon stops, and the keeper keeps the mount
		}
		_, err := r.d.Unmount(UnmountRequest{ID: mi.ID})
		if errors.Is(err, errNoMount) {
			return nil // the daemon's shutdown got there first
		}
		return err
	}), nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }
