package blockstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// testBlock returns a block of size pseudo-random bytes determined by seed.
func testBlock(seed uint64, size int) Block {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	data := make([]byte, size)
	_, _ = rand.NewChaCha8(key).Read(data) // never fails
	return Block{ID: flat.Sum(data), Data: data}
}

func testBlocks(first uint64, n, size int) []Block {
	out := make([]Block, n)
	for i := range out {
		out[i] = testBlock(first+uint64(i), size)
	}
	return out
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// openTest opens a store with small badger sizes, closed at cleanup.
func openTest(t testing.TB, dir string, opts ...Option) *Store {
	t.Helper()
	base := []Option{
		WithLogger(testLogger(t)),
		WithMemTableSize(1 << 20),
		WithValueLogFileSize(1 << 20),
		WithGCInterval(0),
	}
	s, err := Open(t.Context(), dir, append(base, opts...)...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// evictLog records OnEvict calls.
type evictLog struct {
	mu  sync.Mutex
	ids []flat.BlockID
}

func (l *evictLog) hook(id flat.BlockID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ids = append(l.ids, id)
}

func (l *evictLog) take() []flat.BlockID {
	l.mu.Lock()
	defer l.mu.Unlock()
	ids := l.ids
	l.ids = nil
	return ids
}

func put(t testing.TB, s *Store, bs ...Block) {
	t.Helper()
	for _, b := range bs {
		if err := s.Put(t.Context(), b.ID, b.Data); err != nil {
			t.Fatalf("Put: %v", err)
		}
	}
}

func mustGet(t testing.TB, s *Store, b Block) {
	t.Helper()
	got, err := s.Get(t.Context(), b.ID)
	if err != nil {
		t.Fatalf("Get %s: %v", b.ID, err)
	}
	if !bytes.Equal(got, b.Data) {
		t.Fatalf("Get %s: wrong bytes", b.ID)
	}
}

// wantStored checks Has for every block: stored ones must be there, others not.
func wantStored(t testing.TB, s *Store, stored []Block, gone []Block) {
	t.Helper()
	for _, b := range stored {
		if ok, err := s.Has(t.Context(), b.ID); err != nil || !ok {
			t.Errorf("Has(%s) = %v, %v; want true", b.ID, ok, err)
		}
	}
	for _, b := range gone {
		if ok, err := s.Has(t.Context(), b.ID); err != nil || ok {
			t.Errorf("Has(%s) = %v, %v; want false", b.ID, ok, err)
		}
	}
}

func ids(bs ...Block) []flat.BlockID {
	out := make([]flat.BlockID, len(bs))
	for i, b := range bs {
		out[i] = b.ID
	}
	return out
}

// checkIndex verifies the index's internal invariants.
func checkIndex(t testing.TB, s *Store) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var used, pinned int64
	var unpinned int
	for id, e := range s.idx.entries {
		used += e.size
		if s.idx.pins[id] > 0 {
			pinned += e.size
			if e.elem != nil {
				t.Errorf("pinned block %s is in the LRU", id)
			}
		} else {
			unpinned++
			if e.elem == nil {
				t.Errorf("unpinned block %s is not in the LRU", id)
			}
		}
	}
	if used != s.idx.used || pinned != s.idx.pinnedBytes || unpinned != s.idx.lru.Len() {
		t.Errorf("index: used %d (want %d), pinned %d (want %d), lru %d (want %d)",
			s.idx.used, used, s.idx.pinnedBytes, pinned, s.idx.lru.Len(), unpinned)
	}
	var last uint64
	for el := s.idx.lru.Back(); el != nil; el = el.Prev() {
		if seq := el.Value.(*entry).seq; seq < last {
			t.Errorf("LRU out of order: seq %d after %d", seq, last)
		} else {
			last = seq
		}
	}
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		size int
	}{
		{"empty", 0},
		{"one byte", 1},
		{"inline in LSM", 1000},
		{"value log", 64 << 10},
		{"as large as a value-log file", 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			s := openTest(t, t.TempDir())
			b := testBlock(1, tt.size)

			put(t, s, b)
			wantStored(t, s, []Block{b}, nil)
			mustGet(t, s, b)
			if n, err := s.Size(b.ID); err != nil || n != int64(tt.size) {
				t.Errorf("Size = %d, %v; want %d", n, err, tt.size)
			}
			put(t, s, b) // idempotent
			if st := s.Stats(); st.Blocks != 1 || st.Bytes != int64(tt.size) {
				t.Errorf("Stats after second Put = %+v; want 1 block of %d bytes", st, tt.size)
			}

			if err := s.Delete(ctx, b.ID); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			wantStored(t, s, nil, []Block{b})
			if _, err := s.Get(ctx, b.ID); !errors.Is(err, ErrNotFound) {
				t.Errorf("Get after Delete: %v; want ErrNotFound", err)
			}
			if _, err := s.Size(b.ID); !errors.Is(err, ErrNotFound) {
				t.Errorf("Size after Delete: %v; want ErrNotFound", err)
			}
			if err := s.Delete(ctx, b.ID); err != nil {
				t.Errorf("Delete of an absent block: %v; want nil", err)
			}
			if st := s.Stats(); st.Blocks != 0 || st.Bytes != 0 {
				t.Errorf("Stats after Delete = %+v; want empty", st)
			}
			checkIndex(t, s)
		})
	}
}

