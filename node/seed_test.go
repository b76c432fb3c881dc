package node

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/seeder"
	"github.com/shoal-project/shoal/trace"
)

// startupFiles is the "application": the files it reads at start, in order.
var startupFiles = []string{"f41", "f07", "f33", "f12", "f58", "f02", "f27", "f19", "f50", "f36", "f09", "f44", "f21", "f30", "f55", "f03"}

// pushRandomImage pushes an image of 60 incompressible 300 KB files to the
// real registry and converts it.
func pushRandomImage(t *testing.T, reg *testenv.Registry) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	files := map[string]string{}
	for i := range 60 {
		b := make([]byte, 300_000)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		files[fmt.Sprintf("f%02d", i)] = string(b)
	}
	src := reg.Ref("app:v1")
	pushImage(t, src, files)
	if _, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true), converter.WithLogger(quiet)); err != nil {
		t.Fatal(err)
	}
	return src
}

// readStartup reads the start-up files from the mount, pausing between
// files as a starting program computes between reads.
func readStartup(t *testing.T, dir string, pause time.Duration) {
	t.Helper()
	for _, f := range startupFiles {
		if _, err := os.ReadFile(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(pause)
	}
}

// TestTracePrefetch records the start-up reads on one node, publishes the
// trace in the real registry, and mounts the image on a second node, which
// finds the trace on its own and prefetches its blocks ahead of the reads,
// then fills in the rest of the image in the background.
func TestTracePrefetch(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("integration test: real registry, FUSE (root)")
	}
	reg := testenv.StartRegistry(t)
	src := pushRandomImage(t, reg)

	// Node A: no trace published yet; record one.
	a, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	img, err := a.Resolve(t.Context(), src)
	if err != nil {
		t.Fatal(err)
	}
	if img.Trace != nil {
		t.Fatal("a trace was found before any was published")
	}
	rec := trace.NewRecorder(img.Digest, img.Index, 0)
	m, err := a.Mount(t.Context(), img, "", lazyfs.WithAccessObserver(rec), lazyfs.WithBackingDir("", 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	if m.Seeder != nil {
		t.Fatal("a seeder runs without trace or fill")
	}
	readStartup(t, m.Dir, 0)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	rec.Stop()
	tr := rec.Trace()
	if len(tr.Events) < len(startupFiles) {
		t.Fatalf("recorded %d blocks for %d files", len(tr.Events), len(startupFiles))
	}
	// The first event is a block of the first file read.
	first := img.Index.Entries[entryIndex(t, img, startupFiles[0])].Extents[0].Block
	if tr.Events[0].Block != first {
		t.Errorf("first recorded block %d, want %d (first block of %s)", tr.Events[0].Block, first, startupFiles[0])
	}
	if _, err := trace.Push(t.Context(), img.Ref, tr, []name.Option{name.Insecure}); err != nil {
		t.Fatal(err)
	}

	// Node B: finds the trace, prefetches it, then fills the image.
	b, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithSeeding(Seeding{Trace: true, Fill: true, FillDelay: 200 * time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	imgB, err := b.Resolve(t.Context(), src)
	if err != nil {
		t.Fatal(err)
	}
	if imgB.Trace == nil || fmt.Sprint(imgB.Trace.BlockOrder()) != fmt.Sprint(tr.BlockOrder()) {
		t.Fatalf("node B found trace %v, want the published one", imgB.Trace)
	}
	mb, err := b.Mount(t.Context(), imgB, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mb.Close() })
	readStartup(t, mb.Dir, 20*time.Millisecond)
	local, remote := mb.Demand.Local.Load(), mb.Demand.Remote.Load()
	t.Logf("start-up reads on node B: %d blocks already local, %d fetched for the read", local, remote)
	if local <= remote {
		t.Errorf("with a trace, only %d of %d blocks the reads needed were prefetched", local, local+remote)
	}
	select {
	case <-mb.Seeder.Done():
	case <-time.After(2 * time.Minute):
		t.Fatalf("fill did not finish: %+v", mb.Seeder.Progress())
	}
	if p := mb.Seeder.Progress(); !p.Complete() || p.Done != len(imgB.Index.Blocks) {
		t.Fatalf("fill: %+v (err %v)", p, mb.Seeder.Err())
	}
	for _, blk := range imgB.Index.Blocks {
		if ok, _ := b.Store().Has(t.Context(), blk.ID); !ok {
			t.Fatalf("block %s not cached after the fill", blk.ID)
		}
	}
	// Every block crossed the wire once: prefetch, demand reads and fill
	// joined each other's fetches.
	var stored int64
	for _, blk := range imgB.Index.Blocks {
		stored += int64(blk.CLen)
	}
	if got := imgB.Registry.Stats().Bytes; got > stored+stored/10+int64(len(imgB.Index.Blocks))*1024 {
		t.Errorf("registry sent %d bytes for an image of %d stored bytes", got, stored)
	}
}

// TestFillStopsAtUnmount runs a slow (rate-capped) fill and unmounts during
// it: reads during the fill are not held behind it, and the fill stops.
func TestFillStopsAtUnmount(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("integration test: real registry, FUSE (root)")
	}
	reg := testenv.StartRegistry(t)
	src := pushRandomImage(t, reg)
	const fillRate = 512 << 10
	n, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithSeeding(Seeding{Fill: true, FillRate: fillRate}))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	img, err := n.Resolve(t.Context(), src)
	if err != nil {
		t.Fatal(err)
	}
	m, err := n.Mount(t.Context(), img, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	if m.Seeder == nil {
		t.Fatal("no seeder with Fill set")
	}
	for m.Seeder.Progress().Done == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	// Demand reads while the fill runs: they do not queue behind it.
	// Queued behind it, they would go at the fill's rate: the start-up
	// files, 16 of 300,000 bytes (and incompressible, so as many stored
	// bytes), would take 4.8 MB / 512 KiB/s = 9.2 s, or 8.2 s with the
	// limiter's burst of one second. Not queued, they take what the
	// registry on loopback takes: 1.2 s under -race beside a simulator
	// run on 2 cores. Three quarters of the throttled time (6.1 s) tell
	// the two apart with room on both sides; the 30 s this allowed before
	// could not fail.
	startupBytes := int64(len(startupFiles)) * 300_000
	limit := time.Duration(float64(startupBytes-fillRate) / fillRate * float64(time.Second) * 3 / 4)
	start := time.Now()
	readStartup(t, m.Dir, 0)
	d := time.Since(start)
	t.Logf("start-up reads took %s during the fill (limit %s)", d, limit)
	if d > limit {
		t.Errorf("start-up reads took %s during a background fill: more than %s, as if they had waited for the fill's rate", d, limit)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Seeder.Done():
	default:
		t.Fatal("seeder still running after unmount")
	}
	p := m.Seeder.Progress()
	if p.Phase != seeder.PhaseStopped || p.Done == len(img.Index.Blocks) {
		t.Fatalf("after unmount: %+v", p)
	}
}

func entryIndex(t *testing.T, img *Image, path string) int {
	t.Helper()
	for i, e := range img.Index.Entries {
		if e.Path == path || e.Path == "/"+path {
			return i
		}
	}
	t.Fatalf("%s not in the index", path)
	return -1
}
