//go:build linux && !race

// Heavy integration test (containerd, runc and the Debian image end to end):
// built without the race detector; `make test` runs it in a second pass.

package snapshotter_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/daemon"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/snapshotter"
)

// runningDaemon is an in-process Shoal daemon serving the snapshotter.
type runningDaemon struct {
	client *daemon.Client
	stop   func()
}

// startDaemon runs a daemon (registry only, plain HTTP) on state with its
// snapshotter on sock, and stops it when the test ends (or at stop).
func startDaemon(t *testing.T, state, sock string) *runningDaemon {
	t.Helper()
	d, err := daemon.New(daemon.Config{StateDir: state, PlainHTTP: true, P2P: daemon.P2PConfig{Disabled: true},
		Snapshotter: daemon.SnapshotterConfig{Socket: sock}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	stopped := false
	rd := &runningDaemon{stop: func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
	}}
	t.Cleanup(rd.stop)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if rd.client, err = daemon.Dial(t.Context(), daemon.SocketPath(state)); err == nil {
			if _, err = os.Stat(sock); err == nil {
				return rd
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctrRun runs `ctr run --rm --snapshotter shoal` and returns its output.
// containerd reconnects to a restarted snapshotter with a backoff of up to
// a few seconds, so an Unavailable answer is tried again for a while.
func ctrRun(t *testing.T, c *testenv.Containerd, image, id string, args ...string) string {
	t.Helper()
	argv := append([]string{"run", "--rm", "--snapshotter", snapshotter.DefaultName, image, id}, args...)
	for deadline := time.Now().Add(15 * time.Second); ; {
		out, err := c.Ctr(t.Context(), argv...).CombinedOutput()
		if err == nil {
			return string(out)
		}
		if !strings.Contains(string(out), "Unavailable") || time.Now().After(deadline) {
			t.Fatalf("ctr %s: %v\n%s", strings.Join(argv, " "), err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestContainerdRemoteSnapshots runs the Debian+python image with the real
// containerd and runc through the Shoal snapshotter: converted, it is
// pulled as remote snapshots and started from the lazy mount, and far fewer
// bytes than the image leave the registry; after a daemon restart the flat
// mount comes back by itself. An unconverted image takes the fallback
// (containerd downloads and unpacks it) and runs too.
func TestContainerdRemoteSnapshots(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd with the Debian image")
	}
	if os.Geteuid() != 0 {
		testenv.SkipOrFatal(t, "needs root for FUSE and containerd")
	}
	reg := testenv.StartRegistry(t)
	proxy := reg.Proxy(t)
	ctx := t.Context()

	// The converted image, and an unconverted one sharing no layer with it
	// (a small layer of its own at the bottom changes every chain ID).
	img := testenv.PushDebianImage(t, reg.Ref("debian:py"))
	if _, err := converter.Convert(ctx, reg.Ref("debian:py"), "", converter.WithPlainHTTP(true),
		converter.WithLogger(slog.New(slog.DiscardHandler))); err != nil {
		t.Fatal(err)
	}
	extra, err := random.Layer(4096, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	plain, err := mutate.AppendLayers(empty.Image, append([]v1.Layer{extra}, layers...)...)
	if err != nil {
		t.Fatal(err)
	}
	if plain, err = mutate.Config(plain, cf.Config); err != nil {
		t.Fatal(err)
	}
	testenv.PushImage(t, reg.Ref("debian:plain"), plain)
	ontop, err := mutate.AppendLayers(img, fileLayer(t, "etc/shoal-ontop", "on top"))
	if err != nil {
		t.Fatal(err)
	}
	testenv.PushImage(t, reg.Ref("debian:ontop"), ontop)
	shared, err := mutate.AppendLayers(empty.Image, layers[0], layers[1], fileLayer(t, "etc/shoal-shared", "shared"))
	if err != nil {
		t.Fatal(err)
	}
	if shared, err = mutate.Config(shared, cf.Config); err != nil {
		t.Fatal(err)
	}
	testenv.PushImage(t, reg.Ref("debian:shared"), shared)
	var compressed int64
	for _, l := range layers {
		n, _ := l.Size()
		compressed += n
	}

	sockDir, err := os.MkdirTemp("", "shoal-sn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "sn.sock")
	state := t.TempDir()
	d := startDaemon(t, state, sock)
	c := testenv.StartContainerd(t, testenv.WithProxySnapshotter(snapshotter.DefaultName, sock))

	// Converted: remote snapshots, a lazy start.
	ref := proxy.Ref("debian:py")
	proxy.Reset()
	res, err := snapshotter.Pull(ctx, ref, snapshotter.PullOptions{Address: c.Address, Namespace: c.Namespace, PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if out := ctrRun(t, c, res.Name, "lazy1", "python3", "-c", `print("ok")`); strings.TrimSpace(out) != "ok" {
		t.Errorf("ctr run printed %q, want ok", out)
	}
	st, err := d.client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Mounts) != 1 {
		t.Fatalf("daemon holds %d mounts, want the one flat mount: %+v", len(st.Mounts), st.Mounts)
	}
	m := st.Mounts[0]
	served := proxy.BytesServed()
	t.Logf("lazy: image %d bytes (%d compressed); blocks from the registry %d bytes; registry served %d bytes in all",
		m.ImageBytes, compressed, m.Fetch.BytesFromRegistry, served)
	if m.Fetch.BytesFromRegistry == 0 || m.Fetch.BytesFromRegistry > m.ImageBytes/4 {
		t.Errorf("the daemon fetched %d block bytes from the registry for an image of %d: not lazy", m.Fetch.BytesFromRegistry, m.ImageBytes)
	}
	if served > compressed/4 {
		t.Errorf("the registry served %d bytes for an image of %d compressed: containerd pulled layers", served, compressed)
	}

	checkSnapshots(t, sock, c.Namespace, img)

	// A restarted daemon mounts the flat image again when containerd asks.
	d.stop()
	d = startDaemon(t, state, sock)
	if out := ctrRun(t, c, res.Name, "lazy2", "python3", "-c", `print("again")`); strings.TrimSpace(out) != "again" {
		t.Errorf("after a daemon restart ctr run printed %q", out)
	}
	if st, err := d.client.Status(ctx); err != nil || len(st.Mounts) != 1 {
		t.Errorf("after a restart: %v, %+v", err, st)
	}

	// Unconverted: the fallback, an ordinary pull and unpack.
	proxy.Reset()
	pres, err := snapshotter.Pull(ctx, proxy.Ref("debian:plain"), snapshotter.PullOptions{Address: c.Address, Namespace: c.Namespace, PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if served := proxy.BytesServed(); served < compressed {
		t.Errorf("the fallback pulled %d bytes, less than the image's %d", served, compressed)
	}
	if out := ctrRun(t, c, pres.Name, "plain1", "python3", "-c", `print("plain")`); strings.TrimSpace(out) != "plain" {
		t.Errorf("fallback ctr run printed %q", out)
	}
	if st, err := d.client.Status(ctx); err != nil || len(st.Mounts) != 1 {
		t.Errorf("the fallback made a flat mount: %v, %+v", err, st)
	}

	// Unconverted, built on the converted image: its own layer is unpacked
	// over the flat mount.
	proxy.Reset()
	ores, err := snapshotter.Pull(ctx, proxy.Ref("debian:ontop"), snapshotter.PullOptions{Address: c.Address, Namespace: c.Namespace, PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if served := proxy.BytesServed(); served > compressed/4 {
		t.Errorf("pulling an image on top of the converted one pulled %d bytes", served)
	}
	if out := ctrRun(t, c, ores.Name, "ontop1", "python3", "-c", `print(open("/etc/shoal-ontop").read())`); strings.TrimSpace(out) != "on top" {
		t.Errorf("ctr run of the image on top printed %q", out)
	}

	// Unconverted, sharing only the two lower layers of the converted image:
	// their placeholder gets its real content from the registry (not the
	// flat image's, which has the third layer too), and the image runs.
	sres, err := snapshotter.Pull(ctx, proxy.Ref("debian:shared"), snapshotter.PullOptions{Address: c.Address, Namespace: c.Namespace, PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	check := `import os; print(open("/etc/shoal-shared").read(), os.path.exists("/` + testenv.AddedFile + `"))`
	if out := ctrRun(t, c, sres.Name, "shared1", "python3", "-c", check); strings.TrimSpace(out) != "shared False" {
		t.Errorf("ctr run of the image sharing lower layers printed %q, want %q", out, "shared False")
	}
	sctx, sn := snapshotClient(t, sock, c.Namespace)
	if info, err := sn.Stat(sctx, chainIDs(t, img)[1].String()); err != nil || info.Labels[snapshotter.LabelMaterialized] == "" {
		t.Errorf("the shared placeholder: %+v, %v; want it materialized", info, err)
	}
}

// fileLayer is a layer of one file.
func fileLayer(t *testing.T, path, body string) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: path, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write([]byte(body))
	tw.Close()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// snapshotClient talks to the snapshotter over its socket as containerd
// does.
func snapshotClient(t *testing.T, sock, ns string) (context.Context, snapshots.Snapshotter) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return namespaces.WithNamespace(t.Context(), ns),
		proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotter.DefaultName)
}

// chainIDs returns the chain IDs of img's layers, bottom first.
func chainIDs(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	var diffIDs []digest.Digest
	for _, h := range cf.RootFS.DiffIDs {
		diffIDs = append(diffIDs, digest.Digest(h.String()))
	}
	return identity.ChainIDs(diffIDs)
}

// checkSnapshots: the image's top chain ID is the flat snapshot, the
// layers below are placeholders, and labels set by callers cannot take the
// snapshotter's own away.
func checkSnapshots(t *testing.T, sock, ns string, img v1.Image) {
	t.Helper()
	ctx, sn := snapshotClient(t, sock, ns)
	chain := chainIDs(t, img)
	top, err := sn.Stat(ctx, chain[len(chain)-1].String())
	if err != nil || top.Labels[snapshotter.LabelFlat] == "" || top.Kind != snapshots.KindCommitted {
		t.Fatalf("top chain ID %s: %+v, %v; want a committed flat snapshot", chain[len(chain)-1], top, err)
	}
	bottom, err := sn.Stat(ctx, chain[0].String())
	if err != nil || bottom.Labels[snapshotter.LabelPlaceholder] == "" {
		t.Fatalf("bottom chain ID %s: %+v, %v; want a placeholder", chain[0], bottom, err)
	}
	up, err := sn.Update(ctx, snapshots.Info{Name: top.Name, Labels: map[string]string{"x": "y"}}, "labels")
	if err != nil || up.Labels["x"] != "y" || up.Labels[snapshotter.LabelFlat] != top.Labels[snapshotter.LabelFlat] {
		t.Errorf("Update of the labels: %+v, %v; want x=y and the flat label kept", up.Labels, err)
	}
	// A read-only view of the flat snapshot is a bind of the lazy mount.
	ms, err := sn.View(ctx, "probe-view", top.Name)
	if err != nil || len(ms) != 1 || ms[0].Type != "bind" {
		t.Errorf("View of the flat snapshot: %+v, %v", ms, err)
	} else if _, err := os.Stat(filepath.Join(ms[0].Source, "usr/bin/python3")); err != nil {
		t.Errorf("the view's source is not the image: %v", err)
	}
	if err := sn.Remove(ctx, "probe-view"); err != nil {
		t.Error(err)
	}
}