func TestPutTooLarge(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir()) // 1 MiB value-log files
	b := testBlock(1, 1<<20+1)
	if err := s.Put(t.Context(), b.ID, b.Data); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Put: %v; want ErrTooLarge", err)
	}
	if err := s.PutMany(t.Context(), []Block{testBlock(2, 10), b}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("PutMany: %v; want ErrTooLarge", err)
	}
	if st := s.Stats(); st.Blocks != 0 {
		t.Errorf("Stats = %+v; want nothing stored", st)
	}
}

func TestPutRejectsWrongBytes(t *testing.T) {
	t.Parallel()
	good := testBlock(1, 4096)
	other := testBlock(2, 4096)
	tests := []struct {
		name string
		data []byte
	}{
		{"other block", other.Data},
		{"truncated", good.Data[:len(good.Data)-1]},
		{"flipped bit", func() []byte {
			d := bytes.Clone(good.Data)
			d[100] ^= 1
			return d
		}()},
		{"empty", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			s := openTest(t, t.TempDir())
			if err := s.Put(ctx, good.ID, tt.data); !errors.Is(err, ErrCorrupt) {
				t.Errorf("Put: %v; want ErrCorrupt", err)
			}
			err := s.PutMany(ctx, []Block{other, {ID: good.ID, Data: tt.data}})
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("PutMany: %v; want ErrCorrupt", err)
			}
			wantStored(t, s, nil, []Block{good, other})
			if st := s.Stats(); st.Blocks != 0 {
				t.Errorf("Stats = %+v; want nothing stored", st)
			}
		})
	}
}

func TestPutMany(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir())
	bs := testBlocks(1, 50, 2048)
	put(t, s, bs[0])
	batch := append(slices.Clone(bs), bs[3], bs[7]) // already stored and duplicates
	if err := s.PutMany(t.Context(), batch); err != nil {
		t.Fatalf("PutMany: %v", err)
	}
	if st := s.Stats(); st.Blocks != len(bs) || st.Bytes != int64(len(bs)*2048) {
		t.Errorf("Stats = %+v; want %d blocks", st, len(bs))
	}
	for _, b := range bs {
		mustGet(t, s, b)
	}
	checkIndex(t, s)
}

func TestContextCanceled(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir())
	b := testBlock(1, 100)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := s.Put(ctx, b.ID, b.Data); !errors.Is(err, context.Canceled) {
		t.Errorf("Put: %v; want context.Canceled", err)
	}
	if _, err := s.Get(ctx, b.ID); !errors.Is(err, context.Canceled) {
		t.Errorf("Get: %v; want context.Canceled", err)
	}
}

