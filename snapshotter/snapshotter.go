// Package snapshotter is Shoal's containerd snapshotter: containerd's
// snapshots.Snapshotter, served over gRPC on a unix socket (containerd's
// proxy plugin interface, as the stargz and Nydus snapshotters are), so
// that `ctr run --snapshotter shoal` and CRI start containers from a lazy
// mount of an image's flat form instead of a full pull.
//
// # Remote snapshots
//
// containerd's unpacker prepares one snapshot per layer, bottom up, each
// named by the chain ID of the layers so far and labelled
// containerd.io/snapshot.ref. When the pull also passed the image's
// reference and manifest digest as labels (CRI does with
// disable_snapshot_annotations = false; `shoal pull` does for ctr), this
// snapshotter looks for the image's flat form beside its tag and checks
// that the flat manifest names that very manifest as its source. If it
// does, it commits the layer's snapshot itself and answers AlreadyExists,
// and containerd neither downloads nor unpacks the layer.
//
// A flat image holds every layer merged, so it maps onto the chain like
// this: the top layer's snapshot is the whole flat image (a lazy FUSE
// mount the daemon serves, made when something first needs its mounts),
// and the layers below it are placeholders with no content. That way the
// one snapshot whose content the flat image really is — the full chain,
// which is what containers are made from — is the only one that claims
// it. A placeholder's name is the chain ID of a partial stack that
// another image may share. When something is built on one (an unconverted
// image with the same base layers, pulled later), the placeholder is
// materialized: the layers it stands for are downloaded from the source
// image's registry, verified and applied into its directory, as containerd
// would have done — never given the flat image's content, which has the
// upper layers too.
//
// Everything else is an ordinary overlay snapshotter, laid out like
// containerd's own (snapshots/<id>/fs and work, metadata in containerd's
// bbolt metastore): an image with no flat form, or whose flat form belongs
// to another manifest, is downloaded and unpacked by containerd as usual,
// so nothing fails because Shoal is present. A container's snapshot is an
// overlay with the flat mount (and any ordinary layers above it) as lower
// directories and its own upper and work directories.
//
// Mounts do not survive the daemon; snapshots do (the metastore). A flat
// snapshot's mount is made again the first time its mounts are asked for
// after a restart.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Labels containerd's CRI plugin (and `shoal pull`) put on the layers of an
// image being pulled; containerd passes them to Prepare.
const (
	LabelImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	LabelLayerDigest    = "containerd.io/snapshot/cri.layer-digest"
)

// Labels this snapshotter keeps on the snapshots it commits itself. Callers
// cannot change or remove them (Update keeps them).
const (
	// LabelFlat is the pinned flat image a snapshot's content is.
	LabelFlat = "dev.shoal.snapshot/flat"
	// LabelPlaceholder marks a layer below a flat snapshot: it has no
	// content of its own. The value is the source manifest digest.
	LabelPlaceholder = "dev.shoal.snapshot/placeholder"
	// LabelMaterialized marks a former placeholder whose layers were
	// downloaded and applied into its own directory: its content is the
	// whole stack up to it. The value is the source manifest digest.
	LabelMaterialized = "dev.shoal.snapshot/materialized"
)

// ownLabelKeys are the labels only the snapshotter sets.
var ownLabelKeys = []string{LabelFlat, LabelPlaceholder, LabelMaterialized}

// ErrNoFlat is what Remote.Lookup returns for an image that has no usable
// flat form; the snapshotter then falls back to an ordinary unpack.
var ErrNoFlat = errors.New("no flat form")

// ErrPlaceholder is returned when a snapshot's content would come from a
// placeholder (a partial layer stack that only exists as part of a flat
// image).
var ErrPlaceholder = errors.New("layer is a Shoal placeholder")

// RemoteImage is an image's flat form, as Lookup found it.
type RemoteImage struct {
	FlatRef  string   // the flat image, pinned by digest
	Manifest string   // the source manifest's digest
	Layers   []string // the source manifest's layer digests, bottom first
}

