package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
)

// localPinShare is the share of the cache quota that the pinned blocks of
// locally converted images may hold. No registry can serve those blocks
// again, so they are pinned; but pins never released would in time fill the
// quota and make the cache refuse every write. Beyond this share, the least
// recently used local image that is not mounted has its pins released: its
// blocks stay cached as ordinary blocks, evictable, and its index is kept,
// so a later use pins them again, or converts the image again if some were
// evicted meanwhile. Half leaves the other half of the quota to the blocks
// of flat images fetched lazily, which local conversions must not crowd
// out. With no quota nothing is released.
const localPinShare = 0.5

// releasedSuffix marks a local image whose pins were released:
// indexes/<hex> with indexes/<hex>.released beside it. Recency of use is
// the index file's modification time.
const releasedSuffix = ".released"

// pinIndex adds (delta +1) or removes (-1) one pin per block entry of x,
// the way a conversion pins them. Removing tolerates a missing pin.
func (n *Node) pinIndex(ctx context.Context, x *flat.Index, delta int) error {
	for _, b := range x.Blocks {
		var err error
		if delta > 0 {
			err = n.store.Pin(ctx, b.ID)
		} else if err = n.store.Unpin(ctx, b.ID); errors.Is(err, blockstore.ErrNotPinned) {
			err = nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// localPath is where the index of the local image with source digest hex
// is kept.
func (n *Node) localPath(hex string) string { return filepath.Join(n.dir, "indexes", hex) }

// reuseLocal reads the kept index of local image hex, pins its blocks
// again if they had been released, and marks it used. It returns the index
// with errMissingBlocks if a block is no longer cached (the image must be
// converted again; its pins are held); with any other error, no index.
func (n *Node) reuseLocal(ctx context.Context, hex string) (*flat.Index, error) {
	n.localMu.Lock()
	defer n.localMu.Unlock()
	p := n.localPath(hex)
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	x, err := flat.ReadBlob(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(p + releasedSuffix); err == nil {
		// Pins first, so nothing is evicted between the check below and use.
		if err := n.pinIndex(ctx, x, +1); err != nil {
			return nil, fmt.Errorf("pin local image again: %w", err)
		}
		if err := os.Remove(p + releasedSuffix); err != nil {
			return nil, err
		}
	}
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	for _, b := range x.Blocks {
		if ok, err := n.store.Has(ctx, b.ID); err != nil || !ok {
			return x, fmt.Errorf("block %s: %w", b.ID, errMissingBlocks)
		}
	}
	return x, nil
}

var errMissingBlocks = errors.New("no longer cached")

// keepLocal records the index of a new local conversion, whose blocks are
// pinned, as just used.
func (n *Node) keepLocal(hex string, blob []byte) error {
	n.localMu.Lock()
	defer n.localMu.Unlock()
	p := n.localPath(hex)
	if err := writeFileAtomic(p, blob); err != nil {
		return err
	}
	if err := os.Remove(p + releasedSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// useLocal marks local image hex in use by a mount until the returned
// function is called: its pins are not released meanwhile.
func (n *Node) useLocal(hex string) (done func()) {
	n.localMu.Lock()
	n.inUse[hex]++
	n.localMu.Unlock()
	return func() {
		n.localMu.Lock()
		if n.inUse[hex]--; n.inUse[hex] <= 0 {
			delete(n.inUse, hex)
		}
		n.localMu.Unlock()
	}
}

// trimLocalPins releases the pins of least recently used local images, not
// mounted and not keep, until pinned blocks fit localPinShare of the quota.
func (n *Node) trimLocalPins(ctx context.Context, keep string) {
	if n.cfg.quota <= 0 {
		return
	}
	budget := int64(float64(n.cfg.quota) * localPinShare)
	for n.store.Stats().PinnedBytes > budget {
		if !n.releaseOldest(ctx, keep) {
			return
		}
	}
}

// releaseOldest releases the pins of the least recently used local image
// that is neither mounted nor keep, and reports whether there was one. The
// image is marked released before its pins go, so a crash between the two
// leaves pins held too long, never an image that counts on pins it lost.
func (n *Node) releaseOldest(ctx context.Context, keep string) bool {
	n.localMu.Lock()
	defer n.localMu.Unlock()
	dir := filepath.Join(n.dir, "indexes")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	var oldest string
	var oldestTime time.Time
	for _, e := range ents {
		hex := e.Name()
		if strings.Contains(hex, ".") || hex == keep || n.inUse[hex] > 0 {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, hex+releasedSuffix)); err == nil {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		if oldest == "" || fi.ModTime().Before(oldestTime) {
			oldest, oldestTime = hex, fi.ModTime()
		}
	}
	if oldest == "" {
		return false
	}
	p := filepath.Join(dir, oldest)
	f, err := os.Open(p)
	if err != nil {
		n.log.Warn("cannot read a local image's index to release its pins", "index", p, "err", err)
		return false
	}
	x, err := flat.ReadBlob(f)
	f.Close()
	if err != nil {
		n.log.Warn("cannot read a local image's index to release its pins", "index", p, "err", err)
		return false
	}
	if err := writeFileAtomic(p+releasedSuffix, nil); err != nil {
		n.log.Warn("cannot mark a local image released", "index", p, "err", err)
		return false
	}
	if err := n.pinIndex(ctx, x, -1); err != nil {
		n.log.Warn("releasing a local image's pins failed", "index", p, "err", err)
		return false
	}
	n.log.Info("released the pins of the least recently used local image; its blocks are now ordinary cached blocks",
		"source_digest", "sha256:"+oldest, "blocks", len(x.Blocks), "pinned_bytes_now", n.store.Stats().PinnedBytes)
	return true
}
