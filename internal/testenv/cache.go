package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// cachedBuild returns CacheDir()/image-layers/<name>, a directory holding
// what build wrote into it plus a layers.json of the meta build returned,
// building it first if read does not accept what is there. Builders are
// serialised with flock and the directory appears by rename, so concurrent
// test binaries build it once and nobody sees half of one.
func cachedBuild[M any](ctx context.Context, name string, read func(dir string) (M, error),
	build func(ctx context.Context, tmp string) (M, error)) (dir string, meta M, built bool, err error) {
	root := filepath.Join(CacheDir(), "image-layers")
	dir = filepath.Join(root, name)
	if meta, err := read(dir); err == nil {
		return dir, meta, false, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", meta, false, err
	}
	lock, err := os.OpenFile(filepath.Join(root, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", meta, false, err
	}
	defer lock.Close() // releases the flock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", meta, false, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	if meta, err := read(dir); err == nil { // built while we waited
		return dir, meta, false, nil
	}
	// Builders killed outright left their directories; we hold the lock, so
	// nobody else is using them.
	if old, err := filepath.Glob(filepath.Join(root, ".build-*")); err == nil {
		for _, o := range old {
			os.RemoveAll(o)
		}
	}
	tmp, err := os.MkdirTemp(root, ".build-")
	if err != nil {
		return "", meta, false, err
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	if meta, err = build(ctx, tmp); err != nil {
		return "", meta, false, err
	}
	data, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return "", meta, false, err
	}
	if err := os.WriteFile(filepath.Join(tmp, layersMetaName), data, 0o644); err != nil {
		return "", meta, false, err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", meta, false, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", meta, false, err
	}
	return dir, meta, true, nil
}