// Remote is what the snapshotter needs from the node: find an image's flat
// form and mount it lazily. The daemon implements it.
type Remote interface {
	// Lookup finds the flat form of the image ref whose manifest digest is
	// manifest ("" for whatever ref names now). It returns ErrNoFlat
	// (wrapped) when there is none or it was made from another manifest.
	Lookup(ctx context.Context, ref, manifest string) (RemoteImage, error)
	// Mount mounts the flat image flatRef read-only at dir; Close unmounts.
	Mount(ctx context.Context, flatRef, dir string) (io.Closer, error)
}

// Snapshotter implements snapshots.Snapshotter.
type Snapshotter struct {
	root   string
	ms     *storage.MetaStore
	remote Remote
	log    *slog.Logger

	mountMu sync.Mutex           // held while mounting: one mount per snapshot
	mounted map[string]io.Closer // flat mounts by snapshot id
	closed  bool                 // no more mounts
	bg      sync.WaitGroup       // mounts started at pull time

	matMu sync.Mutex // one placeholder materialized at a time

	// dirMu orders Cleanup against snapshot creation: a snapshot's
	// directory is renamed into place inside the transaction that creates
	// it, so a Cleanup that read the IDs before that transaction committed
	// and the directory listing after the rename took the new snapshot's
	// directory for a leftover and removed it (containerd garbage-collects
	// during a pull: "symlink usr/bin …/snapshots/8/fs/bin: no such file or
	// directory"). Creation holds it shared, Cleanup exclusively.
	dirMu sync.RWMutex

	mu      sync.Mutex
	lookups map[string]lookup // by image ref + manifest digest
}

type lookup struct {
	img RemoteImage
	err error
	at  time.Time
}

// noFlatTTL is how long a "no flat form" answer is believed: the image may
// be converted in the meantime. A flat form, once found for a manifest,
// stays valid.
const noFlatTTL = 30 * time.Second

var _ snapshots.Snapshotter = (*Snapshotter)(nil)

// New opens (creating) the snapshotter's root directory: metadata.db and
// snapshots/. remote nil turns remote snapshots off (an overlay
// snapshotter only).
func New(root string, remote Remote, log *slog.Logger) (*Snapshotter, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(filepath.Join(root, "snapshots"), 0o700); err != nil {
		return nil, fmt.Errorf("snapshotter root: %w", err)
	}
	// Opened now, not at the first call: a metastore another process holds
	// (two daemons on one root) is an error at start, after a short wait.
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = 5 * time.Second
		return nil
	})
	if err == nil {
		err = ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil })
	}
	if err != nil {
		return nil, fmt.Errorf("snapshotter metadata in %s: %w", root, err)
	}
	// Directories of snapshots a crash interrupted while they were being made.
	if tmp, _ := filepath.Glob(filepath.Join(root, "snapshots", "new-*")); len(tmp) > 0 {
		for _, d := range tmp {
			_ = os.RemoveAll(d)
		}
	}
	return &Snapshotter{root: root, ms: ms, remote: remote, log: log.With("component", "snapshotter"),
		mounted: map[string]io.Closer{}, lookups: map[string]lookup{}}, nil
}

// Close unmounts every flat mount and closes the metastore.
func (s *Snapshotter) Close() error {
	s.mountMu.Lock()
	s.closed = true
	s.mountMu.Unlock()
	s.bg.Wait()
	s.mountMu.Lock()
	var errs []error
	for id, c := range s.mounted {
		errs = append(errs, c.Close())
		delete(s.mounted, id)
	}
	s.mountMu.Unlock()
	errs = append(errs, s.ms.Close())
	return errors.Join(errs...)
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}
func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "work")
}
func (s *Snapshotter) flatPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "flat")
}

// Stat returns the info of a snapshot by name or key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates a snapshot's labels; this snapshotter's own labels stay.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	var out snapshots.Info
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, old, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		info.Labels = keepOwn(old.Labels, info.Labels)
		paths := slices.DeleteFunc(slices.Clone(fieldpaths), func(p string) bool {
			return strings.HasPrefix(p, "labels.") && slices.Contains(ownLabelKeys, strings.TrimPrefix(p, "labels."))
		})
		if len(fieldpaths) > 0 && len(paths) == 0 {
			out = old
			return nil
		}
		out, err = storage.UpdateInfo(ctx, info, paths...)
		return err
	})
	return out, err
}

