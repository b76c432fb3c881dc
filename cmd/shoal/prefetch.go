package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/shoal-project/shoal/node"
)

func runPrefetch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("prefetch", stderr)
	nf := addNodeFlags(fs)
	wait := fs.Bool("wait", false, "with a daemon: wait until the image is complete, showing progress (without a daemon the command always waits)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal prefetch [--wait] [flags] REF\n\nFills the block cache with every block of REF (peers first, then the\nregistry; the blocks of its start-up trace first), so later runs start\nwithout fetching. With a daemon running, the daemon's cache is filled (and\nits peers can serve the blocks): in the background, or with --wait until\ncomplete. Waiting shows a progress bar on a terminal and JSON progress lines\notherwise.\n\nflags:")
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
	start := time.Now()
	report := func(p node.Progress) {
		if tty {
			fmt.Fprintf(stderr, "\r%s", progressBar(ref, p, time.Since(start)))
			return
		}
		_ = enc.Encode(p)
	}
	var final node.Progress
	if c := dialDaemon(ctx, *nf.stateDir); c != nil {
		if !*wait {
			if _, err := c.Prefetch(ctx, ref, false, nil); err != nil {
				return err
			}
			fmt.Fprintf(stderr, "prefetch of %s started in the daemon; `shoal status` shows its progress\n", ref)
			return nil
		}
		final, err = c.Prefetch(ctx, ref, true, report)
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
		fmt.Fprintf(stderr, "\n%s: %d blocks, %s cached (%s fetched) in %s\n", ref, final.Blocks, human(final.DoneBytes), human(final.Fetched), time.Since(start).Round(100*time.Millisecond))
	}
	return nil
}

// progressBar is one terminal line: a bar, percent, bytes and rate.
func progressBar(ref string, p node.Progress, elapsed time.Duration) string {
	const width = 30
	frac := float64(p.DoneBytes) / float64(max(p.Bytes, 1))
	n := int(frac * width)
	rate := float64(p.Fetched) / max(elapsed.Seconds(), 0.001)
	return fmt.Sprintf("%s [%s%s] %3.0f%% %s/%s %s/s   ", ref, strings.Repeat("=", n), strings.Repeat(" ", width-n),
		100*frac, human(p.DoneBytes), human(p.Bytes), human(int64(rate)))
}
