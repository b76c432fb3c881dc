package blockstore

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/dgraph-io/badger/v4"
)

var (
	// ErrNotFound is returned when a block is not in the store.
	ErrNotFound = errors.New("blockstore: block not found")
	// ErrCorrupt is returned when bytes do not hash to their block ID: on Put
	// the caller's data, on Get the stored copy (which is then removed).
	ErrCorrupt = errors.New("blockstore: block data does not match its id")
	// ErrFull is returned when a block does not fit in the quota even after
	// evicting every unpinned block. Nothing is evicted in that case.
	ErrFull = errors.New("blockstore: quota full of pinned blocks")
	// ErrTooLarge is returned by Put for a block larger than the value-log
	// file size (see WithValueLogFileSize), badger's limit for one value.
	ErrTooLarge = errors.New("blockstore: block too large")
	// ErrPinned is returned by Delete for a pinned block.
	ErrPinned = errors.New("blockstore: block is pinned")
	// ErrNotPinned is returned by Unpin for a block with no pins.
	ErrNotPinned = errors.New("blockstore: block is not pinned")
	// ErrClosed is returned by every method after Close.
	ErrClosed = errors.New("blockstore: closed")
	// ErrIncompatible is returned by Open for a directory that holds another
	// badger database or another format of block store. It is not damage:
	// Open leaves the directory as it is.
	ErrIncompatible = errors.New("blockstore: directory holds an incompatible database")
	// ErrCloseTimeout is returned by Close when the database did not close
	// within the close timeout (see Close).
	ErrCloseTimeout = errors.New("blockstore: close timed out")
	// ErrNoSpace is returned when the file system holding the store is (nearly)
	// full. It wraps syscall.ENOSPC, so errors.Is works with either.
	ErrNoSpace = errors.New("blockstore: no space left on device")
)

// translate maps badger's and the OS's errors onto the package's sentinels,
// keeping the original in the chain where it carries detail.
func translate(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, badger.ErrKeyNotFound):
		return ErrNotFound
	case errors.Is(err, badger.ErrDBClosed), errors.Is(err, badger.ErrBlockedWrites):
		return fmt.Errorf("%w: %w", ErrClosed, err)
	case errors.Is(err, syscall.ENOSPC):
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return fmt.Errorf("badger: %w", err)
}
