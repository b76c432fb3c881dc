package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/trace"
)

func runConvert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("convert", stderr)
	plain := fs.Bool("plain-http", false, "talk plain HTTP to the registry (local test registries)")
	platform := fs.String("platform", "", "platform to pick from a multi-platform image, os/arch[/variant] (default: this machine's)")
	blockSize := fs.Int("block-size", flat.DefaultAvgBlockSize, "average block size in bytes (a power of two, 4 KiB to 4 MiB)")
	workDir := fs.String("work-dir", "", "where to spool contents during conversion (default: the system temp dir)")
	asJSON := fs.Bool("json", false, "print the result as JSON instead of the reference alone")
	maxBytes := fs.Int64("max-image-bytes", 64<<30, "refuse images with more uncompressed bytes than this")
	traceFile := fs.String("trace", "", "lay out first, in first-touch order, the files this start-up trace read (`shoal run --record-trace`); it is read through the flat image it was recorded on, which must be in DST's repository")
	tracePub := fs.Bool("published-trace", false, "as --trace, with the trace published for DST's current flat image (`shoal trace push`); if there is none, path order with a warning")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal convert [flags] SRC [DST]\n\nFlattens the image SRC and pushes it beside it (default DST: SRC's tag + \"-shoal\").\nThe pushed reference is the last line of the output.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 || fs.NArg() > 2 {
		return fmt.Errorf("%w: want SRC [DST]", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	opts := []converter.Option{
		converter.WithPlainHTTP(*plain),
		converter.WithAvgBlockSize(*blockSize),
		converter.WithWorkDir(*workDir),
		converter.WithLogger(log),
		converter.WithLimits(*maxBytes, 200),
	}
	if *platform != "" {
		p, err := v1.ParsePlatform(*platform)
		if err != nil {
			return fmt.Errorf("%w: --platform: %v", errUsage, err)
		}
		opts = append(opts, converter.WithPlatform(*p))
	}
	if isTerminal(stderr) {
		opts = append(opts, converter.WithProgress(stderr))
	}
	src, dst := fs.Arg(0), ""
	if fs.NArg() == 2 {
		dst = fs.Arg(1)
	}
	if *traceFile != "" || *tracePub {
		if *traceFile != "" && *tracePub {
			return fmt.Errorf("%w: --trace and --published-trace exclude each other", errUsage)
		}
		o, err := traceLayout(ctx, src, dst, *traceFile, *plain, log)
		if err != nil {
			return err
		}
		if o != nil {
			opts = append(opts, o)
		}
	}
	res, err := converter.Convert(ctx, src, dst, opts...)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	st := res.Stats
	fmt.Fprintf(stderr, "%d entries, %s in %d files -> %d blocks, %s compressed (index %s)\n",
		st.Entries, human(st.ImageBytes), st.Files, st.UniqueBlocks, human(st.CompressedBytes), human(st.IndexBytes))
	if st.LeadFiles > 0 {
		fmt.Fprintf(stderr, "start-up first: %d files, %s in %d blocks\n", st.LeadFiles, human(st.LeadBytes), st.LeadBlocks)
	}
	fmt.Fprintln(stdout, strings.TrimSpace(res.Ref))
	return nil
}

// traceLayout returns the option that lays out a trace's files first: the
// trace in file (empty: the one published for dst's current flat image),
// read through the flat image it was recorded on, found by its digest in
// dst's repository. No published trace, or no flat image yet, means path
// order (nil, with a warning); a trace that does not fit its image is an
// error.
func traceLayout(ctx context.Context, src, dst, file string, plain bool, log *slog.Logger) (converter.Option, error) {
	var nameOpts []name.Option
	if plain {
		nameOpts = append(nameOpts, name.Insecure)
	}
	if dst == "" {
		r, err := name.ParseReference(src, nameOpts...)
		if err != nil {
			return nil, fmt.Errorf("source reference %q: %w", src, err)
		}
		t, err := converter.DefaultDestination(r)
		if err != nil {
			return nil, err
		}
		dst = t.Name()
	}
	dr, err := name.ParseReference(dst, nameOpts...)
	if err != nil {
		return nil, fmt.Errorf("destination reference %q: %w", dst, err)
	}
	fopts := []fetch.Option{fetch.WithPlainHTTP(plain), fetch.WithLogger(log)}
	var t *trace.Trace
	var old *flat.Index
	if file != "" {
		if t, err = trace.ReadFile(file); err != nil {
			return nil, err
		}
		im, err := fetch.OpenImage(ctx, dr.Context().Digest(t.Image).Name(), fopts...)
		if err != nil {
			return nil, fmt.Errorf("--trace %s: the flat image it was recorded on: %w", file, err)
		}
		old = im.Index()
	} else {
		im, err := fetch.OpenImage(ctx, dst, fopts...)
		if err != nil {
			log.Warn("no flat image to take a published trace from; laying out in path order", "ref", dst, "err", err)
			return nil, nil
		}
		t, err = trace.Find(ctx, im.Ref(), im.Digest(), nameOpts, remote.WithAuthFromKeychain(authn.DefaultKeychain))
		if errors.Is(err, trace.ErrNotFound) {
			log.Warn("no trace published for the flat image; laying out in path order", "ref", im.Ref(), "why", err)
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		old = im.Index()
	}
	files, err := converter.TraceFiles(old, t)
	if err != nil {
		return nil, err
	}
	log.Info("laying out a start-up trace's files first", "trace_image", t.Image, "blocks", len(t.Events), "files", len(files))
	return converter.WithFirstFiles(files), nil
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
