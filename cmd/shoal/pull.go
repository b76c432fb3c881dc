package main

import (
	"context"
	"fmt"
	"io"

	"github.com/shoal-project/shoal/snapshotter"
)

func runPull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("pull", stderr)
	var o snapshotter.PullOptions
	fs.StringVar(&o.Address, "containerd-address", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	fs.StringVar(&o.Namespace, "namespace", "default", "containerd namespace")
	fs.StringVar(&o.Snapshotter, "snapshotter", snapshotter.DefaultName, "the name of Shoal's snapshotter in containerd's proxy_plugins")
	fs.BoolVar(&o.PlainHTTP, "plain-http", false, "talk plain HTTP to the registry")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal pull [flags] REF\n\nPulls REF into containerd with Shoal's snapshotter, labelling its layers\nwith the image reference as CRI does: if REF has a flat form, the layers\nbecome lazy snapshots of it and only the manifest and config are\ndownloaded; otherwise containerd pulls and unpacks it as usual. Then\n`ctr run --snapshotter shoal REF ...` starts it. See docs/containerd.md.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: want REF", errUsage)
	}
	if _, err := logger(*level, stderr); err != nil {
		return err
	}
	res, err := snapshotter.Pull(ctx, fs.Arg(0), o)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s@%s\n", res.Name, res.Digest)
	return nil
}