func TestQuota(t *testing.T) {
	t.Parallel()
	const size = 1024
	tests := []struct {
		name   string
		blocks int // quota in blocks
		run    func(t *testing.T, s *Store, b []Block, ev *evictLog)
	}{
		{"evicts least recently used", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3])
			put(t, s, b[4])
			wantStored(t, s, b[1:5], b[:1])
			if got := ev.take(); !slices.Equal(got, ids(b[0])) {
				t.Errorf("evicted %v; want %v", got, ids(b[0]))
			}
		}},
		{"get keeps a block", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3])
			mustGet(t, s, b[0])
			put(t, s, b[4], b[5])
			wantStored(t, s, []Block{b[0], b[3], b[4], b[5]}, b[1:3])
			if got := ev.take(); !slices.Equal(got, ids(b[1], b[2])) {
				t.Errorf("evicted %v; want %v", got, ids(b[1], b[2]))
			}
		}},
		{"put of a stored block counts as use", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3], b[0], b[4])
			wantStored(t, s, []Block{b[0], b[2], b[3], b[4]}, b[1:2])
		}},
		{"has does not count as use", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3])
			wantStored(t, s, b[:1], nil)
			put(t, s, b[4])
			wantStored(t, s, nil, b[:1])
		}},
		{"one large block evicts several", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3])
			big := testBlock(100, 3*size)
			put(t, s, big)
			wantStored(t, s, []Block{b[3], big}, b[:3])
			if st := s.Stats(); st.Bytes != 4*size {
				t.Errorf("Stats = %+v; want %d bytes", st, 4*size)
			}
		}},
		{"pinned blocks are never evicted", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2], b[3])
			if err := s.Pin(t.Context(), b[0].ID); err != nil {
				t.Fatal(err)
			}
			put(t, s, b[4], b[5], b[6], b[7], b[8])
			wantStored(t, s, []Block{b[0], b[6], b[7], b[8]}, b[1:6])
			if st := s.Stats(); st.PinnedBlocks != 1 || st.PinnedBytes != size {
				t.Errorf("Stats = %+v; want 1 pinned block", st)
			}
		}},
		{"full when only pinned blocks remain", 2, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			ctx := t.Context()
			put(t, s, b[0], b[1])
			for _, x := range b[:2] {
				if err := s.Pin(ctx, x.ID); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Put(ctx, b[2].ID, b[2].Data); !errors.Is(err, ErrFull) {
				t.Fatalf("Put: %v; want ErrFull", err)
			}
			wantStored(t, s, b[:2], b[2:3])
			mustGet(t, s, b[0])
			mustGet(t, s, b[1])
			if got := ev.take(); len(got) != 0 {
				t.Errorf("evicted %v; want nothing", got)
			}
			if err := s.Unpin(ctx, b[0].ID); err != nil {
				t.Fatal(err)
			}
			put(t, s, b[2])
			wantStored(t, s, b[1:3], b[:1])
		}},
		{"full evicts nothing when room cannot be made", 3, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0], b[1], b[2])
			if err := s.Pin(t.Context(), b[0].ID); err != nil {
				t.Fatal(err)
			}
			big := testBlock(100, 3*size)
			if err := s.Put(t.Context(), big.ID, big.Data); !errors.Is(err, ErrFull) {
				t.Fatalf("Put: %v; want ErrFull", err)
			}
			wantStored(t, s, b[:3], []Block{big})
		}},
		{"block larger than the quota", 2, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			put(t, s, b[0])
			big := testBlock(100, 3*size)
			if err := s.Put(t.Context(), big.ID, big.Data); !errors.Is(err, ErrFull) {
				t.Fatalf("Put: %v; want ErrFull", err)
			}
			wantStored(t, s, b[:1], []Block{big})
		}},
		{"putmany is all or nothing against the quota", 4, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			ctx := t.Context()
			put(t, s, b[0], b[1])
			if err := s.Pin(ctx, b[0].ID); err != nil {
				t.Fatal(err)
			}
			if err := s.PutMany(ctx, b[2:6]); !errors.Is(err, ErrFull) {
				t.Fatalf("PutMany of 4 with 1 pinned: %v; want ErrFull", err)
			}
			wantStored(t, s, b[:2], b[2:6])
			if err := s.PutMany(ctx, b[2:5]); err != nil {
				t.Fatalf("PutMany of 3: %v", err)
			}
			wantStored(t, s, []Block{b[0], b[2], b[3], b[4]}, b[1:2])
		}},
		{"pin before the block arrives", 2, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			ctx := t.Context()
			if err := s.Pin(ctx, b[0].ID); err != nil {
				t.Fatalf("Pin of an absent block: %v", err)
			}
			if n, err := s.PinCount(b[0].ID); err != nil || n != 1 {
				t.Errorf("PinCount = %d, %v; want 1", n, err)
			}
			wantStored(t, s, nil, b[:1])
			put(t, s, b[0], b[1], b[2], b[3])
			wantStored(t, s, []Block{b[0], b[3]}, b[1:3])
			if st := s.Stats(); st.PinnedIDs != 1 || st.PinnedBlocks != 1 {
				t.Errorf("Stats = %+v; want 1 pinned", st)
			}
		}},
		{"pins are counted", 2, func(t *testing.T, s *Store, b []Block, ev *evictLog) {
			ctx := t.Context()
			put(t, s, b[0])
			for range 2 {
				if err := s.Pin(ctx, b[0].ID); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Unpin(ctx, b[0].ID); err != nil {
				t.Fatal(err)
			}
			if err := s.Delete(ctx, b[0].ID); !errors.Is(err, ErrPinned) {
				t.Fatalf("Delete with one pin left: %v; want ErrPinned", err)
			}
			put(t, s, b[1], b[2])
			wantStored(t, s, []Block{b[0], b[2]}, b[1:2])
			if err := s.Unpin(ctx, b[0].ID); err != nil {
				t.Fatal(err)
			}
			if err := s.Unpin(ctx, b[0].ID); !errors.Is(err, ErrNotPinned) {
				t.Errorf("Unpin without pins: %v; want ErrNotPinned", err)
			}
			// Unpinning counts as a use: b[2] is now older than b[0].
			put(t, s, b[3])
			wantStored(t, s, []Block{b[0], b[3]}, b[1:3])
			if err := s.Delete(ctx, b[0].ID); err != nil {
				t.Errorf("Delete after the last Unpin: %v", err)
			}
			if got := ev.take(); !slices.Equal(got, ids(b[1], b[2], b[0])) {
				t.Errorf("OnEvict got %v; want %v", got, ids(b[1], b[2], b[0]))
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ev := &evictLog{}
			s := openTest(t, t.TempDir(), WithQuota(int64(tt.blocks*size)), WithOnEvict(ev.hook))
			tt.run(t, s, testBlocks(1, 10, size), ev)
			if st := s.Stats(); st.Bytes > st.Quota {
				t.Errorf("Stats = %+v: over quota", st)
			}
			checkIndex(t, s)
		})
	}
}

