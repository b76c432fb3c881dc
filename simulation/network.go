package simulation

import (
	"container/heap"
	"math"
	"time"
)

// psServer is a processor-sharing server: every job in service gets an equal
// share of capacity, but at most perJob. It models the registry's capped
// link (jobs are transfers, in bytes) and CPUs (jobs are work, in
// core-seconds; perJob 1: a job runs on one core at a time).
//
// Every job is served at the same rate, so the server keeps one virtual
// clock — the work each job has received since the server started — and a
// heap of the virtual times at which the jobs finish: a start or a finish
// costs O(log jobs), whatever the number of jobs (10,000 nodes pulling at
// once from one registry are one heap, not 10,000 rate updates).
type psServer struct {
	e        *engine
	capacity float64 // units per second
	perJob   float64 // units per second; +Inf: no per-job cap
	v        float64 // work each job in service has received
	last     time.Duration
	jobs     psHeap
	gen      uint64 // invalidates scheduled completions after a change
	served   float64
}

type psJob struct {
	finishV float64
	seq     uint64
	size    float64
	done    func()
}

type psHeap []*psJob

func (h psHeap) Len() int { return len(h) }
func (h psHeap) Less(i, j int) bool {
	if h[i].finishV != h[j].finishV {
		return h[i].finishV < h[j].finishV
	}
	return h[i].seq < h[j].seq
}
func (h psHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *psHeap) Push(x any)   { *h = append(*h, x.(*psJob)) }
func (h *psHeap) Pop() any {
	old := *h
	j := old[len(old)-1]
	*h = old[:len(old)-1]
	return j
}

func newPSServer(e *engine, capacity, perJob float64) *psServer {
	if perJob <= 0 {
		perJob = math.Inf(1)
	}
	return &psServer{e: e, capacity: capacity, perJob: perJob}
}

// rate is what each job in service gets now.
func (s *psServer) rate() float64 {
	if len(s.jobs) == 0 {
		return 0
	}
	return min(s.capacity/float64(len(s.jobs)), s.perJob)
}

// advance brings the virtual clock to now.
func (s *psServer) advance() {
	dt := (s.e.now - s.last).Seconds()
	s.last = s.e.now
	if dt > 0 && len(s.jobs) > 0 {
		r := s.rate()
		s.v += r * dt
		s.served += r * dt * float64(len(s.jobs))
	}
}

// add starts a job of size units; done runs when it has been served.
func (s *psServer) add(size float64, done func()) {
	s.advance()
	s.e.seq++
	heap.Push(&s.jobs, &psJob{finishV: s.v + size, seq: s.e.seq, size: size, done: done})
	s.reschedule()
}

// reschedule plans the event at which the first job finishes.
func (s *psServer) reschedule() {
	s.gen++
	if len(s.jobs) == 0 {
		return
	}
	gen := s.gen
	left := s.jobs[0].finishV - s.v
	d := time.Duration(math.Ceil(max(left, 0) / s.rate() * 1e9))
	s.e.after(d, func() {
		if s.gen != gen {
			return
		}
		s.advance()
		// Everything within rounding of the virtual clock is done.
		var done []func()
		for len(s.jobs) > 0 && s.jobs[0].finishV <= s.v+1e-6*max(1, s.jobs[0].size) {
			j := heap.Pop(&s.jobs).(*psJob)
			done = append(done, j.done)
		}
		s.reschedule()
		for _, f := range done {
			f()
		}
	})
}

// link is one direction of a node's network interface, shared by the peer
// transfers that cross it.
type link struct {
	capacity float64 // bytes/s
	flows    []*flow
}

// flow is a peer-to-peer transfer: it crosses the sender's up link and the
// receiver's down link and runs at the smaller of its equal shares of the
// two. (Not max-min fair: a flow held back elsewhere does not hand its
// share to the others. It keeps a start or finish O(flows on two links).)
type flow struct {
	net      *peerNet
	up, down *link
	left     float64 // bytes
	rate     float64
	last     time.Duration
	gen      uint64
	sent     float64 // bytes delivered so far
	done     func()
	finished bool
}

// peerNet runs the peer transfers.
type peerNet struct {
	e *engine
}

// start begins a transfer of size bytes from up to down; done runs when the
// last byte has crossed.
func (n *peerNet) start(up, down *link, size float64, done func()) *flow {
	f := &flow{net: n, up: up, down: down, left: size, last: n.e.now, done: done}
	n.settle(up, down)
	up.flows = append(up.flows, f)
	down.flows = append(down.flows, f)
	n.rerate(up, down)
	return f
}

// cancel stops a transfer; its done never runs.
func (n *peerNet) cancel(f *flow) {
	if f.finished {
		return
	}
	n.settle(f.up, f.down)
	f.finished = true
	f.gen++
	n.detach(f)
	n.rerate(f.up, f.down)
}

func (n *peerNet) detach(f *flow) {
	remove := func(l *link) {
		for i, g := range l.flows {
			if g == f {
				l.flows[i] = l.flows[len(l.flows)-1]
				l.flows = l.flows[:len(l.flows)-1]
				return
			}
		}
	}
	remove(f.up)
	remove(f.down)
}

// settle books the progress of every flow on the two links up to now.
func (n *peerNet) settle(links ...*link) {
	for _, l := range links {
		for _, f := range l.flows {
			if dt := (n.e.now - f.last).Seconds(); dt > 0 {
				b := min(f.rate*dt, f.left)
				f.left -= b
				f.sent += b
			}
			f.last = n.e.now
		}
	}
}

// rerate gives every flow on the links its new rate and completion time.
func (n *peerNet) rerate(links ...*link) {
	for _, l := range links {
		for _, f := range l.flows {
			r := min(f.up.capacity/float64(len(f.up.flows)), f.down.capacity/float64(len(f.down.flows)))
			f.rate = r
			f.gen++
			gen := f.gen
			d := time.Duration(math.Ceil(f.left / r * 1e9))
			n.e.after(d, func() {
				if f.gen != gen || f.finished {
					return
				}
				n.settle(f.up, f.down)
				f.sent += f.left
				f.left = 0
				f.finished = true
				n.detach(f)
				n.rerate(f.up, f.down)
				f.done()
			})
		}
	}
}