// dropOwn removes this snapshotter's labels from what a caller asks for:
// only the snapshotter itself makes a snapshot flat or a placeholder.
func dropOwn(info *snapshots.Info) error {
	for _, k := range ownLabelKeys {
		delete(info.Labels, k)
	}
	return nil
}

// keepOwn returns labels with this snapshotter's labels from old.
func keepOwn(old, labels map[string]string) map[string]string {
	out := make(map[string]string, len(labels)+1)
	for k, v := range labels {
		if !slices.Contains(ownLabelKeys, k) {
			out[k] = v
		}
	}
	for _, k := range ownLabelKeys {
		if v, ok := old[k]; ok {
			out[k] = v
		}
	}
	return out
}

// Usage returns the disk usage of a snapshot: scanned for an active one,
// recorded at commit for a committed one (0 for flat and placeholder
// snapshots, whose bytes live in the block cache).
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return usage, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Prepare creates an active snapshot, or, for a layer of an image whose flat
// form covers it, commits the layer's snapshot remotely and returns
// AlreadyExists.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	if target, ok := base.Labels[snapshots.LabelSnapshotRef]; ok && s.remote != nil {
		done, err := s.prepareRemote(ctx, key, parent, target, base.Labels)
		if done || err != nil {
			return nil, err
		}
	}
	return s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
}

// prepareRemote commits the layer target remotely if the image's flat form
// covers it. done false, err nil means: unpack it the ordinary way.
func (s *Snapshotter) prepareRemote(ctx context.Context, key, parent, target string, labels map[string]string) (done bool, err error) {
	ref, layer := labels[LabelImageRef], labels[LabelLayerDigest]
	if ref == "" || layer == "" {
		return false, nil
	}
	img, err := s.lookup(ctx, ref, labels[LabelManifestDigest])
	if err != nil {
		if !errors.Is(err, ErrNoFlat) {
			s.log.Warn("flat form lookup failed; unpacking the ordinary way", "ref", ref, "err", err)
		}
		return false, nil
	}
	i := slices.Index(img.Layers, layer)
	if i < 0 {
		s.log.Warn("layer is not in the image's manifest; unpacking it the ordinary way", "ref", ref, "layer", layer)
		return false, nil
	}
	own := map[string]string{snapshots.LabelSnapshotRef: target}
	if i == len(img.Layers)-1 {
		own[LabelFlat] = img.FlatRef
	} else {
		own[LabelPlaceholder] = img.Manifest
	}
	for k, v := range snapshots.FilterInheritedLabels(labels) {
		if _, ok := own[k]; !ok {
			own[k] = v
		}
	}
	var flatID string
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent); err != nil {
			return err
		}
		id, err := storage.CommitActive(ctx, key, target, snapshots.Usage{}, snapshots.WithLabels(own))
		if err != nil {
			return err
		}
		flatID = id
		return nil
	})
	if err != nil {
		if errdefs.IsAlreadyExists(err) {
			// Another pull committed it first: as good.
			return true, fmt.Errorf("snapshot %s: %w", target, errdefs.ErrAlreadyExists)
		}
		s.log.Warn("could not commit a remote snapshot; unpacking the ordinary way", "chain_id", target, "err", err)
		return false, nil
	}
	s.log.Info("remote snapshot", "ref", ref, "layer", layer, "chain_id", target, "flat", own[LabelFlat] != "")
	if own[LabelFlat] != "" {
		s.mountSoon(flatID, img.FlatRef)
	}
	return true, fmt.Errorf("remote snapshot %s: %w", target, errdefs.ErrAlreadyExists)
}

// lookup asks Remote once per image and remembers the answer, so that the
// layers of one pull cost one lookup.
func (s *Snapshotter) lookup(ctx context.Context, ref, manifest string) (RemoteImage, error) {
	k := ref + "@" + manifest
	s.mu.Lock()
	l, ok := s.lookups[k]
	s.mu.Unlock()
	if ok && (l.err == nil || time.Since(l.at) < noFlatTTL) {
		return l.img, l.err
	}
	img, err := s.remote.Lookup(ctx, ref, manifest)
	if manifest != "" && (err == nil || errors.Is(err, ErrNoFlat)) {
		s.mu.Lock()
		if len(s.lookups) > 256 {
			clear(s.lookups)
		}
		s.lookups[k] = lookup{img, err, time.Now()}
		s.mu.Unlock()
	}
	return img, err
}

