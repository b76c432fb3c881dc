package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/shoal-project/shoal/node"
)

func runPrefetch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("prefetch", stderr)
	nf := addNodeFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal prefetch [flags] REF\n\nFills the block cache with every block of REF (peers first, then the\nregistry), so later runs start without fetching. Shows a progress line on a\nterminal and JSON progress lines otherwise. With a daemon running, the\ndaemon's cache is filled (and its peers can serve the blocks).\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%w: want REF", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	ref := fs.Arg(0)
	tty := isTerminal(stderr)
	enc := json.NewEncoder(stdout)
	report := func(p node.Progress) {
		if tty {
			fmt.Fprintf(stderr, "\rprefetch %s: %3.0f%% (%s of %s)   ", ref, 100*float64(p.DoneBytes)/float64(max(p.Bytes, 1)), human(p.DoneBytes), human(p.Bytes))
			return
		}
		_ = enc.Encode(p)
	}
	var final node.Progress
	if c := dialDaemon(ctx, *nf.stateDir); c != nil {
		final, err = c.Prefetch(ctx, ref, report)
	} else {
		var n *node.Node
		if n, err = nf.open(ctx, log, stderr); err != nil {
			return err
		}
		defer n.Close()
		var img *node.Image
		if img, err = n.Resolve(ctx, ref); err != nil {
			return err
		}
		final, err = n.Prefetch(ctx, img, report)
	}
	if tty {
		fmt.Fprintln(stderr)
	}
	if err != nil {
		return err
	}
	report(final)
	if tty {
		fmt.Fprintf(stderr, "\n%s: %d blocks, %s cached (%s downloaded)\n", ref, final.Blocks, human(final.DoneBytes), human(final.Downloaded))
	}
	return nil
}
