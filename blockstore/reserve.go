package blockstore

import (
	"fmt"
	"sync"
	"syscall"
)

// Reservation is room set aside for bytes written beside the store, on its
// file system, that are meant to be Put into it later: a blob being
// downloaded into a spool file (package mirror). Until it is released, the
// unwritten part of a reservation is free space that Put leaves alone, and
// its whole size counts against the quota of later reservations. Its
// methods are safe for concurrent use.
type Reservation struct {
	s    *Store
	size int64

	mu       sync.Mutex
	used     int64
	released bool
}

// Reserve sets aside n bytes. It returns ErrFull when the quota, less the
// pinned blocks (which eviction cannot free) and the reservations already
// held, is smaller than n: the cache could not hold those bytes once they
// are Put. It returns ErrNoSpace, as Put does, when the file system does not
// have n bytes free beyond the store's reserve and the unwritten parts of
// the reservations already held. The holder reports what it wrote (Used)
// and calls Release when its bytes are gone or Put.
func (s *Store) Reserve(n int64) (*Reservation, error) {
	if n < 0 {
		return nil, fmt.Errorf("reserve %d bytes: negative", n)
	}
	release, err := s.enter()
	if err != nil {
		return nil, err
	}
	defer release()
	s.mu.Lock()
	defer s.mu.Unlock()
	if q := s.cfg.quota; q > 0 {
		if room := q - s.idx.pinnedBytes - s.reserved; n > room {
			return nil, fmt.Errorf("reserve %d bytes: %w: quota %d, pinned %d, reserved %d",
				n, ErrFull, q, s.idx.pinnedBytes, s.reserved)
		}
	}
	if err := s.checkSpace(n, false); err != nil {
		return nil, fmt.Errorf("reserve %d bytes: %w", n, err)
	}
	s.reserved += n
	s.pending += n
	return &Reservation{s: s, size: n}, nil
}

// Size is the number of bytes reserved.
func (r *Reservation) Size() int64 { return r.size }

// Used records that n bytes of the reservation (0 to Size) are now written,
// and so no longer free space to be kept free for it.
func (r *Reservation) Used(n int64) {
	n = min(max(n, 0), r.size)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.released || n == r.used {
		return
	}
	r.s.mu.Lock()
	r.s.pending += r.used - n
	r.s.mu.Unlock()
	r.used = n
}

// Release gives the reservation back. Calling it again does nothing.
func (r *Reservation) Release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.released {
		return
	}
	r.released = true
	r.s.mu.Lock()
	r.s.reserved -= r.size
	r.s.pending -= r.size - r.used
	r.s.mu.Unlock()
}

// spaceError is checkSpace's refusal.
func spaceError(free int64, dir string, need, pending, reserve int64) error {
	return fmt.Errorf("%w: %d bytes free in %s, need %d plus %d reserved for writes beside the store plus a reserve of %d: %w",
		ErrNoSpace, free, dir, need, pending, reserve, syscall.ENOSPC)
}