func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	var (
		snap storage.Snapshot
		td   string
		path string
	)
	defer func() {
		if err != nil {
			if td != "" {
				_ = os.RemoveAll(td)
			}
			if path != "" {
				_ = os.RemoveAll(path)
			}
		}
	}()
	s.dirMu.RLock()
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		td, err = os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
		if err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
			return err
		}
		if kind == snapshots.KindActive {
			if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
				return err
			}
		}
		if snap, err = storage.CreateSnapshot(ctx, kind, key, parent, append(opts, dropOwn)...); err != nil {
			return fmt.Errorf("create snapshot %s: %w", key, err)
		}
		path = filepath.Join(s.root, "snapshots", snap.ID)
		if err := os.Rename(td, path); err != nil {
			return err
		}
		td = ""
		return nil
	})
	s.dirMu.RUnlock()
	if err != nil {
		return nil, err
	}
	m, err := s.mounts(ctx, snap)
	if err != nil {
		// The snapshot cannot be used: take it back so the caller can retry.
		_ = s.ms.WithTransaction(context.WithoutCancel(ctx), true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, key)
			return err
		})
		return nil, err
	}
	path = ""
	return m, nil
}

// Mounts returns the mounts of an active or view snapshot, mounting its
// flat base again if the daemon restarted since.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var snap storage.Snapshot
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts of %s: %w", key, err)
	}
	return s.mounts(ctx, snap)
}

// lowerDirs returns the directories under snapshot snap, nearest first:
// ordinary layers' fs directories down to the first flat snapshot, whose
// mount holds everything below it.
func (s *Snapshotter) lowerDirs(ctx context.Context, parentIDs []string) ([]string, error) {
	if len(parentIDs) == 0 {
		return nil, nil
	}
	own, err := s.ownLabels(ctx)
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, id := range parentIDs {
		l := own[id]
		if ref := l[LabelFlat]; ref != "" {
			dir, err := s.ensureFlat(ctx, id, ref)
			if err != nil {
				return nil, err
			}
			return append(dirs, dir), nil
		}
		if l[LabelMaterialized] != "" {
			return append(dirs, s.upperPath(id)), nil
		}
		if l[LabelPlaceholder] != "" {
			if lf, ok := s.remote.(LayerFetcher); ok {
				if err := s.materialize(ctx, lf, id, l); err != nil {
					return nil, err
				}
				return append(dirs, s.upperPath(id)), nil
			}
			return nil, fmt.Errorf("%w: snapshot %s stands for part of image %s, whose flat form Shoal mounts whole; "+
				"an image that shares its lower layers cannot be built on it: remove that image from containerd "+
				"(and let it collect garbage) or use another snapshotter for this one: %w",
				ErrPlaceholder, l[snapshots.LabelSnapshotRef], l[LabelPlaceholder], errdefs.ErrFailedPrecondition)
		}
		dirs = append(dirs, s.upperPath(id))
	}
	return dirs, nil
}

// ownLabels maps snapshot ids to this snapshotter's labels, for the
// snapshots that have any.
func (s *Snapshotter) ownLabels(ctx context.Context) (map[string]map[string]string, error) {
	out := map[string]map[string]string{}
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if !slices.ContainsFunc(ownLabelKeys, func(k string) bool { return info.Labels[k] != "" }) {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			out[id] = info.Labels
			return nil
		})
	})
	return out, err
}

// Adopt takes back the flat mounts that outlived a restart of the process
// (the daemon hands them over through its keeper): every flat snapshot
// whose mount directory held reports as served is mounted again through
// Remote.Mount, which finds the mount there, so that Remove unmounts it.
func (s *Snapshotter) Adopt(ctx context.Context, held func(dir string) bool) {
	own, err := s.ownLabels(ctx)
	if err != nil {
		s.log.Warn("could not list snapshots to adopt their mounts", "err", err)
		return
	}
	for id, l := range own {
		if ref := l[LabelFlat]; ref != "" && held(s.flatPath(id)) {
			if _, err := s.ensureFlat(ctx, id, ref); err != nil {
				s.log.Warn("could not adopt a flat mount", "snapshot", id, "err", err)
			}
		}
	}
}

