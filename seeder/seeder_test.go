package seeder

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/trace"
)

// memSource stands in for the fetch chain: it "fetches" a block by marking
// it local, and records what it was asked for, in order, with the priority.
type memSource struct {
	mu     sync.Mutex
	local  map[flat.BlockID]bool
	calls  [][]flat.BlockID
	prios  []fetch.Priority
	fail   map[flat.BlockID]int // fail this many times
	block  chan struct{}        // if set, FetchMany waits on it (or ctx)
	called chan struct{}
}

func newMem() *memSource {
	return &memSource{local: map[flat.BlockID]bool{}, fail: map[flat.BlockID]int{}, called: make(chan struct{}, 1000)}
}

func (m *memSource) Has(ctx context.Context, id flat.BlockID) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.local[id], nil
}

func (m *memSource) FetchMany(ctx context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	m.called <- struct{}{}
	if m.block != nil {
		select {
		case <-m.block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]flat.BlockID, len(blocks))
	out := map[flat.BlockID][]byte{}
	var err error
	for i, b := range blocks {
		ids[i] = b.ID
		if m.fail[b.ID] > 0 {
			m.fail[b.ID]--
			err = errors.New("registry: 503")
			continue
		}
		m.local[b.ID] = true
		out[b.ID] = make([]byte, b.ULen)
	}
	m.calls = append(m.calls, ids)
	m.prios = append(m.prios, fetch.PriorityOf(ctx))
	return out, err
}

func testIndex(n int) *flat.Index {
	x := &flat.Index{Blocks: make([]flat.Block, n)}
	for i := range x.Blocks {
		x.Blocks[i] = flat.Block{ID: flat.BlockID(sha256.Sum256([]byte(fmt.Sprint(i)))), CLen: 1 << 20, ULen: 2 << 20}
	}
	return x
}

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func TestTraceFirstThenFill(t *testing.T) {
	x := testIndex(20)
	m := newMem()
	m.local[x.Blocks[3].ID] = true // already cached: skipped
	tr := &trace.Trace{Events: []trace.Event{{Block: 9}, {Block: 3}, {Block: 15}, {Block: 0}}}
	var last Progress
	s := Start(context.Background(), x, m, m, Config{Trace: tr, Fill: true, BatchBytes: 2 << 20, Parallel: 1, Log: quiet(),
		OnProgress: func(p Progress) { last = p }})
	<-s.Done()
	s.Stop()
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	for i, b := range x.Blocks {
		if !m.local[b.ID] {
			t.Fatalf("block %d not local after fill", i)
		}
	}
	// Calls: trace blocks 9,15 then 0 (batches of 2 MiB = 2 blocks), then
	// the rest in table order.
	var got []flat.BlockID
	for _, c := range m.calls {
		got = append(got, c...)
	}
	want := []int{9, 15, 0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19}
	if len(got) != len(want) {
		t.Fatalf("fetched %d blocks, want %d", len(got), len(want))
	}
	for i, w := range want {
		if got[i] != x.Blocks[w].ID {
			t.Fatalf("fetch %d: block %v, want %d", i, got[i], w)
		}
	}
	if m.prios[0] != fetch.Prefetch || m.prios[len(m.prios)-1] != fetch.Background {
		t.Errorf("priorities %v: trace at prefetch, fill at background", m.prios)
	}
	p := s.Progress()
	if !p.Complete() || p.Done != 20 || p.TraceBlocks != 4 || p.TraceDone != 4 || p.Fetched != 19<<20 || last.Phase != PhaseComplete {
		t.Fatalf("progress %+v, last report %+v", p, last)
	}
}

func TestTraceOnly(t *testing.T) {
	x := testIndex(10)
	m := newMem()
	tr := &trace.Trace{Events: []trace.Event{{Block: 2}, {Block: 7}}}
	s := Start(context.Background(), x, m, m, Config{Trace: tr, Log: quiet()})
	<-s.Done()
	s.Stop()
	if p := s.Progress(); p.Phase != PhaseIdle || p.Done != 2 || p.Complete() {
		t.Fatalf("progress %+v", p)
	}
	if len(m.local) != 2 {
		t.Fatalf("%d blocks fetched, want the 2 of the trace", len(m.local))
	}
}

func TestRetriesThenFails(t *testing.T) {
	x := testIndex(6)
	m := newMem()
	m.fail[x.Blocks[1].ID] = 1  // recovers on the second pass
	m.fail[x.Blocks[4].ID] = 99 // never
	s := Start(context.Background(), x, m, m, Config{Fill: true, Attempts: 2, Log: quiet()})
	<-s.Done()
	s.Stop()
	if s.Err() == nil || s.Progress().Phase != PhaseFailed {
		t.Fatalf("err %v, progress %+v", s.Err(), s.Progress())
	}
	if !m.local[x.Blocks[1].ID] || m.local[x.Blocks[4].ID] {
		t.Fatal("retry did not fetch block 1, or block 4 appeared")
	}
	if p := s.Progress(); p.Done != 5 {
		t.Fatalf("done %d, want 5", p.Done)
	}
}

func TestStopDuringFill(t *testing.T) {
	x := testIndex(50)
	m := newMem()
	m.block = make(chan struct{})
	s := Start(context.Background(), x, m, m, Config{Fill: true, FillRate: 1 << 20, Log: quiet()})
	<-m.called // a fill batch is in flight
	stopped := make(chan struct{})
	go func() { s.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not end the fill")
	}
	if p := s.Progress(); p.Phase != PhaseStopped || p.Done == 50 {
		t.Fatalf("progress %+v", p)
	}
	if !errors.Is(s.Err(), context.Canceled) {
		t.Fatalf("err %v", s.Err())
	}
}
