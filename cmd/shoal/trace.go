package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/trace"
)

func runTrace(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	usage := "usage: shoal trace push [flags] REF [FILE]\n       shoal trace get [flags] REF\n\n" +
		"push publishes a start-up trace beside REF's flat image (an OCI artifact whose\n" +
		"subject is the flat image; docs/traces.md): FILE, as written by\n" +
		"`shoal run --record-trace FILE`, or without FILE the latest recording of the\n" +
		"running daemon. Later mounts of the image find it and prefetch its blocks first.\n" +
		"get prints the newest trace published for REF's flat image."
	if len(args) == 0 || (args[0] != "push" && args[0] != "get") {
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("%w: want push or get", errUsage)
	}
	verb := args[0]
	fs, _ := newFlags("trace "+verb, stderr)
	nf := addNodeFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, usage+"\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	var nameOpts []name.Option
	if *nf.plain {
		nameOpts = append(nameOpts, name.Insecure)
	}
	ropts := []remote.Option{remote.WithAuthFromKeychain(authn.DefaultKeychain)}
	switch {
	case verb == "push" && (fs.NArg() == 1 || fs.NArg() == 2):
	case verb == "get" && fs.NArg() == 1:
	default:
		return fmt.Errorf("%w: wrong number of arguments", errUsage)
	}
	ref := fs.Arg(0)

	if verb == "get" {
		digest, flatRef, err := flatDigest(ctx, ref, *nf.plain)
		if err != nil {
			return err
		}
		t, err := trace.Find(ctx, flatRef, digest, nameOpts, ropts...)
		if err != nil {
			return err
		}
		return trace.Encode(stdout, t)
	}

	var t *trace.Trace
	var err error
	if fs.NArg() == 2 {
		t, err = trace.ReadFile(fs.Arg(1))
	} else if c := dialDaemon(ctx, *nf.stateDir); c != nil {
		t, err = c.Trace(ctx, ref)
	} else {
		err = errors.New("no FILE given and no daemon running to take the recording from")
	}
	if err != nil {
		return err
	}
	// The trace must belong to the image REF names now: a trace of an
	// older build would prefetch the wrong blocks.
	digest, flatRef, err := flatDigest(ctx, ref, *nf.plain)
	if err != nil {
		return err
	}
	if t.Image != digest {
		return fmt.Errorf("the trace was recorded for %s, but %s is now %s; record it again", t.Image, flatRef, digest)
	}
	d, err := trace.Push(ctx, flatRef, t, nameOpts, ropts...)
	if err != nil {
		return err
	}
	size, stored := t.Bytes()
	fmt.Fprintf(stderr, "published a trace of %d blocks (%s, %s stored) for %s\n", len(t.Events), human(size), human(stored), flatRef)
	fmt.Fprintln(stdout, d)
	return nil
}

// flatDigest resolves ref to its flat image (ref's "-shoal" tag, or ref
// itself when it is flat) and returns the flat manifest's digest.
func flatDigest(ctx context.Context, ref string, plain bool) (digest, flatRef string, err error) {
	opts := []fetch.Option{fetch.WithPlainHTTP(plain)}
	if fr, ferr := fetch.FlatRef(ref); ferr == nil {
		if im, err := fetch.OpenImage(ctx, fr, opts...); err == nil {
			return im.Digest(), im.Ref(), nil
		}
	}
	im, err := fetch.OpenImage(ctx, ref, opts...)
	if err != nil {
		return "", "", converter.RegistryError("open", ref, err)
	}
	return im.Digest(), im.Ref(), nil
}