// mountSoon mounts a flat snapshot in the background: it was just pulled,
// and a container will want it next, so its index is fetched while
// containerd finishes the pull and creates the container. A failure is
// only logged: Mounts tries again and reports it.
func (s *Snapshotter) mountSoon(id, ref string) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if _, err := s.ensureFlat(ctx, id, ref); err != nil {
			s.log.Warn("could not mount a pulled flat image yet", "snapshot", id, "ref", ref, "err", err)
		}
	}()
}

// ensureFlat mounts the flat image ref for snapshot id unless it is
// mounted, and returns the mount's directory.
func (s *Snapshotter) ensureFlat(ctx context.Context, id, ref string) (string, error) {
	dir := s.flatPath(id)
	s.mountMu.Lock()
	defer s.mountMu.Unlock()
	if _, ok := s.mounted[id]; ok {
		return dir, nil
	}
	if s.remote == nil {
		return "", fmt.Errorf("snapshot %s is the flat image %s, and remote snapshots are off", id, ref)
	}
	if s.closed {
		return "", fmt.Errorf("mount flat image %s: snapshotter closed", ref)
	}
	// A mount made before a restart is dead (its server is gone); the
	// daemon detaches it when it mounts again.
	c, err := s.remote.Mount(ctx, ref, dir)
	if err != nil {
		return "", fmt.Errorf("mount flat image %s for snapshot %s: %w", ref, id, err)
	}
	s.mounted[id] = c
	s.log.Info("mounted flat image", "snapshot", id, "ref", ref, "dir", dir)
	return dir, nil
}

func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot) ([]mount.Mount, error) {
	lowers, err := s.lowerDirs(ctx, snap.ParentIDs)
	if err != nil {
		return nil, err
	}
	if len(lowers) == 0 {
		ro := "rw"
		if snap.Kind == snapshots.KindView {
			ro = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: s.upperPath(snap.ID), Options: []string{ro, "rbind"}}}, nil
	}
	var options []string
	if snap.Kind == snapshots.KindActive {
		options = append(options, "workdir="+s.workPath(snap.ID), "upperdir="+s.upperPath(snap.ID))
	} else if len(lowers) == 1 {
		return []mount.Mount{{Type: "bind", Source: lowers[0], Options: []string{"ro", "rbind"}}}, nil
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}, nil
}

// Commit commits an active snapshot under name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		usage, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(usage), append(opts, dropOwn)...); err != nil {
			return fmt.Errorf("commit snapshot %s: %w", key, err)
		}
		return nil
	})
}

// Remove removes a snapshot, unmounting its flat image if it is one, and
// its directory.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var id string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("remove snapshot %s: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.unmountFlat(id)
	if err := os.RemoveAll(filepath.Join(s.root, "snapshots", id)); err != nil {
		s.log.Warn("could not remove snapshot directory", "id", id, "err", err)
	}
	return nil
}

func (s *Snapshotter) unmountFlat(id string) {
	s.mountMu.Lock()
	c, ok := s.mounted[id]
	delete(s.mounted, id)
	s.mountMu.Unlock()
	if ok {
		if err := c.Close(); err != nil {
			s.log.Warn("could not unmount flat image", "snapshot", id, "err", err)
		}
	}
	// Whatever is left there (a mount from before a restart) must not be
	// walked into by RemoveAll.
	_ = unix.Unmount(s.flatPath(id), unix.MNT_DETACH)
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes the directories of snapshots that no longer exist.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	s.dirMu.Lock()
	defer s.dirMu.Unlock()
	var ids map[string]string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	}); err != nil {
		return err
	}
	entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if _, ok := ids[e.Name()]; ok || strings.HasPrefix(e.Name(), "new-") {
			continue
		}
		s.unmountFlat(e.Name())
		if err := os.RemoveAll(filepath.Join(s.root, "snapshots", e.Name())); err != nil {
			s.log.Warn("could not remove snapshot directory", "id", e.Name(), "err", err)
		}
	}
	return nil
}
