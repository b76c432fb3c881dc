// Command shoal is Shoal's single binary: the node daemon and the tools
// around it (convert, and later mount, run, prefetch, status).
//
// main stays thin: it parses the subcommand, wires logging and signals, and
// turns an error into one line on stderr and a non-zero exit code.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/shoal-project/shoal/sandbox"
)

type command struct {
	name, usage, summary string
	run                  func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"convert", "convert [flags] SRC [DST]", "flatten an image and push it beside the original", runConvert},
	{"run", "run [flags] REF -- CMD [ARGS...]", "run a command in an image mounted lazily", runRun},
	{"mount", "mount [flags] REF DIR", "mount an image lazily and serve it until interrupted", runMount},
	{"unmount", "unmount [--lazy] DIR", "unmount a Shoal mount", runUnmount},
	{"prefetch", "prefetch [--wait] [flags] REF", "fill the block cache with a whole image", runPrefetch},
	{"trace", "trace push|get [flags] REF [FILE]", "publish or show an image's start-up trace", runTrace},
	{"pull", "pull [flags] REF", "pull an image into containerd as lazy Shoal snapshots", runPull},
	{"daemon", "daemon [flags]", "run the node daemon (cache, mounts, API socket, metrics)", runDaemon},
	{"keeper", "keeper [--socket PATH]", "hold the daemon's mounts so that they outlive it (restarts, upgrades)", runKeeper},
	{"status", "status [flags]", "show the daemon's cache and mounts as JSON", runStatus},
	{"keygen", "keygen [--force] [FILE|-]", "make a private-network key for the swarm (p2p.psk_file)", runKeygen},
	{"simulate", "simulate [flags] --trace FILE", "simulate a rollout to many nodes and compare strategies", runSimulate},
}

// errUsage marks errors for which the usage text helps more than the message.
var errUsage = errors.New("usage")

func main() {
	sandbox.Init() // in the re-executed sandbox child this never returns
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "shoal %s: %v\nusage: shoal %s\n", c.name, err, c.usage)
			return 2
		case errors.As(err, new(exitStatus)):
			var es exitStatus
			errors.As(err, &es)
			return int(es)
		case errors.Is(err, context.Canceled):
			fmt.Fprintf(stderr, "shoal %s: interrupted\n", c.name)
			return 130
		default:
			fmt.Fprintf(stderr, "shoal %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "shoal: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: shoal COMMAND [flags] [args]\n\ncommands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nrun 'shoal COMMAND -h' for a command's flags")
}

// newFlags returns a flag set that reports errors instead of exiting, with
// the flags every command shares.
func newFlags(c string, stderr io.Writer) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("shoal "+c, flag.ContinueOnError)
	fs.SetOutput(stderr)
	level := fs.String("log-level", "warn", "log level: debug, info, warn or error")
	return fs, level
}

func logger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("%w: --log-level %q", errUsage, level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// isTerminal reports whether w is a character device (a terminal), where
// progress lines make sense.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
