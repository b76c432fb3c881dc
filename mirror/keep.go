package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/shoal-project/shoal/flat"
)

// Blocks is the node's block cache, where kept blobs live as blocks.
// *blockstore.Store satisfies it: Put verifies bytes against the ID, Get
// verifies them again on the way out.
type Blocks interface {
	Get(ctx context.Context, id flat.BlockID) ([]byte, error)
	Has(ctx context.Context, id flat.BlockID) (bool, error)
	Put(ctx context.Context, id flat.BlockID, data []byte) error
}

// keeper is the mirror's state on disk, beside the block cache:
//
//	<dir>/recipes/<hex>         the recipe of each kept blob (and manifest), by digest
//	<dir>/recipes/<hex>.access  its class, "public" or "shared"; absent: private
//	<dir>/tags/<hex>            the digest a tag last resolved to, by sha256(host/repo:tag)
//	<dir>/tmp/                  spool files of fetches in progress (unlinked at once)
//
// A blob counts as kept while its recipe is on disk and every one of its
// blocks is in the cache; the cache may evict blocks at any time. The class
// is written before the recipe, so a recipe is never seen with a class
// lower than the one it was kept with; recipes kept before classes existed
// have none and count as private.
type keeper struct {
	dir    string
	blocks Blocks
	// forgotten is told of a blob forgotten (its recipe rotted), if set.
	forgotten func(digest string)

	mu   sync.Mutex
	kept map[string]class // digests with a recipe on disk
}

func openKeeper(dir string, blocks Blocks) (*keeper, error) {
	for _, sub := range []string{"recipes", "tags", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("mirror state: %w", err)
		}
	}
	// Spool files are unlinked when created; anything here is from an
	// older crash-prone version or a kill between create and unlink.
	if ents, err := os.ReadDir(filepath.Join(dir, "tmp")); err == nil {
		for _, e := range ents {
			_ = os.RemoveAll(filepath.Join(dir, "tmp", e.Name()))
		}
	}
	k := &keeper{dir: dir, blocks: blocks, kept: map[string]class{}}
	ents, err := os.ReadDir(filepath.Join(dir, "recipes"))
	if err != nil {
		return nil, fmt.Errorf("mirror state: %w", err)
	}
	for _, e := range ents {
		if d := "sha256:" + e.Name(); !strings.Contains(e.Name(), ".") {
			if _, ok := parseDigest(d); ok {
				k.kept[d] = k.readClass(d)
			}
		}
	}
	return k, nil
}

func (k *keeper) recipePath(digest string) string {
	return filepath.Join(k.dir, "recipes", strings.TrimPrefix(digest, "sha256:"))
}

func (k *keeper) classPath(digest string) string { return k.recipePath(digest) + ".access" }

// readClass reads a kept blob's class from disk: private unless a valid
// record says otherwise.
func (k *keeper) readClass(digest string) class {
	b, err := os.ReadFile(k.classPath(digest))
	if err != nil {
		return classPrivate
	}
	switch strings.TrimSpace(string(b)) {
	case "public":
		return classPublic
	case "shared":
		return classShared
	}
	return classPrivate
}

// class returns a kept blob's class (private when not kept).
func (k *keeper) class(digest string) class {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.kept[digest]
}

// raise records c for a kept blob if it is higher than its class; it
// reports whether the class rose.
func (k *keeper) raise(digest string, c class) (bool, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	old, ok := k.kept[digest]
	if !ok || c <= old {
		return false, nil
	}
	if err := writeAtomic(k.classPath(digest), []byte(c.String()+"\n")); err != nil {
		return false, fmt.Errorf("record %s as %s: %w", digest, c, err)
	}
	k.kept[digest] = c
	return true, nil
}

func (k *keeper) tagPath(host, repo, tag string) string {
	sum := sha256.Sum256([]byte(host + "/" + repo + ":" + tag))
	return filepath.Join(k.dir, "tags", hex.EncodeToString(sum[:]))
}

// spool creates an anonymous temporary file for a fetch: it is unlinked at
// once, so it disappears with its last descriptor, crash or not.
func (k *keeper) spool() (*os.File, error) {
	f, err := os.CreateTemp(filepath.Join(k.dir, "tmp"), "blob-*")
	if err != nil {
		return nil, fmt.Errorf("spool file: %w", err)
	}
	_ = os.Remove(f.Name())
	return f, nil
}

