package snapshotter

import (
	"context"
	"log/slog"
	"os"
	"testing"

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
