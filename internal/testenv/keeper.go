package testenv

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/shoal-project/shoal/internal/keeper"
)

// StartKeeper serves a keeper (`shoal keeper`) in the test's process on a
// fresh socket until the test ends, and returns the socket and the server.
func StartKeeper(tb testing.TB) (string, *keeper.Server) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	sock := filepath.Join(tb.TempDir(), "keeper.sock")
	ks, err := keeper.Listen(sock, Logger(tb, "keeper"))
	if err != nil {
		cancel()
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ks.Serve(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("keeper: %v", err)
		}
	})
	return sock, ks
}
