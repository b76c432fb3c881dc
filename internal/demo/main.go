// Command demo pushes the Debian test image (built from the cached root
// filesystem tarball, see scripts/debian-rootfs.sh) to a registry. It is the
// image half of `make demo`; scripts/demo.sh does the rest with the real
// shoal binary.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/internal/testenv"
)

func main() {
	ref := flag.String("ref", "", "where to push the image, e.g. 127.0.0.1:5000/demo/debian:bookworm")
	flag.Parse()
	if *ref == "" {
		fmt.Fprintln(os.Stderr, "usage: demo -ref HOST/REPO:TAG")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := push(ctx, *ref); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func push(ctx context.Context, ref string) error {
	tarball := filepath.Join(testenv.CacheDir(), testenv.DebianTarballName)
	if _, err := os.Stat(tarball); err != nil {
		if tarball = filepath.Join(testenv.CacheDir(), testenv.HostTarballName); func() bool { _, err := os.Stat(tarball); return err != nil }() {
			return fmt.Errorf("no root filesystem tarball in %s: run scripts/debian-rootfs.sh (make deps) first", testenv.CacheDir())
		}
	}
	img, err := testenv.BuildImage(ctx, tarball)
	if err != nil {
		return err
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return err
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	d, _ := img.Digest()
	fmt.Printf("%s@%s\n", ref, d)
	return nil
}
