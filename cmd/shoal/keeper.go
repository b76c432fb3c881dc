package main

import (
	"context"
	"fmt"
	"io"

	"github.com/shoal-project/shoal/internal/keeper"
)

// DefaultKeeperSocket is where `shoal keeper` listens unless told otherwise;
// the daemon's keeper_socket names it.
const DefaultKeeperSocket = "/run/shoal/keeper.sock"

func runKeeper(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("keeper", stderr)
	socket := fs.String("socket", DefaultKeeperSocket, "unix socket to serve the daemon on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: no arguments expected", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	s, err := keeper.Listen(*socket, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "shoal keeper: holding mounts for the daemon on %s (SIGTERM releases them)\n", *socket)
	return s.Serve(ctx)
}
