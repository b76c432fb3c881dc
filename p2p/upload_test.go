package p2p

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// slowStream is a block request a peer sends and then reads at rate bytes
// a second, as a hostile or broken peer might, to hold one of the
// server's upload slots.
type slowStream struct {
	read  atomic.Int64
	ended chan struct{} // closed when the server ended the answer (reset, or whole)
	at    atomic.Int64  // when, in ns since start
}

// openSlow has from ask to for blocks (with FORCE, which is always served)
// on a stream of its own, read at rate bytes/s until the stream ends or
// the test does.
func openSlow(t *testing.T, from, to *Node, image string, blocks []flat.Block, rate int, start time.Time) *slowStream {
	t.Helper()
	st, err := from.host.NewStream(t.Context(), to.ID(), ProtocolBlock)
	if err != nil {
		t.Fatalf("open stream: %v", err)
	}
	t.Cleanup(func() { st.Reset() })
	q := request{image: image, flags: flagForce}
	for _, b := range blocks {
		q.cids = append(q.cids, b.ID.CID().Bytes())
	}
	if _, err := st.Write(appendFrame(nil, q.encode())); err != nil {
		t.Fatalf("send request: %v", err)
	}
	_ = st.CloseWrite()
	s := &slowStream{ended: make(chan struct{})}
	go func() {
		defer close(s.ended)
		defer func() { s.at.Store(int64(time.Since(start))) }()
		const tick = 100 * time.Millisecond
		buf := make([]byte, max(1, rate/10))
		for {
			k, err := st.Read(buf)
			s.read.Add(int64(k))
			if err != nil {
				return
			}
			if err := waitOrDone(t.Context(), tick); err != nil {
				return
			}
		}
	}()
	return s
}

func waitOrDone(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// honestWait has n ask s for block b (with FORCE) until it is served, as
// a reader would after each BUSY (resting BusyBackoff), for at most
// limit; it returns how long that took and how many BUSY answers came.
func honestWait(t *testing.T, n, s *Node, image string, b flat.Block, limit time.Duration) (took time.Duration, busy int, ok bool) {
	t.Helper()
	start := time.Now()
	for time.Since(start) < limit {
		o := n.request(t.Context(), s.ID(), image, []flat.Block{b}, reqOpts{flags: flagForce})
		if o.err == nil && len(o.got) == 1 {
			return time.Since(start), busy, true
		}
		if !o.busy {
			t.Fatalf("honest request: %d blocks, %v", len(o.got), o.err)
		}
		busy++
		time.Sleep(30 * time.Millisecond)
	}
	return time.Since(start), busy, false
}

// Peers that read their answers slowly (64 KiB/s on each stream, as the
// attack in issue 17 did, or not at all) cannot starve the others. One
// such peer, asking on as many streams as the node has slots, holds only
// its share of them (UploadStreamsPerPeer) and an honest peer is served
// at once: on its first request, with no BUSY answer (how long the 2 MiB
// answer then takes is the machine's business; 3.2 s was seen at a load
// of 20). Two of them, which hold every slot between them, lose a
// stalled one to the honest request (stallPreempt), within wait. Either
// way the slow answers end by the minimum transfer rate
// (UploadMinBytesPerSec), freeing their slots within seconds.
func TestSlowReaderCannotStarve(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		rate  int           // bytes/s each slow stream reads
		peers int           // slow peers, sharing the node's slots
		wait  time.Duration // 0: served on the first request
	}{
		{"trickle", 64 << 10, 1, 0},
		{"stalled", 10, 1, 0}, // a byte now and then: never a window update
		{"two peers trickle", 64 << 10, 2, 4 * time.Second},
		{"two peers stalled", 10, 2, 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			const size = 2 << 20
			im := newTestImage("slow-reader-"+tc.name, 8, size)
			s := startNode(t, Config{Blocks: openStore(t, im, nil)})
			if err := s.JoinImage(ctx, im.digest, im.index); err != nil {
				t.Fatal(err)
			}
			honest := startNode(t, Config{})
			var slow []*Node
			for range tc.peers {
				slow = append(slow, startNode(t, Config{}))
			}
			for _, n := range append(slow, honest) {
				if err := n.Connect(ctx, s.Addrs()[0]); err != nil {
					t.Fatal(err)
				}
			}
			slots, perPeer := Defaults().MaxUploadStreams, Defaults().UploadStreamsPerPeer
			start := time.Now()
			var streams []*slowStream
			for i := range slots {
				streams = append(streams, openSlow(t, slow[i%len(slow)], s, im.digest, im.index.Blocks, tc.rate, start))
			}
			// The slow peers hold what the server lets them hold (their
			// shares, up to every slot) before the honest peer asks: had it
			// asked sooner it would have found slots free and tested
			// nothing.
			want := int64(min(slots, tc.peers*perPeer))
			eventually(t, 10*time.Second, "the slow peers to hold their slots", func() bool { return s.Stats().ActiveUploads == want })
			held := s.Stats().ActiveUploads
			took, busy, ok := honestWait(t, honest, s, im.digest, im.index.Blocks[0], 20*time.Second)
			st := s.Stats()
			t.Logf("%d slow peers hold %d of %d slots; the honest peer was served after %v (%d BUSY answers), served %v; BUSY for share %d, preempted %d",
				tc.peers, held, slots, took, busy, ok, st.PeerBusy, st.UploadsPreempted)
			switch {
			case tc.wait == 0 && (!ok || busy > 0):
				t.Errorf("the honest peer got %d BUSY answers (served %v after %v); want it served on its first request", busy, ok, took)
			case tc.wait > 0 && (!ok || took > tc.wait):
				t.Errorf("the honest peer waited %v for a slot (%d BUSY answers, served %v); want it served within %v", took, busy, ok, tc.wait)
			}
			// The slow answers end (reset) by their minimum rate: none
			// holds its slot for long.
			for i, ss := range streams {
				select {
				case <-ss.ended:
				case <-time.After(30*time.Second - time.Since(start)):
					t.Fatalf("slow stream %d still open after 30 s, %d bytes read", i, ss.read.Load())
				}
				t.Logf("slow stream %d ended after %v, %d bytes read", i, time.Duration(ss.at.Load()), ss.read.Load())
			}
			eventually(t, 5*time.Second, "every upload slot to be free", func() bool { return s.Stats().ActiveUploads == 0 })
			if d := time.Since(start); d > 15*time.Second {
				t.Errorf("the slow answers held their slots for %v", d)
			}
			if st := s.Stats(); st.UploadsCut+st.UploadsPreempted == 0 {
				t.Errorf("S stats %+v: no response cut or preempted", st)
			}
		})
	}
}