func TestRestart(t *testing.T) {
	t.Parallel()
	const size = 1024
	ctx := t.Context()
	dir := t.TempDir()
	b := testBlocks(1, 8, size)

	s, err := Open(ctx, dir, WithLogger(testLogger(t)), WithQuota(5*size), WithMemTableSize(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, b[0], b[1], b[2], b[3], b[4])
	mustGet(t, s, b[0]) // order, oldest first: 1 2 3 4 0
	for _, pin := range []Block{b[2], b[2], b[6]} {
		if err := s.Pin(ctx, pin.ID); err != nil {
			t.Fatal(err)
		}
	}
	before := s.Stats()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	ev := &evictLog{}
	s = openTest(t, dir, WithQuota(5*size), WithOnEvict(ev.hook))
	if after := s.Stats(); after != before {
		t.Errorf("Stats after restart = %+v; want %+v", after, before)
	}
	for _, tc := range []struct {
		b    Block
		pins int
	}{{b[2], 2}, {b[6], 1}, {b[0], 0}} {
		if n, err := s.PinCount(tc.b.ID); err != nil || n != tc.pins {
			t.Errorf("PinCount(%s) = %d, %v; want %d", tc.b.ID, n, err, tc.pins)
		}
	}
	if err := s.Delete(ctx, b[2].ID); !errors.Is(err, ErrPinned) {
		t.Errorf("Delete of a pinned block after restart: %v; want ErrPinned", err)
	}
	// 2 is pinned, so the next two puts evict 1 then 3.
	put(t, s, b[5], b[7])
	wantStored(t, s, []Block{b[0], b[2], b[4], b[5], b[7]}, []Block{b[1], b[3]})
	if got := ev.take(); !slices.Equal(got, ids(b[1], b[3])) {
		t.Errorf("evicted %v; want %v", got, ids(b[1], b[3]))
	}
	for _, x := range []Block{b[0], b[2], b[4], b[5], b[7]} {
		mustGet(t, s, x)
	}
	checkIndex(t, s)
}

func TestRestartLowersQuota(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	b := testBlocks(1, 4, 1000)
	s, err := Open(t.Context(), dir, WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, b...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ev := &evictLog{}
	s = openTest(t, dir, WithQuota(2000), WithOnEvict(ev.hook))
	wantStored(t, s, b[2:], b[:2])
	if got := ev.take(); !slices.Equal(got, ids(b[0], b[1])) {
		t.Errorf("evicted %v; want %v", got, ids(b[0], b[1]))
	}
	checkIndex(t, s)
}

// TestOpenRepairs checks that Open copes with what an interrupted batch can
// leave: bytes without an access record and an access record without bytes.
func TestOpenRepairs(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	b := testBlocks(1, 3, 2000)
	s, err := Open(t.Context(), dir, WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, b[0])
	err = s.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(blockKey(prefixData, b[1].ID), b[1].Data); err != nil {
			return err
		}
		return txn.Set(blockKey(prefixAccess, b[2].ID), encodeAccess(99, 2000))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTest(t, dir)
	wantStored(t, s, b[:2], b[2:])
	mustGet(t, s, b[1])
	if st := s.Stats(); st.Blocks != 2 || st.Bytes != 4000 {
		t.Errorf("Stats = %+v; want 2 blocks, 4000 bytes", st)
	}
	err = s.db.View(func(txn *badger.Txn) error {
		_, err := txn.Get(blockKey(prefixAccess, b[2].ID))
		return err
	})
	if !errors.Is(err, badger.ErrKeyNotFound) {
		t.Errorf("stale access record: %v; want it deleted", err)
	}
	checkIndex(t, s)
}

func TestOpenRefusesForeignDatabase(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(txn *badger.Txn) error { return txn.Set([]byte("k"), []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(t.Context(), dir, WithLogger(testLogger(t))); err == nil {
		s.Close()
		t.Fatal("Open of a foreign badger database succeeded")
	}
}

func TestOptionsValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opt  Option
	}{
		{"negative quota", WithQuota(-1)},
		{"nil logger", WithLogger(nil)},
		{"negative gc interval", WithGCInterval(-1)},
		{"negative min free", WithMinFreeSpace(-1)},
		{"tiny memtable", WithMemTableSize(1 << 10)},
		{"tiny value log", WithValueLogFileSize(1 << 10)},
		{"huge value log", WithValueLogFileSize(2 << 30)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := filepath.Join(t.TempDir(), "store")
			if s, err := Open(t.Context(), dir, tt.opt); err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("Open with a bad option touched the directory: %v", err)
			}
		})
	}
}

