package node

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/shoal-project/shoal/converter"
)

var quiet = slog.New(slog.DiscardHandler)

func memRegistry(t *testing.T) string {
	t.Helper()
	s := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

func pushImage(t *testing.T, ref string, files map[string]string) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for n, body := range files {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		t.Fatal(err)
	}
	r, _ := name.ParseReference(ref, name.Insecure)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	return img
}

func TestResolve(t *testing.T) {
	t.Parallel()
	reg := memRegistry(t)
	pushImage(t, reg+"/app:plain", map[string]string{"hello": "plain"})
	pushImage(t, reg+"/app:flat", map[string]string{"hello": "flat"})
	res, err := converter.Convert(t.Context(), reg+"/app:flat", "", converter.WithPlainHTTP(true), converter.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var notices bytes.Buffer
	n, err := Open(t.Context(), dir, WithPlainHTTP(true), WithLogger(quiet), WithNotices(&notices))
	if err != nil {
		t.Fatal(err)
	}

	img, err := n.Resolve(t.Context(), reg+"/app:flat")
	if err != nil {
		t.Fatal(err)
	}
	if img.Local || img.Ref != res.Ref {
		t.Errorf("flat form: got %s (local %v), want %s", img.Ref, img.Local, res.Ref)
	}
	if img, err := n.Resolve(t.Context(), reg+"/app:flat-shoal"); err != nil || img.Ref != res.Ref {
		t.Errorf("naming the flat image itself: %v, %v", img, err)
	}

	img, err = n.Resolve(t.Context(), reg+"/app:plain")
	if err != nil {
		t.Fatal(err)
	}
	if !img.Local || !strings.Contains(notices.String(), "converting it here") {
		t.Errorf("no local fallback: local=%v notice=%q", img.Local, notices.String())
	}
	if strings.Count(strings.TrimSpace(notices.String()), "\n") != 0 {
		t.Errorf("notice is not one line: %q", notices.String())
	}
	for _, b := range img.Index.Blocks {
		if c, err := n.Store().PinCount(b.ID); err != nil || c < 1 {
			t.Errorf("block %s of a local conversion is not pinned", b.ID)
		}
		data, err := img.Chain.Fetch(t.Context(), b)
		if err != nil || !b.ID.Verify(data) {
			t.Errorf("block %s: %v", b.ID, err)
		}
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	// A restart reuses the kept index and cached blocks: no second pull.
	notices.Reset()
	n, err = Open(t.Context(), dir, WithPlainHTTP(true), WithLogger(quiet), WithNotices(&notices))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if img, err := n.Resolve(t.Context(), reg+"/app:plain"); err != nil || !img.Local || notices.Len() != 0 {
		t.Errorf("after restart: %v, local=%v, notice %q", err, img != nil && img.Local, notices.String())
	}

	// Prefetch fills the cache with the flat image's blocks.
	flatImg, err := n.Resolve(t.Context(), reg+"/app:flat")
	if err != nil {
		t.Fatal(err)
	}
	p, err := n.Prefetch(t.Context(), flatImg, nil)
	if err != nil || p.Done != p.Blocks || p.Fetched != p.Bytes {
		t.Errorf("prefetch: %+v, %v", p, err)
	}
	for _, b := range flatImg.Index.Blocks {
		if ok, _ := n.Store().Has(t.Context(), b.ID); !ok {
			t.Errorf("block %s not cached after prefetch", b.ID)
		}
	}
	if p, err := n.Prefetch(t.Context(), flatImg, nil); err != nil || p.Fetched != 0 {
		t.Errorf("second prefetch fetched %d bytes, %v", p.Fetched, err)
	}

	if _, err := n.Resolve(t.Context(), reg+"/app:missing"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("missing tag: %v", err)
	}
	strict, err := Open(t.Context(), t.TempDir(), WithPlainHTTP(true), WithLogger(quiet), WithoutFallback())
	if err != nil {
		t.Fatal(err)
	}
	defer strict.Close()
	if _, err := strict.Resolve(t.Context(), reg+"/app:plain"); err == nil || !strings.Contains(err.Error(), "no flat form") {
		t.Errorf("without fallback: %v", err)
	}
}

// TestCrashLeavesNothingBlocking: a process that mounts an image and is
// killed with SIGKILL leaves a dead FUSE mount; the next Open clears it.
func TestCrashLeavesNothingBlocking(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	if os.Getenv("SHOAL_NODE_CRASH_CHILD") != "" {
		crashChild()
		return
	}
	reg := memRegistry(t)
	pushImage(t, reg+"/app:v1", map[string]string{"hello": "world"})
	dir := t.TempDir()
	mnt := filepath.Join(t.TempDir(), "mnt")
	cmd := exec.Command(os.Args[0], "-test.run", "^TestCrashLeavesNothingBlocking$")
	cmd.Env = append(os.Environ(), "SHOAL_NODE_CRASH_CHILD=1", "STATE="+dir, "REF="+reg+"/app:v1", "MNT="+mnt)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
	})
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "mounted" {
				ready <- true
				return
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("child did not mount")
		}
	case <-time.After(60 * time.Second):
		t.Fatal("child did not mount in time")
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "hello")); err != nil || string(b) != "world" {
		t.Fatalf("read through the child's mount: %q %v", b, err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after the crash, statfs gives %v, want ENOTCONN (a dead mount)", err)
	}

	n, err := Open(t.Context(), dir, WithPlainHTTP(true), WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if m := mountsUnder(mnt); len(m) != 0 {
		t.Errorf("dead mount still there: %v", m)
	}
	if runs, _ := os.ReadDir(filepath.Join(dir, "runs")); len(runs) != 0 {
		t.Errorf("stale run directories left: %v", runs)
	}
	// And the mount point is usable again.
	img, err := n.Resolve(t.Context(), reg+"/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	m, err := n.Mount(t.Context(), img, mnt)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "hello")); err != nil || string(b) != "world" {
		t.Errorf("remount: %q %v", b, err)
	}
	if err := m.Close(); err != nil {
		t.Error(err)
	}
	if m := mountsUnder(mnt); len(m) != 0 {
		t.Errorf("mount left after Close: %v", m)
	}
}

func crashChild() {
	ctx := context.Background()
	n, err := Open(ctx, os.Getenv("STATE"), WithPlainHTTP(true), WithLogger(quiet))
	if err != nil {
		panic(err)
	}
	img, err := n.Resolve(ctx, os.Getenv("REF"))
	if err != nil {
		panic(err)
	}
	if _, err := n.Mount(ctx, img, os.Getenv("MNT")); err != nil {
		panic(err)
	}
	os.Stdout.WriteString("mounted\n")
	select {} // until killed
}
