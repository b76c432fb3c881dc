package snapshotter

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
)

// TestOrdinarySnapshots runs containerd's own snapshotter conformance suite
// (real overlay and bind mounts) against the snapshotter with remote
// snapshots off: what every image without a flat form gets. It runs under
// the name "overlayfs" because the suite knows that overlay cannot rename a
// directory of a lower layer, which holds here too.
func TestOrdinarySnapshots(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for overlay mounts")
	}
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, err := New(root, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			return nil, nil, err
		}
		return s, s.Close, nil
	})
}

// TestCleanupDuringPrepare: containerd garbage-collects (Cleanup) while a
// pull prepares snapshots. A Cleanup that raced a Prepare once removed the
// new snapshot's directory; every prepared snapshot must keep its fs
// directory whatever Cleanup runs beside it.
func TestCleanupDuringPrepare(t *testing.T) {
	ctx := namespaces.WithNamespace(t.Context(), "test")
	s, err := New(t.TempDir(), nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// One snapshot first: Cleanup of a store that never held one fails
	// (its bucket does not exist yet).
	if _, err := s.Prepare(ctx, "first", ""); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			if err := s.Cleanup(ctx); err != nil {
				t.Errorf("cleanup: %v", err)
				return
			}
		}
	})
	defer func() { close(done); wg.Wait() }() // before s.Close
	for i := range 200 {
		key := fmt.Sprintf("active-%d", i)
		mounts, err := s.Prepare(ctx, key, "")
		if err != nil {
			t.Fatalf("prepare %s: %v", key, err)
		}
		if len(mounts) == 0 || mounts[0].Source == "" {
			t.Fatalf("prepare %s: mounts %+v", key, mounts)
		}
		if _, err := os.Stat(mounts[0].Source); err != nil {
			t.Fatalf("prepare %s: its directory is gone: %v", key, err)
		}
	}
}
