package blockstore

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/shoal-project/shoal/internal/testenv"
)

// TestReserveQuota: reservations count against the quota less pinned
// blocks, and come back on Release.
func TestReserveQuota(t *testing.T) {
	t.Parallel()
	s := openTest(t, t.TempDir(), WithQuota(1<<20), WithMinFreeSpace(0))
	pinned := testBlock(1, 256<<10)
	put(t, s, pinned)
	if err := s.Pin(t.Context(), pinned.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reserve(768<<10 + 1); !errors.Is(err, ErrFull) {
		t.Fatalf("Reserve past the quota less pinned blocks: %v; want ErrFull", err)
	}
	r, err := s.Reserve(512 << 10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reserve(256<<10 + 1); !errors.Is(err, ErrFull) {
		t.Fatalf("Reserve past the quota less another reservation: %v; want ErrFull", err)
	}
	if got := s.Stats().Reserved; got != 512<<10 {
		t.Errorf("Stats().Reserved = %d", got)
	}
	r.Used(100)
	r.Release()
	r.Release()
	if st := s.Stats(); st.Reserved != 0 || s.pending != 0 {
		t.Errorf("after Release: reserved %d, pending %d", st.Reserved, s.pending)
	}
	r, err = s.Reserve(768 << 10)
	if err != nil {
		t.Fatalf("Reserve after Release: %v", err)
	}
	r.Release()
}

// TestReserveFreeSpace: a reservation's unwritten part is free space that
// Puts leave alone; what the holder wrote is counted by the file system
// itself.
func TestReserveFreeSpace(t *testing.T) {
	t.Parallel()
	dir := testenv.Tmpfs(t, 16<<20)
	s := openTest(t, dir)
	free, _, err := freeSpace(dir)
	if err != nil {
		t.Fatal(err)
	}
	room := free - s.cfg.minFree
	if _, err := s.Reserve(room + 1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Reserve of more than is free: %v; want ErrNoSpace", err)
	}
	r, err := s.Reserve(room - 32<<10)
	if err != nil {
		t.Fatal(err)
	}
	b := testBlock(1, 64<<10)
	if err := s.Put(t.Context(), b.ID, b.Data); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Put into reserved room: %v; want ErrNoSpace", err)
	}
	// The holder writes half of it; the rest stays reserved.
	half := (room - 32<<10) / 2
	if err := os.WriteFile(filepath.Join(dir, "spool"), make([]byte, half), 0o600); err != nil {
		t.Fatal(err)
	}
	r.Used(half)
	if err := s.Put(t.Context(), b.ID, b.Data); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Put into reserved room, half written: %v; want ErrNoSpace", err)
	}
	if err := os.Remove(filepath.Join(dir, "spool")); err != nil {
		t.Fatal(err)
	}
	r.Release()
	put(t, s, b)
}
