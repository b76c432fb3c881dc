package fetch

import (
	"context"
	"sync"
)

// Priority orders work that competes for the registry: a read the
// application is blocked on comes before prefetch of blocks it will need
// soon, which comes before filling in the rest of the image.
type Priority int

// Priorities, most urgent first.
const (
	// Demand: a read is waiting (the default for a context without one).
	Demand Priority = iota
	// Prefetch: readahead, and trace-ordered prefetch at mount.
	Prefetch
	// Background: filling in the rest of an image (seeder).
	Background
	numPriorities
)

func (p Priority) String() string {
	switch p {
	case Demand:
		return "demand"
	case Prefetch:
		return "prefetch"
	case Background:
		return "background"
	}
	return "unknown"
}

type priorityKey struct{}

// WithPriority returns a context whose fetches run at priority p.
func WithPriority(ctx context.Context, p Priority) context.Context {
	return context.WithValue(ctx, priorityKey{}, p)
}

// PriorityOf returns the priority of fetches under ctx (Demand if none was
// set).
func PriorityOf(ctx context.Context) Priority {
	if p, ok := ctx.Value(priorityKey{}).(Priority); ok && p >= Demand && p < numPriorities {
		return p
	}
	return Demand
}

// scheduler bounds the range requests one image has in flight toward its
// registry and hands free slots out by priority: a waiting demand request
// always gets the next free slot, before any prefetch or background request
// that waited longer. Lower priorities are also held below the limit
// (prefetch may use limit-1 slots, background at most limit/4, at least
// one), so a demand miss finds a slot free at once, or after a single
// request, however much prefetch and fill are queued.
type scheduler struct {
	mu       sync.Mutex
	limit    int
	inflight [numPriorities]int
	total    int
	waiting  [numPriorities][]chan struct{}
	onGrant  func(Priority) // tests: called, with mu held, when a waiter is granted a slot
}

func newScheduler(limit int) *scheduler { return &scheduler{limit: max(limit, 1)} }

// cap is how many requests of priority p may be in flight at once.
func (s *scheduler) cap(p Priority) int {
	switch p {
	case Demand:
		return s.limit
	case Prefetch:
		return max(s.limit-1, 1)
	default:
		return max(s.limit/4, 1)
	}
}

// allowed reports whether a request of priority p may start now; s.mu held.
func (s *scheduler) allowed(p Priority) bool {
	if s.total >= s.limit {
		return false
	}
	// Lower priorities count against their own cap together with every
	// less urgent request: prefetch plus background under limit-1, etc.
	n := 0
	for q := p; q < numPriorities; q++ {
		n += s.inflight[q]
	}
	if n >= s.cap(p) {
		return false
	}
	// Nobody more urgent may be waiting.
	for q := Demand; q < p; q++ {
		if len(s.waiting[q]) > 0 {
			return false
		}
	}
	return true
}

// acquire waits for a slot for a request of priority p; release frees it.
func (s *scheduler) acquire(ctx context.Context, p Priority) (release func(), err error) {
	s.mu.Lock()
	if len(s.waiting[p]) == 0 && s.allowed(p) {
		s.take(p)
		s.mu.Unlock()
		return func() { s.release(p) }, nil
	}
	ch := make(chan struct{})
	s.waiting[p] = append(s.waiting[p], ch)
	s.mu.Unlock()
	select {
	case <-ch:
		return func() { s.release(p) }, nil
	case <-ctx.Done():
		s.mu.Lock()
		defer s.mu.Unlock()
		for i, w := range s.waiting[p] {
			if w == ch {
				s.waiting[p] = append(s.waiting[p][:i], s.waiting[p][i+1:]...)
				s.wakeLocked()
				return nil, ctx.Err()
			}
		}
		// Granted while giving up: hand the slot back.
		s.inflight[p]--
		s.total--
		s.wakeLocked()
		return nil, ctx.Err()
	}
}

func (s *scheduler) take(p Priority) {
	s.inflight[p]++
	s.total++
}

func (s *scheduler) release(p Priority) {
	s.mu.Lock()
	s.inflight[p]--
	s.total--
	s.wakeLocked()
	s.mu.Unlock()
}

// wakeLocked grants free slots to waiters, most urgent first.
func (s *scheduler) wakeLocked() {
	for p := Demand; p < numPriorities; p++ {
		for len(s.waiting[p]) > 0 && s.allowed(p) {
			ch := s.waiting[p][0]
			s.waiting[p] = s.waiting[p][1:]
			s.take(p)
			if s.onGrant != nil {
				s.onGrant(p)
			}
			close(ch)
		}
		if len(s.waiting[p]) > 0 {
			return // lower priorities wait behind this one
		}
	}
}