// A response ends by UploadTimeout from the moment it holds its slot,
// however steadily its reader takes it.
func TestUploadTimeout(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const timeout = 1500 * time.Millisecond
	im := newTestImage("upload-timeout", 8, 2<<20)
	s := startNode(t, Config{Blocks: openStore(t, im, nil), UploadTimeout: timeout})
	if err := s.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	r := startNode(t, Config{})
	if err := r.Connect(ctx, s.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// 1 MiB/s: four times the minimum rate; the 16 MiB would take 16 s.
	ss := openSlow(t, r, s, im.digest, im.index.Blocks, 1<<20, start)
	select {
	case <-ss.ended:
	case <-time.After(10 * time.Second):
		t.Fatalf("the response still runs after 10 s, %d bytes read", ss.read.Load())
	}
	took := time.Duration(ss.at.Load())
	t.Logf("the response ended after %v, %d bytes read", took, ss.read.Load())
	if took < timeout-100*time.Millisecond || took > timeout+time.Second {
		t.Errorf("the response ended after %v, want about UploadTimeout (%v)", took, timeout)
	}
	if st := s.Stats(); st.UploadsCut != 1 {
		t.Errorf("S stats: %d responses cut, want 1", st.UploadsCut)
	}
}

// A peer that holds its share of the upload slots (UploadStreamsPerPeer)
// gets BUSY while the node still serves another peer.
func TestUploadStreamsPerPeer(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	im := newTestImage("per-peer-slots", 8, 16<<10)
	gate, open := newGate(t)
	s := startNode(t, Config{Blocks: gatedGetter{openStore(t, im, nil), gate}})
	if err := s.JoinImage(ctx, im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	if d := Defaults(); d.UploadStreamsPerPeer != 2 || d.MaxUploadStreams != 4 {
		t.Fatalf("defaults: %d slots per peer of %d; the test assumes 2 of 4", d.UploadStreamsPerPeer, d.MaxUploadStreams)
	}
	a, b := startNode(t, Config{}), startNode(t, Config{})
	holdSlot(t, a, s, im, im.index.Blocks[0])
	holdSlot(t, a, s, im, im.index.Blocks[1])
	o := a.request(ctx, s.ID(), im.digest, im.index.Blocks[2:3], reqOpts{})
	if !o.busy || len(o.got) != 0 {
		t.Errorf("A's third request: %d blocks, busy %v, %v; want BUSY", len(o.got), o.busy, o.err)
	}
	if st := s.Stats(); st.PeerBusy != 1 || st.ActiveUploads != 2 {
		t.Errorf("S stats: BUSY for share %d, uploads running %d; want 1 and 2", st.PeerBusy, st.ActiveUploads)
	}
	// B is served meanwhile: it takes a third slot.
	done := make(chan outcome, 1)
	if err := b.Connect(ctx, s.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	go func() {
		done <- b.request(ctx, s.ID(), im.digest, im.index.Blocks[3:4], reqOpts{firstByte: 10 * time.Second})
	}()
	eventually(t, 5*time.Second, "B's request to be served", func() bool { return s.Stats().ActiveUploads == 3 })
	open()
	if o := <-done; o.err != nil || len(o.got) != 1 {
		t.Errorf("B's request: %d blocks, %v", len(o.got), o.err)
	}
	if st := s.Stats(); st.BusyAnswers != 1 {
		t.Errorf("S sent %d BUSY answers, want 1", st.BusyAnswers)
	}
}

// The admission itself: per-peer shares, the node's slots, and a stalled
// response giving its slot up to another peer (and not to its own).
func TestUploaderAdmission(t *testing.T) {
	t.Parallel()
	u := newUploader(4, 2, 0)
	var stopped []peer.ID
	take := func(p peer.ID) (*upload, busyReason, *upload) {
		return u.acquire(p, func() { stopped = append(stopped, p) })
	}
	a1, _, _ := take("a")
	a2, _, _ := take("a")
	if up, why, _ := take("a"); up != nil || why != peerBusy {
		t.Fatalf("a's third slot: %v, %v; want BUSY for its share", up, why)
	}
	b1, _, _ := take("b")
	take("b")
	if a1 == nil || a2 == nil || b1 == nil || u.active() != 4 {
		t.Fatalf("four slots for two peers: %d active", u.active())
	}
	if up, why, _ := take("c"); up != nil || why != nodeBusy {
		t.Fatalf("c with every slot taken: %v, %v; want BUSY", up, why)
	}
	// a1 and b1 stall; a1 longest. c preempts a1; b may not preempt b1.
	now := time.Now()
	a1.stalledSince.Store(now.Add(-3 * stallPreempt).UnixNano())
	b1.stalledSince.Store(now.Add(-2 * stallPreempt).UnixNano())
	c, _, pre := take("c")
	if c == nil || pre != a1 || !a1.preempted.Load() || !slices.Equal(stopped, []peer.ID{"a"}) {
		t.Fatalf("c: %v preempting %v (stopped %v); want a1's slot", c, pre, stopped)
	}
	a1.release() // preempted: its slot is c's now
	if u.active() != 4 {
		t.Fatalf("%d active after the preempted response ended, want 4", u.active())
	}
	if up, why, _ := take("b"); up != nil || why != peerBusy {
		t.Fatalf("b preempting itself: %v, %v", up, why)
	}
	// A response stalled for less than stallPreempt keeps its slot.
	b1.stalledSince.Store(time.Now().UnixNano())
	if up, why, _ := take("d"); up != nil || why != nodeBusy {
		t.Fatalf("d with no response stalled long: %v, %v; want BUSY", up, why)
	}
	// A waiter gets the next slot freed.
	b1.stalledSince.Store(0)
	got := make(chan *upload, 1)
	go func() {
		up, _, err := u.acquireWait(t.Context(), "d", nil)
		if err != nil {
			t.Error(err)
		}
		got <- up
	}()
	// The waiter registers nowhere the test can see, so a pause gives it
	// time to start waiting; if it has not, it takes the freed slot at
	// its first try, and the check below still holds (it is not a check
	// that something did not happen).
	time.Sleep(20 * time.Millisecond)
	c.release()
	select {
	case up := <-got:
		if up == nil || up.p != "d" {
			t.Fatalf("waiter got %v", up)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get the freed slot")
	}
	c.release() // twice: no effect
	if u.active() != 4 {
		t.Fatalf("%d active, want 4", u.active())
	}
}