func TestCorruption(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		corrupt func(good []byte) []byte
		reopen  bool // corrupt through badger opened directly while the store is closed
		pinned  bool
	}{
		{name: "flipped bit", corrupt: func(d []byte) []byte {
			d = bytes.Clone(d)
			d[len(d)/2] ^= 0x10
			return d
		}},
		{name: "truncated", corrupt: func(d []byte) []byte { return bytes.Clone(d[:len(d)-7]) }},
		{name: "empty", corrupt: func([]byte) []byte { return []byte{} }},
		{name: "another block", corrupt: func([]byte) []byte { return testBlock(99, 8192).Data }},
		{name: "pinned", pinned: true, corrupt: func(d []byte) []byte {
			d = bytes.Clone(d)
			d[0] ^= 1
			return d
		}},
		{name: "while closed", reopen: true, corrupt: func(d []byte) []byte {
			d = bytes.Clone(d)
			d[len(d)-1] ^= 0x80
			return d
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			dir := t.TempDir()
			ev := &evictLog{}
			b := testBlock(1, 8192)
			other := testBlock(2, 8192)
			s := openTest(t, dir, WithOnEvict(ev.hook))
			put(t, s, b, other)
			if tt.pinned {
				if err := s.Pin(ctx, b.ID); err != nil {
					t.Fatal(err)
				}
			}
			bad := tt.corrupt(b.Data)
			setBad := func(txn *badger.Txn) error { return txn.Set(blockKey(prefixData, b.ID), bad) }
			if tt.reopen {
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				db, err := badger.Open(badgerOptions(dir, s.cfg, testLogger(t)))
				if err != nil {
					t.Fatal(err)
				}
				if err := db.Update(setBad); err != nil {
					t.Fatal(err)
				}
				if err := db.Close(); err != nil {
					t.Fatal(err)
				}
				s = openTest(t, dir, WithOnEvict(ev.hook))
			} else if err := s.db.Update(setBad); err != nil {
				t.Fatal(err)
			}

			got, err := s.Get(ctx, b.ID)
			if !errors.Is(err, ErrCorrupt) || got != nil {
				t.Fatalf("Get = %d bytes, %v; want nil, ErrCorrupt", len(got), err)
			}
			if got := ev.take(); !slices.Equal(got, ids(b)) {
				t.Errorf("OnEvict got %v; want %v", got, ids(b))
			}
			wantStored(t, s, []Block{other}, []Block{b})
			if _, err := s.Get(ctx, b.ID); !errors.Is(err, ErrNotFound) {
				t.Errorf("second Get: %v; want ErrNotFound", err)
			}
			mustGet(t, s, other)
			wantPins := 0
			if tt.pinned {
				wantPins = 1
			}
			if n, _ := s.PinCount(b.ID); n != wantPins {
				t.Errorf("PinCount = %d; want %d", n, wantPins)
			}
			if st := s.Stats(); st.Blocks != 1 || st.Bytes != 8192 {
				t.Errorf("Stats = %+v; want only the good block", st)
			}

			put(t, s, b) // a fresh copy replaces the bad one
			mustGet(t, s, b)
			checkIndex(t, s)
		})
	}
}

