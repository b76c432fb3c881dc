package keeper

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKeeper holds a /dev/fuse descriptor, hands out duplicates, updates
// and drops it, refuses what is not a FUSE device, and forgets a
// connection the kernel has ended (a /dev/fuse that was never mounted
// polls as ended).
func TestKeeper(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	ctx, cancel := context.WithCancel(context.Background())
	sock := filepath.Join(t.TempDir(), "k.sock")
	s, err := Listen(sock, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	if _, err := Listen(sock, nil); err == nil {
		t.Fatal("a second keeper took a live keeper's socket")
	}
	k := Client{Path: sock}

	fuse, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fuse.Close()
	if err := k.Put(ctx, "a", []byte(`{"v":1}`), fuse); err != nil {
		t.Fatal(err)
	}
	notFUSE, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer notFUSE.Close()
	if err := k.Put(ctx, "b", nil, notFUSE); err == nil || !strings.Contains(err.Error(), "/dev/fuse") {
		t.Errorf("put of /dev/null: %v, want a refusal", err)
	}
	if err := k.SetState(ctx, "a", []byte(`{"v":2}`)); err != nil {
		t.Fatal(err)
	}
	if err := k.SetState(ctx, "nope", nil); err == nil {
		t.Error("state of an unknown entry was accepted")
	}
	if err := k.SetState(ctx, "a", make([]byte, MaxState+1)); err == nil {
		t.Error("an oversized state was accepted")
	}
	ents, err := k.Take(ctx)
	if err != nil || len(ents) != 1 || ents[0].Key != "a" || string(ents[0].State) != `{"v":2}` {
		t.Fatalf("take: %+v, %v", ents, err)
	}
	var a, b unix.Stat_t
	if err := unix.Fstat(int(ents[0].Conn.Fd()), &a); err != nil || unix.Fstat(int(fuse.Fd()), &b) != nil || a.Rdev != b.Rdev {
		t.Errorf("take returned a descriptor that is not /dev/fuse: %v", err)
	}
	ents[0].Conn.Close()

	// Never mounted: the kernel reports it as ended, and it is forgotten.
	s.prune()
	if got := s.Entries(); len(got) != 0 {
		t.Errorf("after prune: %+v, want nothing", got)
	}
	if err := k.Put(ctx, "c", nil, fuse); err != nil {
		t.Fatal(err)
	}
	if err := k.Drop(ctx, "c"); err != nil || len(s.Entries()) != 0 {
		t.Errorf("drop: %v, %+v", err, s.Entries())
	}
}
