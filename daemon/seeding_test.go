package daemon

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/seeder"
	"github.com/shoal-project/shoal/trace"
)

func randomBytes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// TestDaemonTracesAndSeeding: daemon A records the first seconds of a mount
// and hands the recording out for `shoal trace push`; daemon B finds the
// published trace, prefetches it and fills the image, keeps another image
// warm, and runs a background prefetch of a third.
func TestDaemonTracesAndSeeding(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	reg := testenv.StartRegistry(t)
	ref := pushAndConvertFile(t, reg.Ref("app:v1"), "data/file", randomBytes(3<<20, 1))
	warm := pushAndConvertFile(t, reg.Ref("warm:v1"), "data/w", randomBytes(1<<20, 2))
	bg := pushAndConvertFile(t, reg.Ref("bg:v1"), "data/b", randomBytes(1<<20, 3))

	stateA := t.TempDir()
	_, a := startDaemon(t, Config{StateDir: stateA, P2P: P2PConfig{Disabled: true}, Seeding: SeedingConfig{RecordSeconds: 30}})
	mnt := filepath.Join(t.TempDir(), "mnt")
	mi, err := a.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil {
		t.Fatal(err)
	}
	live, err := a.Trace(t.Context(), ref)
	if err != nil || len(live.Events) == 0 {
		t.Fatalf("live recording: %+v, %v", live, err)
	}
	fin, err := a.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
	if err != nil {
		t.Fatal(err)
	}
	if fin.Trace == nil || len(fin.Trace.Events) != len(live.Events) {
		t.Fatalf("unmount returned trace %+v, want %d events", fin.Trace, len(live.Events))
	}
	saved, err := a.Trace(t.Context(), ref)
	if err != nil || len(saved.Events) != len(live.Events) {
		t.Fatalf("kept recording: %+v, %v", saved, err)
	}
	if _, err := a.Trace(t.Context(), warm); err == nil {
		t.Error("a trace for an image never mounted")
	}
	if _, err := trace.Push(t.Context(), ref, saved, []name.Option{name.Insecure}); err != nil {
		t.Fatal(err)
	}

	_, b := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Disabled: true}, Seeding: SeedingConfig{
		Fill: true, FillDelay: 50 * time.Millisecond, KeepWarm: []string{warm}}})
	mi, err = b.Mount(t.Context(), MountRequest{Ref: ref, Dir: filepath.Join(t.TempDir(), "mnt")})
	if err != nil {
		t.Fatal(err)
	}
	if mi.Seeding == nil || mi.Seeding.TraceBlocks != len(saved.Events) {
		t.Fatalf("mount on B: seeding %+v, want a trace phase of %d blocks", mi.Seeding, len(saved.Events))
	}
	if _, err := b.Prefetch(t.Context(), bg, false, nil); err != nil {
		t.Fatal(err)
	}
	jobsDone := func(st Status) bool {
		done := 0
		for _, j := range st.Jobs {
			if j.Finished != nil && j.Error == "" && j.Progress.Complete() {
				done++
			}
		}
		return done == 2
	}
	var st Status
	for deadline := time.Now().Add(time.Minute); ; {
		st, err = b.Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Mounts) == 1 && st.Mounts[0].Seeding != nil && st.Mounts[0].Seeding.Phase == seeder.PhaseComplete && jobsDone(st) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("seeding did not finish: mounts %+v jobs %+v", st.Mounts, st.Jobs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, j := range st.Jobs {
		if j.KeepWarm != (j.Ref == warm) {
			t.Errorf("job %+v: keep_warm flag wrong", j)
		}
	}
	// Everything is in B's cache: the mounted image, the warm one and the
	// background one.
	n, err := node.Open(t.Context(), t.TempDir(), node.WithPlainHTTP(true))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	var want int
	for _, r := range []string{ref, warm, bg} {
		img, err := n.Resolve(t.Context(), r)
		if err != nil {
			t.Fatal(err)
		}
		want += len(img.Index.Blocks)
	}
	if st.Cache.Blocks < want {
		t.Errorf("B's cache holds %d blocks, want at least %d", st.Cache.Blocks, want)
	}
}
