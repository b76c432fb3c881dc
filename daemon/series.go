package daemon

import (
	"context"
	"sync"
	"time"
)

// Sample is one reading of the daemon's cumulative counters, the unit of
// the status page's time series. Counters, not rates: a reader derives a
// rate from two samples and their times, so a late or missed tick skews
// nothing.
type Sample struct {
	T         int64 `json:"t"`          // unix milliseconds
	Cache     int64 `json:"cache"`      // block bytes served to mounts from the cache, since start
	Peers     int64 `json:"peers"`      // from peers
	Registry  int64 `json:"registry"`   // from the registry
	Uploaded  int64 `json:"uploaded"`   // block bytes sent to peers
	CacheUsed int64 `json:"cache_used"` // bytes held in the block cache now
}

// series is a fixed-size ring of samples, oldest overwritten first: the
// last few minutes at one sample a second cost a few tens of kilobytes,
// and Prometheus keeps the long history.
type series struct {
	mu   sync.Mutex
	buf  []Sample
	next int  // where the next sample goes
	full bool // buf has wrapped
}

func newSeries(n int) *series { return &series{buf: make([]Sample, n)} }

func (s *series) add(x Sample) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf[s.next] = x
	s.next = (s.next + 1) % len(s.buf)
	if s.next == 0 {
		s.full = true
	}
}

// samples returns a copy of the held samples, oldest first.
func (s *series) samples() []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.full {
		return append([]Sample(nil), s.buf[:s.next]...)
	}
	return append(append(make([]Sample, 0, len(s.buf)), s.buf[s.next:]...), s.buf[:s.next]...)
}

// run adds read() now and then every interval until ctx is done.
func (s *series) run(ctx context.Context, every time.Duration, read func() Sample) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.add(read())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
