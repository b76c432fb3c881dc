package trace

import (
	"sync"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// Recorder collects first touches of one mount's blocks for a time window.
// Touch is cheap and safe for concurrent use: lazyfs calls it on every
// demand read. After the window (or Stop) it records nothing more.
type Recorder struct {
	image   string
	x       *flat.Index
	start   time.Time
	window  time.Duration
	command string

	mu      sync.Mutex
	seen    []uint64 // bitset by block number
	events  []Event
	stopped bool
	full    chan struct{} // closed when recording ends
}

// NewRecorder starts recording the image whose flat manifest digest is image
// and whose index is x. window 0 records until Stop.
func NewRecorder(image string, x *flat.Index, window time.Duration) *Recorder {
	return &Recorder{
		image:  image,
		x:      x,
		start:  time.Now(),
		window: window,
		seen:   make([]uint64, (len(x.Blocks)+63)/64),
		full:   make(chan struct{}),
	}
}

// SetCommand notes what ran, for people reading the trace.
func (r *Recorder) SetCommand(cmd string) {
	r.mu.Lock()
	r.command = cmd
	r.mu.Unlock()
}

// Touch records that a demand read asked for block at time at (the start of
// the read) and waited wait for it. Later touches of the same block, and
// touches after the window, are ignored.
func (r *Recorder) Touch(block uint32, at time.Time, wait time.Duration) {
	if int(block) >= len(r.x.Blocks) {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return
	}
	since := at.Sub(r.start)
	if r.window > 0 && since > r.window {
		r.stopLocked()
		return
	}
	w, bit := block/64, uint64(1)<<(block%64)
	if r.seen[w]&bit != 0 {
		return
	}
	r.seen[w] |= bit
	if since < 0 {
		since = 0
	}
	// Reads run concurrently: keep the events in time order.
	e := Event{Block: block, At: Duration(since), Wait: Duration(wait), Size: r.x.Blocks[block].ULen, Stored: r.x.Blocks[block].CLen}
	i := len(r.events)
	for i > 0 && r.events[i-1].At > e.At {
		i--
	}
	r.events = append(r.events, Event{})
	copy(r.events[i+1:], r.events[i:])
	r.events[i] = e
}

// Stop ends recording.
func (r *Recorder) Stop() {
	r.mu.Lock()
	r.stopLocked()
	r.mu.Unlock()
}

func (r *Recorder) stopLocked() {
	if !r.stopped {
		r.stopped = true
		close(r.full)
	}
}

// Done is closed when recording has ended (by Stop, or by the first touch
// after the window).
func (r *Recorder) Done() <-chan struct{} { return r.full }

// Len returns the number of blocks recorded so far.
func (r *Recorder) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// Trace returns what was recorded so far as a trace.
func (r *Recorder) Trace() *Trace {
	r.mu.Lock()
	defer r.mu.Unlock()
	var size, stored int64
	for _, b := range r.x.Blocks {
		size += int64(b.ULen)
		stored += int64(b.CLen)
	}
	window := time.Since(r.start)
	if r.window > 0 && window > r.window {
		window = r.window
	}
	return &Trace{
		Version:     Version,
		Image:       r.image,
		Blocks:      len(r.x.Blocks),
		ImageBytes:  size,
		StoredBytes: stored,
		Recorded:    r.start.UTC().Truncate(time.Millisecond),
		Window:      Duration(window),
		Command:     r.command,
		Events:      append([]Event(nil), r.events...),
	}
}
