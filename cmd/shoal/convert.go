package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
)

func runConvert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("convert", stderr)
	plain := fs.Bool("plain-http", false, "talk plain HTTP to the registry (local test registries)")
	platform := fs.String("platform", "", "platform to pick from a multi-platform image, os/arch[/variant] (default: this machine's)")
	blockSize := fs.Int("block-size", flat.DefaultAvgBlockSize, "average block size in bytes (a power of two, 4 KiB to 4 MiB)")
	workDir := fs.String("work-dir", "", "where to spool contents during conversion (default: the system temp dir)")
	asJSON := fs.Bool("json", false, "print the result as JSON instead of the reference alone")
	maxBytes := fs.Int64("max-image-bytes", 64<<30, "refuse images with more uncompressed bytes than this")
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
	fmt.Fprintln(stdout, strings.TrimSpace(res.Ref))
	return nil
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
