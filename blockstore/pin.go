package blockstore

import (
	"context"
	"fmt"
	"math"

	"github.com/dgraph-io/badger/v4"

	"github.com/shoal-project/shoal/flat"
)

// Pin adds a pin to block id; a pinned block is never evicted and cannot be
// deleted. Pins are counted: each Pin needs its own Unpin. The block need not
// be stored yet: the pin protects it from the moment it arrives, so a caller
// can pin an image's blocks before fetching them. The count is persisted.
func (s *Store) Pin(ctx context.Context, id flat.BlockID) error {
	if err := s.addPins(ctx, id, +1); err != nil {
		return fmt.Errorf("pin %s: %w", id, err)
	}
	return nil
}

// Unpin removes one pin from block id, or returns ErrNotPinned. When the
// last pin goes, the block becomes evictable again as if just used.
func (s *Store) Unpin(ctx context.Context, id flat.BlockID) error {
	if err := s.addPins(ctx, id, -1); err != nil {
		return fmt.Errorf("unpin %s: %w", id, err)
	}
	return nil
}

// PinCount returns the number of pins on block id, stored or not.
func (s *Store) PinCount(id flat.BlockID) (int, error) {
	release, err := s.enter()
	if err != nil {
		return 0, fmt.Errorf("pin count %s: %w", id, err)
	}
	defer release()
	s.mu.Lock()
	defer s.mu.Unlock()
	return int(s.idx.pins[id]), nil
}

func (s *Store) addPins(ctx context.Context, id flat.BlockID, delta int) error {
	release, err := s.enter()
	if err != nil {
		return err
	}
	defer release()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}

	s.mu.Lock()
	n := int64(s.idx.pins[id]) + int64(delta)
	s.mu.Unlock()
	switch {
	case n < 0:
		return ErrNotPinned
	case n > math.MaxUint32:
		return fmt.Errorf("too many pins (%d)", n-1)
	}
	if err := s.checkSpace(0, true); err != nil {
		return err
	}
	err = s.db.Update(func(txn *badger.Txn) error {
		if n == 0 {
			return txn.Delete(blockKey(prefixPin, id))
		}
		return txn.Set(blockKey(prefixPin, id), encodePins(uint32(n)))
	})
	if err != nil {
		return translate(err)
	}
	s.mu.Lock()
	s.idx.setPins(id, uint32(n))
	s.mu.Unlock()
	return nil
}
