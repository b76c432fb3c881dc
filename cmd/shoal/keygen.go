package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/shoal-project/shoal/p2p"
)

func runKeygen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, _ := newFlags("keygen", stderr)
	force := fs.Bool("force", false, "replace FILE if it exists (every node then needs the new key)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal keygen [--force] [FILE|-]\n\nWrites a new random private-network key for the swarm (libp2p's swarm key\nformat, 32 bytes) to FILE, mode 0600, or to stdout with - or no FILE.\nMake it once and give every node the same file (p2p.psk_file): only nodes\nholding it can connect to each other. See docs/deploy.md.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return fmt.Errorf("%w: want at most one FILE", errUsage)
	}
	k, err := p2p.NewPSK()
	if err != nil {
		return err
	}
	data := p2p.EncodePSK(k)
	if path := fs.Arg(0); path != "" && path != "-" {
		return writeKey(path, data, *force)
	}
	_, err = stdout.Write(data)
	return err
}

// writeKey writes data to path, mode 0600, whole or not at all: through a
// temporary file beside it, linked into place (which fails if path exists)
// or, with replace, renamed over it.
func writeKey(path string, data []byte, replace bool) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), ".shoal-keygen-*")
	if err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if rmErr := os.Remove(tmp); err == nil && rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			err = fmt.Errorf("write key: %w", rmErr)
		}
	}()
	_, err = f.Write(data)
	if err == nil {
		// CreateTemp asks for 0600, which the umask may narrow: set it.
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Sync()
	}
	if err = errors.Join(err, f.Close()); err != nil {
		return fmt.Errorf("write key %s: %w", path, err)
	}
	if replace {
		err = os.Rename(tmp, path)
	} else {
		err = os.Link(tmp, path)
	}
	switch {
	case errors.Is(err, os.ErrExist):
		return fmt.Errorf("%s exists (it may be the key every node holds): remove it, or pass --force to replace it", path)
	case err != nil:
		return fmt.Errorf("write key: %w", err)
	}
	return nil
}