func TestClosed(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openTest(t, t.TempDir())
	b := testBlock(1, 100)
	put(t, s, b)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	checks := map[string]error{
		"Put":     s.Put(ctx, b.ID, b.Data),
		"PutMany": s.PutMany(ctx, []Block{b}),
		"Delete":  s.Delete(ctx, b.ID),
		"Pin":     s.Pin(ctx, b.ID),
		"Unpin":   s.Unpin(ctx, b.ID),
	}
	_, checks["Get"] = s.Get(ctx, b.ID)
	_, checks["Has"] = s.Has(ctx, b.ID)
	_, checks["Size"] = s.Size(b.ID)
	_, checks["PinCount"] = s.PinCount(b.ID)
	for name, err := range checks {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v; want ErrClosed", name, err)
		}
	}
	if st := s.Stats(); st.Blocks != 1 {
		t.Errorf("Stats after Close = %+v", st)
	}
}

func TestConcurrent(t *testing.T) {
	t.Parallel()
	const (
		workers = 8
		ops     = 300
		size    = 1024
	)
	dir := t.TempDir()
	var evictions sync.Map
	s := openTest(t, dir, WithQuota(32*size), WithOnEvict(func(id flat.BlockID) { evictions.Store(id, true) }))
	pool := make([]Block, 128)
	for i := range pool {
		pool[i] = testBlock(uint64(i), size/2+i*8)
	}

	run := func(s *Store, seed uint64, allowClosed bool) {
		ctx := t.Context()
		r := rand.New(rand.NewPCG(seed, 1))
		ok := func(op string, err error, allowed ...error) {
			if err == nil || (allowClosed && errors.Is(err, ErrClosed)) {
				return
			}
			for _, a := range allowed {
				if errors.Is(err, a) {
					return
				}
			}
			t.Errorf("%s: %v", op, err)
		}
		for range ops {
			b := pool[r.IntN(len(pool))]
			switch r.IntN(10) {
			case 0, 1, 2:
				ok("Put", s.Put(ctx, b.ID, b.Data), ErrFull)
			case 3:
				batch := []Block{b, pool[r.IntN(len(pool))], pool[r.IntN(len(pool))]}
				ok("PutMany", s.PutMany(ctx, batch), ErrFull)
			case 4, 5, 6:
				got, err := s.Get(ctx, b.ID)
				ok("Get", err, ErrNotFound)
				if err == nil && !bytes.Equal(got, b.Data) {
					t.Errorf("Get %s: wrong bytes", b.ID)
				}
			case 7:
				_, err := s.Has(ctx, b.ID)
				ok("Has", err)
			case 8:
				ok("Delete", s.Delete(ctx, b.ID), ErrPinned)
			case 9:
				if err := s.Pin(ctx, b.ID); err != nil {
					ok("Pin", err)
					continue
				}
				_, err := s.Get(ctx, b.ID)
				ok("Get pinned", err, ErrNotFound)
				ok("Unpin", s.Unpin(ctx, b.ID))
			}
		}
	}

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() { run(s, uint64(w), false) })
	}
	wg.Wait()

	st := s.Stats()
	if st.Bytes > st.Quota || st.PinnedIDs != 0 {
		t.Errorf("Stats = %+v: over quota or pins left", st)
	}
	n := 0
	evictions.Range(func(any, any) bool { n++; return true })
	if n == 0 {
		t.Error("no block was evicted; the test does not exercise eviction")
	}
	checkIndex(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Everything reported is still there after a restart, with the right bytes.
	s = openTest(t, dir, WithQuota(32*size))
	if got := s.Stats(); got != st {
		t.Errorf("Stats after restart = %+v; want %+v", got, st)
	}
	for _, b := range pool {
		if ok, _ := s.Has(t.Context(), b.ID); ok {
			mustGet(t, s, b)
		}
	}

	// Close while busy: operations finish or report ErrClosed.
	for w := range workers {
		wg.Go(func() { run(s, uint64(100+w), true) })
	}
	wg.Go(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close while busy: %v", err)
		}
	})
	wg.Wait()
}

