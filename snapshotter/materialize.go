package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/opencontainers/go-digest"
)

// LayerFetcher is what a Remote offers, optionally, to give placeholders
// real content: the source image's layers, from its registry.
type LayerFetcher interface {
	// SourceLayers returns the layer digests of the manifest with digest
	// manifest in ref's repository, bottom first.
	SourceLayers(ctx context.Context, ref, manifest string) ([]string, error)
	// FetchLayer opens the compressed blob with digest layer in ref's
	// repository.
	FetchLayer(ctx context.Context, ref, layer string) (io.ReadCloser, error)
}

// materialize gives placeholder id the content it stands for: the source
// image's layers from the bottom up to its own, downloaded, verified and
// applied in order into its directory (a full pull of those layers, which
// is what containerd would have done without Shoal). It then is an
// ordinary base that anything can be built on. It is needed only when
// another image shares the lower layers of a converted one.
func (s *Snapshotter) materialize(ctx context.Context, lf LayerFetcher, id string, labels map[string]string) error {
	s.matMu.Lock()
	defer s.matMu.Unlock()
	name := labels[snapshots.LabelSnapshotRef]
	// Another caller may have done it while this one waited.
	var cur snapshots.Info
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		_, cur, _, err = storage.GetInfo(ctx, name)
		return err
	}); err != nil {
		return fmt.Errorf("placeholder %s: %w", name, err)
	}
	if cur.Labels[LabelMaterialized] != "" {
		return nil
	}
	ref, manifest, layer := labels[LabelImageRef], labels[LabelPlaceholder], labels[LabelLayerDigest]
	fail := func(err error) error {
		return fmt.Errorf("%w: snapshot %s stands for layers of %s (manifest %s) and could not be filled from the registry: %w",
			ErrPlaceholder, name, ref, manifest, err)
	}
	layers, err := lf.SourceLayers(ctx, ref, manifest)
	if err != nil {
		return fail(err)
	}
	k := slices.Index(layers, layer)
	if k < 0 {
		return fail(fmt.Errorf("layer %s is not in the manifest", layer))
	}
	s.log.Info("materializing a placeholder: downloading its layers", "snapshot", name, "ref", ref, "layers", k+1)
	tmp, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	fsDir := filepath.Join(tmp, "fs")
	if err := os.Mkdir(fsDir, 0o755); err != nil {
		return err
	}
	for _, l := range layers[:k+1] {
		if err := applyLayer(ctx, lf, ref, l, fsDir); err != nil {
			return fail(err)
		}
	}
	dst := filepath.Join(s.root, "snapshots", id)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	_ = os.RemoveAll(s.upperPath(id))
	if err := os.Rename(fsDir, s.upperPath(id)); err != nil {
		return err
	}
	return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		info := snapshots.Info{Name: name, Labels: map[string]string{LabelMaterialized: manifest}}
		_, err := storage.UpdateInfo(ctx, info, "labels."+LabelMaterialized, "labels."+LabelPlaceholder)
		return err
	})
}

// applyLayer downloads one layer, checks its digest and applies it to dir
// (whiteouts remove what lower layers put there).
func applyLayer(ctx context.Context, lf LayerFetcher, ref, layer, dir string) error {
	d, err := digest.Parse(layer)
	if err != nil {
		return err
	}
	rc, err := lf.FetchLayer(ctx, ref, layer)
	if err != nil {
		return err
	}
	defer rc.Close()
	v := d.Verifier()
	dr, err := compression.DecompressStream(io.TeeReader(rc, v))
	if err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	defer dr.Close()
	if _, err := archive.Apply(ctx, dir, dr); err != nil {
		return fmt.Errorf("apply layer %s: %w", layer, err)
	}
	// The tar stream may end before the blob does (padding): read it all
	// before checking the digest.
	if _, err := io.Copy(io.Discard, dr); err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	if _, err := io.Copy(v, rc); err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	if !v.Verified() {
		return fmt.Errorf("layer %s: %w", layer, errors.New("the blob does not match its digest"))
	}
	return nil
}
