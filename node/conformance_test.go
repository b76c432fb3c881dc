//go:build linux && !race

// Heavy integration test (a 150–500 MB image end to end): built without the
// race detector, which slows it tenfold; `make test` runs it in a second pass.

package node

import (
	"os"
	"testing"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestMountMatchesSource walks the whole lazily mounted Debian image and
// compares it, entry by entry, with go-containerregistry's flattening of the
// source image: kinds, modes, owners, link targets, xattrs, device numbers
// and the SHA-256 of every file's contents read through the mount.
func TestMountMatchesSource(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: real registry, Debian image, FUSE")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	reg := testenv.StartRegistry(t)
	src := reg.Ref("debian:bookworm")
	img := testenv.PushDebianImage(t, src)
	if _, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true), converter.WithLogger(quiet)); err != nil {
		t.Fatal(err)
	}
	n, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	im, err := n.Resolve(t.Context(), src)
	if err != nil {
		t.Fatal(err)
	}
	if im.Local {
		t.Fatal("resolved to a local conversion, want the flat image in the registry")
	}
	m, err := n.Mount(t.Context(), im, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	got := testenv.WalkTree(t, m.Dir)
	want := testenv.ExtractTree(t, img)
	testenv.CompareTrees(t, want, got)
	if len(got) < 3000 {
		t.Errorf("walked only %d entries", len(got))
	}
	if err := m.Close(); err != nil {
		t.Errorf("unmount: %v", err)
	}
	if left := mountsUnder(m.RunDir); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
}
