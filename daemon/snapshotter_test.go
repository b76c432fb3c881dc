package daemon

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestSnapshotterSocket: the daemon serves the containerd snapshotter on
// <state_dir>/snapshotter.sock by default (its metadata under
// <state_dir>/snapshotter), and not at all when disabled.
func TestSnapshotterSocket(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		disabled bool
	}{{"default", false}, {"disabled", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			state, err := os.MkdirTemp("", "shoal-sn-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(state) })
			d, err := New(Config{StateDir: state, P2P: P2PConfig{Disabled: true}, Snapshotter: SnapshotterConfig{Disabled: tc.disabled}},
				slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() { done <- d.Run(ctx) }()
			for deadline := time.Now().Add(10 * time.Second); ; {
				if _, err := Dial(t.Context(), SocketPath(state)); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("daemon did not come up")
				}
				time.Sleep(20 * time.Millisecond)
			}
			sock := SnapshotterSocketPath(state)
			if !tc.disabled {
				// The API may answer a moment before the snapshotter listens.
				for deadline := time.Now().Add(10 * time.Second); ; {
					c, err := net.Dial("unix", sock)
					if err == nil {
						c.Close()
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("snapshotter socket: %v", err)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			cancel()
			if err := <-done; err != nil {
				t.Errorf("daemon exit: %v", err)
			}
			// Run has returned: whatever it started, it has made by now.
			_, err = os.Stat(filepath.Join(state, "snapshotter", "metadata.db"))
			if tc.disabled != os.IsNotExist(err) {
				t.Errorf("disabled=%v, snapshotter metadata: %v", tc.disabled, err)
			}
		})
	}
}

func TestLoadConfigSnapshotter(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(p, []byte("snapshotter:\n  socket: /run/shoal/sn.sock\n  root: /var/lib/shoal/sn\n"), 0o644)
	c, err := LoadConfig(p)
	if err != nil || c.Snapshotter.Socket != "/run/shoal/sn.sock" || c.Snapshotter.Root != "/var/lib/shoal/sn" || c.Snapshotter.Disabled {
		t.Errorf("LoadConfig = %+v, %v", c.Snapshotter, err)
	}
}