func TestFullDisk(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := testenv.Tmpfs(t, 16<<20)
	s := openTest(t, dir)

	var stored []Block
	var putErr error
	for i := range 1000 {
		b := testBlock(uint64(i), 64<<10)
		if putErr = s.Put(ctx, b.ID, b.Data); putErr != nil {
			break
		}
		stored = append(stored, b)
	}
	t.Logf("stored %d blocks before: %v", len(stored), putErr)
	if !errors.Is(putErr, ErrNoSpace) || !errors.Is(putErr, syscall.ENOSPC) {
		t.Fatalf("Put on a full file system: %v; want ErrNoSpace wrapping ENOSPC", putErr)
	}
	if len(stored) < 50 {
		t.Fatalf("only %d blocks fit in 16 MiB; the reserve is too large", len(stored))
	}
	for _, b := range stored {
		mustGet(t, s, b)
	}
	// Metadata writes still work on the reserve.
	if err := s.Pin(ctx, stored[0].ID); err != nil {
		t.Errorf("Pin on a full file system: %v", err)
	}
	if err := s.Delete(ctx, stored[1].ID); err != nil {
		t.Errorf("Delete on a full file system: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close on a full file system: %v", err)
	}

	s = openTest(t, dir)
	for _, b := range append(stored[:1:1], stored[2:]...) {
		mustGet(t, s, b)
	}
	if n, _ := s.PinCount(stored[0].ID); n != 1 {
		t.Errorf("PinCount after restart = %d; want 1", n)
	}
	b := testBlock(5000, 64<<10)
	if err := s.Put(ctx, b.ID, b.Data); !errors.Is(err, ErrNoSpace) {
		t.Errorf("Put after restart: %v; want ErrNoSpace", err)
	}
}

// TestNoSpaceFromOthers fills the file system from outside the store.
func TestNoSpaceFromOthers(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := testenv.Tmpfs(t, 16<<20)
	s := openTest(t, dir)
	stored := testBlocks(1, 5, 64<<10)
	put(t, s, stored...)

	free, _, err := freeSpace(dir)
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	// Leave three quarters of the reserve: too little for blocks, enough for pins.
	if err := os.WriteFile(filler, make([]byte, free-s.cfg.minFree*3/4), 0o644); err != nil {
		t.Fatal(err)
	}
	b := testBlock(100, 64<<10)
	if err := s.Put(ctx, b.ID, b.Data); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Put with the disk filled by others: %v; want ErrNoSpace", err)
	}
	for _, x := range stored {
		mustGet(t, s, x)
	}
	if err := s.Pin(ctx, stored[0].ID); err != nil {
		t.Errorf("Pin: %v", err)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	put(t, s, b)
	mustGet(t, s, b)
}