// recipe returns the kept recipe of digest if every block is still in the
// cache; ok is false otherwise.
func (k *keeper) recipe(ctx context.Context, digest string, maxSize int64) (*recipe, []byte, bool) {
	r, raw, ok := k.recipeOnDisk(digest, maxSize)
	if !ok {
		return nil, nil, false
	}
	for _, id := range r.ids {
		if has, err := k.blocks.Has(ctx, id); err != nil || !has {
			return nil, nil, false
		}
	}
	return r, raw, true
}

// recipeOnDisk returns the kept recipe of digest without checking that its
// blocks are still cached.
func (k *keeper) recipeOnDisk(digest string, maxSize int64) (*recipe, []byte, bool) {
	raw, err := os.ReadFile(k.recipePath(digest))
	if err != nil {
		return nil, nil, false
	}
	r, err := decodeRecipe(raw, digest, -1, maxRecipeBlob)
	if err != nil {
		// Rotted on disk: forget it; the blob is fetched again.
		k.forget(digest)
		return nil, nil, false
	}
	if r.size > maxSize {
		return nil, nil, false // kept, but not what this request may get
	}
	return r, raw, true
}

func (k *keeper) forget(digest string) {
	_ = os.Remove(k.recipePath(digest))
	_ = os.Remove(k.classPath(digest))
	k.mu.Lock()
	delete(k.kept, digest)
	k.mu.Unlock()
	if k.forgotten != nil {
		k.forgotten(digest)
	}
}

// keep stores a verified blob, read from src, as blocks cut by r, then
// writes its class (the higher of c and what was recorded before) and r.
// The blob must already have been checked against r's digest. It returns
// the class recorded.
func (k *keeper) keep(ctx context.Context, r *recipe, src io.ReaderAt, c class) (class, error) {
	buf := make([]byte, r.chunk)
	for i := range r.ids {
		id, off, n := r.block(i)
		b := buf[:n]
		if _, err := src.ReadAt(b, off); err != nil && !(errors.Is(err, io.EOF) && int64(len(b)) == n) {
			return 0, fmt.Errorf("keep %s: read block %d: %w", r.digestString(), i, err)
		}
		if err := k.blocks.Put(ctx, id, b); err != nil {
			return 0, fmt.Errorf("keep %s: %w", r.digestString(), err)
		}
	}
	d := r.digestString()
	k.mu.Lock()
	defer k.mu.Unlock()
	c = max(c, k.readClass(d))
	if c > classPrivate {
		if err := writeAtomic(k.classPath(d), []byte(c.String()+"\n")); err != nil {
			return 0, fmt.Errorf("keep %s: %w", d, err)
		}
	}
	if err := writeAtomic(k.recipePath(d), r.encode()); err != nil {
		return 0, fmt.Errorf("keep %s: %w", d, err)
	}
	k.kept[d] = c
	return c, nil
}

// keepBytes keeps a small verified blob held in memory (a manifest).
func (k *keeper) keepBytes(ctx context.Context, digest string, data []byte, c class) (class, error) {
	r, err := cut(digest, data)
	if err != nil {
		return 0, err
	}
	return k.keep(ctx, r, bytes.NewReader(data), c)
}

// cut makes the recipe of data, whose digest is digest.
func cut(digest string, data []byte) (*recipe, error) {
	d, ok := parseDigest(digest)
	if !ok {
		return nil, fmt.Errorf("%w: digest %q", ErrBadRecipe, digest)
	}
	r := &recipe{digest: d, size: int64(len(data)), chunk: ChunkSize}
	for off := 0; off < len(data); off += ChunkSize {
		r.ids = append(r.ids, flat.Sum(data[off:min(off+ChunkSize, len(data))]))
	}
	return r, nil
}

// keptDigests lists the kept blobs (recipes on disk) of class c or above.
func (k *keeper) keptDigests(c class) []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]string, 0, len(k.kept))
	for d, dc := range k.kept {
		if dc >= c {
			out = append(out, d)
		}
	}
	return out
}

// tag returns the digest host/repo:tag last resolved to.
func (k *keeper) tag(host, repo, tag string) (string, bool) {
	b, err := os.ReadFile(k.tagPath(host, repo, tag))
	if err != nil {
		return "", false
	}
	d := strings.TrimSpace(string(b))
	_, ok := parseDigest(d)
	return d, ok
}

func (k *keeper) setTag(host, repo, tag, digest string) error {
	return writeAtomic(k.tagPath(host, repo, tag), []byte(digest+"\n"))
}

// writeAtomic writes data to p through a temporary file and a rename.
func writeAtomic(p string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		_ = os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), p); err != nil {
		_ = os.Remove(f.Name())
		return err
	}
	return nil
}
