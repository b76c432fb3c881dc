package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/node"
)

// nodeFlags are the flags of every command that opens the state directory.
type nodeFlags struct {
	stateDir *string
	plain    *bool
	quota    *int64
	prefetch *bool
}

func addNodeFlags(fs *flag.FlagSet) nodeFlags {
	return nodeFlags{
		stateDir: fs.String("state-dir", node.DefaultStateDir(), "state directory (block cache, mounts); env "+node.EnvStateDir),
		plain:    fs.Bool("plain-http", false, "talk plain HTTP to the registry (local test registries)"),
		quota:    fs.Int64("cache-quota", 0, "block cache size limit in bytes (0: unlimited)"),
		prefetch: fs.Bool("trace-prefetch", true, "at mount, prefetch the blocks of the image's published start-up trace (without a daemon; a daemon follows its config)"),
	}
}

func (f nodeFlags) open(ctx context.Context, log *slog.Logger, stderr io.Writer) (*node.Node, error) {
	opts := []node.Option{node.WithLogger(log), node.WithPlainHTTP(*f.plain), node.WithCacheQuota(*f.quota), node.WithNotices(stderr)}
	if !*f.prefetch {
		opts = append(opts, node.WithSeeding(node.Seeding{}), node.WithoutTraceLookup())
	}
	return node.Open(ctx, *f.stateDir, opts...)
}

func runMount(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("mount", stderr)
	nf := addNodeFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal mount [flags] REF DIR\n\nMounts the image REF read-only and lazily at DIR and serves it until\ninterrupted or `shoal unmount DIR`. REF may be a flat image or a standard one\n(its flat form, tag + \"-shoal\", is used; without one it is converted here).\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: want REF DIR", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	if c := dialDaemon(ctx, *nf.stateDir); c != nil {
		dir, err := filepath.Abs(fs.Arg(1))
		if err != nil {
			return err
		}
		mi, err := c.Mount(ctx, daemon.MountRequest{Ref: fs.Arg(0), Dir: dir})
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "the daemon mounted %s at %s (%d entries, %s); `shoal unmount %s` to stop\n",
			mi.Ref, mi.Dir, mi.Entries, human(mi.ImageBytes), mi.Dir)
		return nil
	}
	n, err := nf.open(ctx, log, stderr)
	if err != nil {
		return err
	}
	defer n.Close()
	img, err := n.Resolve(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	m, err := n.Mount(ctx, img, fs.Arg(1))
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "mounted %s at %s (%d entries, %s); Ctrl-C or `shoal unmount %s` to stop\n",
		img.Ref, m.Dir, len(img.Index.Entries), human(int64(img.Index.ImageBytes())), m.Dir)
	done := make(chan struct{})
	go func() { m.FS.Wait(); close(done) }()
	select {
	case <-ctx.Done():
	case <-done: // unmounted from outside
	}
	return m.Close()
}

func runUnmount(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, _ := newFlags("unmount", stderr)
	lazy := fs.Bool("lazy", false, "detach now even if busy; the kernel finishes when the last user is gone")
	stateDir := fs.String("state-dir", node.DefaultStateDir(), "state directory of the daemon that may hold the mount")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: want DIR", errUsage)
	}
	dir, err := filepath.Abs(fs.Arg(0))
	if err != nil {
		return err
	}
	if c := dialDaemon(ctx, *stateDir); c != nil {
		if _, err := c.Unmount(ctx, daemon.UnmountRequest{Dir: dir}); err == nil {
			return nil
		} else if !strings.Contains(err.Error(), "no such mount") {
			return err
		}
	}
	flags := 0
	if *lazy {
		flags = unix.MNT_DETACH
	}
	err = unix.Unmount(dir, flags)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%s is busy (a process uses it); stop it or pass --lazy", dir)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%s is not a mount point", dir)
	case errors.Is(err, unix.ENOTCONN):
		return unix.Unmount(dir, unix.MNT_DETACH)
	}
	return fmt.Errorf("unmount %s: %w", dir, err)
}