// TestValueLogGC: deleted blocks' space in the value log is reclaimed,
// also on a store that goes quiet after the deletes. Badger learns which
// value-log bytes are garbage only when a compaction drops the deleted
// keys, and nothing here fills a memtable to start one: one run of the
// collector must compact and rewrite by itself. A collector that does
// nothing, or only calls RunValueLogGC, fails it.
func TestValueLogGC(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir())
	bs := testBlocks(1, 40, 64<<10) // 2.5 MiB: three 1 MiB value-log files
	put(t, s, bs...)
	// Less garbage than half a file cannot make a file worth rewriting:
	// no compaction for it.
	if err := s.Delete(t.Context(), bs[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := s.collectGarbage(); err != nil {
		t.Fatalf("collectGarbage: %v", err)
	}
	if n := s.compactions.Load(); n != 0 {
		t.Errorf("%d forced compactions for one deleted block, want 0", n)
	}
	for _, b := range bs[1:35] {
		if err := s.Delete(t.Context(), b.ID); err != nil {
			t.Fatal(err)
		}
	}
	files, bytes := vlogUsage(t, s.dir)
	start := time.Now()
	if err := s.collectGarbage(); err != nil {
		t.Fatalf("collectGarbage: %v", err)
	}
	took := time.Since(start)
	filesAfter, bytesAfter := vlogUsage(t, s.dir)
	t.Logf("value log: %d files, %d bytes on disk before; %d files, %d bytes after one collection (%v)",
		files, bytes, filesAfter, bytesAfter, took)
	// 35 of the 40 blocks (2.2 MiB) are gone: at least one whole file
	// (about 16 blocks) held nothing else, and must have been dropped.
	if filesAfter >= files || bytesAfter > bytes-(1<<20) {
		t.Errorf("value-log GC reclaimed less than a file: %d files, %d bytes before; %d files, %d bytes after",
			files, bytes, filesAfter, bytesAfter)
	}
	for _, b := range bs[35:] {
		mustGet(t, s, b)
	}
	if n := s.compactions.Load(); n != 1 {
		t.Errorf("%d forced compactions, want 1", n)
	}
	// The garbage is accounted for: a second run has nothing to compact.
	s.mu.Lock()
	garbage := s.idx.garbage
	s.mu.Unlock()
	if garbage != 0 {
		t.Errorf("%d bytes still counted as garbage after the collection", garbage)
	}
	// The survivors stay readable after a reopen (the compaction dropped
	// only the marker key).
	dir := s.dir
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir)
	for _, b := range bs[35:] {
		mustGet(t, s, b)
	}
	if n := s.Stats().Blocks; n != 5 {
		t.Errorf("%d blocks after reopening, want 5", n)
	}
}

// TestValueLogGCUnderLoad: the compaction collectGarbage forces keeps
// writes out while it runs (badger's DropPrefix would refuse them), so
// puts, gets and deletes from several goroutines never fail meanwhile, and
// every block put and not deleted is there afterwards.
func TestValueLogGCUnderLoad(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir())
	const workers, rounds = 4, 30
	stop := make(chan struct{})
	var gc sync.WaitGroup
	gc.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := s.collectGarbage(); err != nil {
				t.Errorf("collectGarbage: %v", err)
				return
			}
		}
	})
	var wg sync.WaitGroup
	kept := make([][]Block, workers)
	for w := range workers {
		wg.Go(func() {
			for r := range rounds {
				bs := testBlocks(uint64(1+(w*rounds+r)*4), 4, 64<<10)
				for _, b := range bs {
					if err := s.Put(t.Context(), b.ID, b.Data); err != nil {
						t.Errorf("Put: %v", err)
						return
					}
				}
				for _, b := range bs[:3] {
					if got, err := s.Get(t.Context(), b.ID); err != nil || !bytes.Equal(got, b.Data) {
						t.Errorf("Get %s: %d bytes, %v", b.ID, len(got), err)
						return
					}
					if err := s.Delete(t.Context(), b.ID); err != nil {
						t.Errorf("Delete: %v", err)
						return
					}
				}
				kept[w] = append(kept[w], bs[3])
			}
		})
	}
	wg.Wait()
	close(stop)
	gc.Wait()
	for _, bs := range kept {
		for _, b := range bs {
			mustGet(t, s, b)
		}
	}
	t.Logf("%d forced compactions", s.compactions.Load())
	if s.compactions.Load() == 0 {
		t.Error("no collection compacted: the test did not exercise the forced compaction")
	}
}

// vlogUsage returns the number of badger value-log files in dir and the
// bytes they take on disk.
func vlogUsage(t *testing.T, dir string) (files int, bytes int64) {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(dir, "*.vlog"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		files++
		bytes += st.Blocks * 512
	}
	return files, bytes
}

func BenchmarkPutGet(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			s, err := Open(b.Context(), b.TempDir(), WithLogger(testLogger(b)),
				WithQuota(256<<20), WithGCInterval(0))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			data := testBlock(1, size).Data
			b.SetBytes(int64(size))
			b.ReportAllocs()
			var n uint64
			for b.Loop() {
				n++
				binary.LittleEndian.PutUint64(data, n) // a new block each time
				id := flat.Sum(data)
				if err := s.Put(b.Context(), id, data); err != nil {
					b.Fatal(err)
				}
				if _, err := s.Get(b.Context(), id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
