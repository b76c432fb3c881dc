package simulation

import (
	"container/heap"
	"time"

	"github.com/shoal-project/shoal/p2p"
)

// epoch is simulated time zero as a wall-clock time, for the p2p code that
// takes time.Time (rests, penalties). Any fixed instant would do.
var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// engine is the discrete-event core: a clock and a queue of events ordered
// by time, then by the order they were scheduled (so equal times run in a
// deterministic order).
type engine struct {
	now    time.Duration
	seq    uint64
	q      eventQueue
	events int64 // run so far
}

type event struct {
	at  time.Duration
	seq uint64
	fn  func()
}

type eventQueue []event

func (q eventQueue) Len() int { return len(q) }
func (q eventQueue) Less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].seq < q[j].seq
}
func (q eventQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *eventQueue) Push(x any)   { *q = append(*q, x.(event)) }
func (q *eventQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

// at runs fn at time t (at once, after the events already due, if t is
// in the past).
func (e *engine) at(t time.Duration, fn func()) {
	if t < e.now {
		t = e.now
	}
	e.seq++
	heap.Push(&e.q, event{at: t, seq: e.seq, fn: fn})
}

// after runs fn d from now.
func (e *engine) after(d time.Duration, fn func()) { e.at(e.now+d, fn) }

// run runs events until none is left or limit (if > 0) is passed. It
// reports whether the queue drained.
func (e *engine) run(limit time.Duration) bool {
	for e.q.Len() > 0 {
		ev := heap.Pop(&e.q).(event)
		if limit > 0 && ev.at > limit {
			return false
		}
		e.now = ev.at
		e.events++
		ev.fn()
	}
	return true
}

// wall is the simulated now as a time.Time.
func (e *engine) wall() time.Time { return epoch.Add(e.now) }

// simClock is the simulated time as a p2p.Clock.
type simClock struct{ e *engine }

var _ p2p.Clock = simClock{}

func (c simClock) Now() time.Time { return c.e.wall() }

// After delivers the simulated time on the channel once d has passed in
// the simulation. The channel is buffered, so the event never blocks.
func (c simClock) After(d time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	c.e.after(d, func() { ch <- c.e.wall() })
	return ch
}
