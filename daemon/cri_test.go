package daemon

import (
	"encoding/base64"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/snapshotter"
)

// userLog is a reverse proxy in front of a registry that remembers the
// Basic user of every request ("-" for none).
type userLog struct {
	srv   *httptest.Server
	mu    sync.Mutex
	users map[string]int
}

func newUserLog(t *testing.T, upstream string) *userLog {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	l := &userLog{users: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	l.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, _, ok := r.BasicAuth()
		if !ok {
			user = "-"
		}
		l.mu.Lock()
		l.users[user]++
		l.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(l.srv.Close)
	return l
}

func (l *userLog) host() string { return strings.TrimPrefix(l.srv.URL, "http://") }

func (l *userLog) count(user string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.users[user]
}

// pushAs pushes img to ref (plain HTTP) with user:pass ("" for none).
func pushAs(t *testing.T, ref string, img v1.Image, user, pass string) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	opts := []remote.Option{remote.WithContext(t.Context())}
	if user != "" {
		opts = append(opts, remote.WithAuthFromKeychain(keychainOf{&authn.Basic{Username: user, Password: pass}}))
	}
	if err := remote.Write(r, img, opts...); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// randomLayers are n random layers of size bytes.
func randomLayers(t *testing.T, n int, size int64) []v1.Layer {
	t.Helper()
	var out []v1.Layer
	for range n {
		l, err := random.Layer(size, types.OCILayer)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

// TestCRI is the Kubernetes path end to end: containerd 1.6's CRI plugin
// (Debian's, with runc; pods in the host's network, no CNI) driven by
// crictl, with the Shoal snapshotter as CRI's snapshotter, registry
// config_path hosts sending pulls to node B's mirror, and crictl's image
// calls going through B's CRI image service proxy. Node A is B's peer.
//
//   - A converted image is pulled through CRI as remote snapshots and a
//     pod's container runs from the lazy mount: the registry sends a small
//     part of the image.
//   - An unconverted image, already pulled through A's mirror, is pulled
//     through CRI: its blobs come from A, none from the registry.
//   - A private image (registry behind htpasswd; A holds it): a pull with no
//     credentials and one with wrong credentials fail with the registry's
//     401, and B gets no byte of it from peers; a pull with the right
//     credentials (--auth) runs, the snapshotter reading the image with
//     them and never with B's own (a second valid account in B's Docker
//     config, which the registry never sees). A pull that bypasses the
//     proxy leaves the snapshotter anonymous: the image is unpacked the
//     ordinary way.
func TestCRI(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd's CRI plugin, two daemons and two registries")
	}
	if os.Geteuid() != 0 {
		testenv.SkipOrFatal(t, "needs root for containerd and FUSE")
	}
	start := time.Now()
	ctx := t.Context()
	const user, pass = "alice", "wonderland-7"
	const nodeUser, nodePass = "node", "own-credentials-9"
	pub := testenv.StartRegistry(t)
	proxy := pub.Proxy(t)
	priv := testenv.StartRegistry(t, testenv.WithBasicAuth(user, pass), testenv.WithAccount(nodeUser, nodePass))
	privLog := newUserLog(t, priv.URL())

	// The images: each is /probe (its entrypoint prints its arguments)
	// with random layers above. lazy is converted; plain is not.
	lazyImg := testenv.ProbeImage(t, randomLayers(t, 2, 16<<20)...)
	plainImg := testenv.ProbeImage(t, randomLayers(t, 1, 4<<20)...)
	privImg := testenv.ProbeImage(t, randomLayers(t, 1, 4<<20)...)
	pushAs(t, proxy.Ref("pause:probe"), testenv.ProbeImage(t), "", "")
	pushAs(t, proxy.Ref("tools/lazy:v1"), lazyImg, "", "")
	pushAs(t, proxy.Ref("tools/plain:v1"), plainImg, "", "")
	privRef := privLog.host() + "/team/app:v1"
	pushAs(t, privRef, privImg, user, pass)
	otherImg := testenv.ProbeImage(t)
	otherRef := privLog.host() + "/team/other:v1"
	pushAs(t, otherRef, otherImg, user, pass)
	quiet := converter.WithLogger(slog.New(slog.DiscardHandler))
	if _, err := converter.Convert(ctx, proxy.Ref("tools/lazy:v1"), "", converter.WithPlainHTTP(true), quiet); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{privRef, otherRef} {
		if _, err := converter.Convert(ctx, ref, "", converter.WithPlainHTTP(true), quiet,
			converter.WithKeychain(keychainOf{&authn.Basic{Username: user, Password: pass}})); err != nil {
			t.Fatal(err)
		}
	}
	compressed := func(img v1.Image) int64 {
		m, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, l := range m.Layers {
			n += l.Size
		}
		return n
	}

	// Node A: the peer, with its own credentials for the private registry.
	// Node B: the node under test, whose own credentials are another valid
	// account; its CRI proxy and snapshotter face containerd.
	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{
		{Host: proxy.Host, PlainHTTP: true, Default: true},
		{Host: privLog.host(), PlainHTTP: true},
	}}
	da, ca := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg,
		Registry: RegistryConfig{DockerConfig: dockerConfig(t, privLog.host(), user, pass)}})
	sa, err := ca.Status(ctx)
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	sockDir, err := os.MkdirTemp("", "shoal-cri")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	criSock := filepath.Join(sockDir, "cri.sock")
	snSock := filepath.Join(sockDir, "sn.sock")
	hosts := t.TempDir()
	// containerd reads hosts.toml at each pull: they are written once B's
	// mirror listens.
	ctr := testenv.StartContainerd(t, testenv.WithProxySnapshotter(snapshotter.DefaultName, snSock),
		testenv.WithCRI(testenv.CRIOptions{SandboxImage: proxy.Ref("pause:probe"), Snapshotter: snapshotter.DefaultName, ConfigPath: hosts}))
	db, cb := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg, P2P: P2PConfig{Bootstrap: sa.Addrs[:1]},
		Registry:    RegistryConfig{DockerConfig: dockerConfig(t, privLog.host(), nodeUser, nodePass)},
		Snapshotter: SnapshotterConfig{Socket: snSock},
		CRI:         CRIConfig{ImageSocket: criSock, RuntimeEndpoint: ctr.Address}})
	for _, h := range []string{proxy.Host, privLog.host()} {
		writeHosts(t, hosts, h, db.MirrorAddr(), h)
	}
	crictl := func(args ...string) ([]byte, error) { return ctr.Crictl(ctx, criSock, args...).CombinedOutput() }
	pullOK := func(args ...string) {
		t.Helper()
		if out, err := crictl(append([]string{"pull"}, args...)...); err != nil {
			t.Fatalf("crictl pull %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	peerBytes := func() float64 {
		return mirrorMetric(t, db, "shoal_mirror_served_bytes_total", "peers") + mirrorMetric(t, db, "shoal_block_bytes_total", "peers")
	}
	t.Logf("set up in %v", time.Since(start).Round(time.Millisecond))

	// 1. The private image, A holding it whole.
	if _, err := ca.Prefetch(ctx, privRef, true, nil); err != nil {
		t.Fatalf("A's prefetch of the private image: %v", err)
	}
	for _, tc := range []struct{ name, flag string }{{"no credentials", ""}, {"wrong credentials", "--creds=" + user + ":wrong"}} {
		args := []string{"pull"}
		if tc.flag != "" {
			args = append(args, tc.flag)
		}
		out, err := crictl(append(args, privRef)...)
		if err == nil {
			t.Fatalf("%s: crictl pulled the private image:\n%s", tc.name, out)
		}
		if !strings.Contains(string(out), "401 Unauthorized") {
			t.Errorf("%s: crictl pull failed without the registry's 401:\n%s", tc.name, out)
		}
		t.Logf("%s: %s", tc.name, lastLine(string(out)))
	}
	if n := peerBytes(); n != 0 {
		t.Errorf("refused pulls got %v bytes from peers", n)
	}
	denied := mirrorMetric(t, db, "shoal_mirror_denied_total", "")
	if denied == 0 {
		t.Error("B's mirror refused no request of the pulls without the right credentials")
	}
	okRequests := func() float64 {
		return mirrorMetric(t, db, "shoal_mirror_requests_total", "") - mirrorMetric(t, db, "shoal_mirror_errors_total", "")
	}
	ok0 := okRequests()
	step := time.Now()
	pullOK("--auth", base64.StdEncoding.EncodeToString([]byte(user+":"+pass)), privRef)
	// containerd resolved the tag and read the manifest and config through
	// B's mirror (after its first, anonymous, request was challenged),
	// which asked the registry with the pull's credentials.
	if n := okRequests() - ok0; n < 2 {
		t.Errorf("the pull with credentials: B's mirror answered %v requests; want the manifest and the config", n)
	}
	pod := ctr.RunPod(ctx, "private")
	if out, code := ctr.RunContainer(ctx, pod, "private", privRef, "/probe", "hello", "private"); out != "hello private" || code != 0 {
		t.Errorf("the private container printed %q, exit %d", out, code)
	}
	st, err := cb.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pm := mountOf(t, st, "team/app")
	if !pm.Private || pm.Fetch.BytesFromPeers == 0 {
		t.Errorf("the private mount: private %v, %d bytes from peers; want private, from A", pm.Private, pm.Fetch.BytesFromPeers)
	}
	if n := privLog.count(nodeUser); n != 0 {
		t.Errorf("the registry saw B's own account %d times: the node lent its credentials", n)
	}
	t.Logf("private: pulled and ran in %v; %d block bytes from A, %d from the registry; registry requests as %s: %d, as the node: 0",
		time.Since(step).Round(time.Millisecond), pm.Fetch.BytesFromPeers, pm.Fetch.BytesFromRegistry, user, privLog.count(user))

	// A pull that bypasses the CRI proxy (straight to containerd, with
	// the right credentials) leaves the snapshotter no credentials: it
	// reads the flat form anonymously, is refused, and containerd unpacks
	// the image the ordinary way. B's own account is never used.
	if out, err := ctr.Crictl(ctx, "", "pull", "--creds", user+":"+pass, otherRef).CombinedOutput(); err != nil {
		t.Fatalf("crictl pull straight to containerd: %v\n%s", err, out)
	}
	pod = ctr.RunPod(ctx, "other")
	if out, code := ctr.RunContainer(ctx, pod, "other", otherRef, "/probe", "hello", "other"); out != "hello other" || code != 0 {
		t.Errorf("the container of the image pulled past the proxy printed %q, exit %d", out, code)
	}
	if st, err = cb.Status(ctx); err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Mounts {
		if strings.Contains(m.Source, "/team/other") {
			t.Errorf("a pull past the CRI proxy made a flat mount of %s: the snapshotter had credentials", m.Source)
		}
	}
	if n := privLog.count(nodeUser); n != 0 {
		t.Errorf("after a pull past the proxy, the registry saw B's own account %d times", n)
	}

	// 2. The converted image: remote snapshots, a lazy start.
	step = time.Now()
	proxy.Reset()
	pullOK(proxy.Ref("tools/lazy:v1"))
	pod = ctr.RunPod(ctx, "lazy")
	if out, code := ctr.RunContainer(ctx, pod, "lazy", proxy.Ref("tools/lazy:v1"), "/probe", "hello", "lazy"); out != "hello lazy" || code != 0 {
		t.Errorf("the lazy container printed %q, exit %d", out, code)
	}
	if st, err = cb.Status(ctx); err != nil {
		t.Fatal(err)
	}
	lm := mountOf(t, st, "tools/lazy")
	sent, size := proxy.BytesServed(), compressed(lazyImg)
	t.Logf("converted: pulled and ran in %v; image %d bytes (%d compressed), registry sent %d bytes in all (blocks %d)",
		time.Since(step).Round(time.Millisecond), lm.ImageBytes, size, sent, lm.Fetch.BytesFromRegistry)
	if sent > size/4 || lm.Fetch.BytesFromRegistry > lm.ImageBytes/4 {
		t.Errorf("the registry sent %d bytes (%d of blocks) for an image of %d: not lazy", sent, lm.Fetch.BytesFromRegistry, size)
	}

	// 3. The unconverted image, through the mirrors: A first, then CRI on B.
	pullVia(t, da.MirrorAddr(), "tools/plain:v1")
	waitMetric(t, da, "shoal_mirror_announced_total", "", 3)
	step = time.Now()
	proxy.Reset()
	served0 := map[string]float64{}
	for _, src := range []string{"local", "peers", "upstream"} {
		served0[src] = mirrorMetric(t, db, "shoal_mirror_served_bytes_total", src)
	}
	pullOK(proxy.Ref("tools/plain:v1"))
	pod = ctr.RunPod(ctx, "plain")
	if out, code := ctr.RunContainer(ctx, pod, "plain", proxy.Ref("tools/plain:v1"), "/probe", "hello", "plain"); out != "hello plain" || code != 0 {
		t.Errorf("the unconverted container printed %q, exit %d", out, code)
	}
	var blobBytes int64
	for _, r := range proxy.Requests() {
		if strings.Contains(r.Path, "/blobs/") {
			blobBytes += r.Bytes
		}
	}
	served := map[string]float64{}
	for src, v := range served0 {
		served[src] = mirrorMetric(t, db, "shoal_mirror_served_bytes_total", src) - v
	}
	// containerd has the probe layer already (the pause image's): it asks
	// for the two others, the 4 MiB one from A.
	m, err := plainImg.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	big := m.Layers[len(m.Layers)-1].Size
	t.Logf("unconverted: pulled and ran in %v; %d layer bytes to fetch; B's mirror served %v from A, %v from its own copy, %v from the registry; registry blob bytes %d",
		time.Since(step).Round(time.Millisecond), big+m.Layers[0].Size, served["peers"], served["local"], served["upstream"], blobBytes)
	if blobBytes != 0 || served["upstream"] != 0 || served["peers"] < float64(big) {
		t.Errorf("the unconverted image: %d blob bytes from the registry, %v from the registry through B's mirror, %v from peers; want 0, 0 and at least its %d-byte layer",
			blobBytes, served["upstream"], served["peers"], big)
	}
	t.Logf("TestCRI in %v", time.Since(start).Round(time.Millisecond))
}

// mountOf is the daemon's mount of an image of repository repo.
func mountOf(t *testing.T, st Status, repo string) MountInfo {
	t.Helper()
	for _, m := range st.Mounts {
		if strings.Contains(m.Source, "/"+repo+":") || strings.Contains(m.Source, "/"+repo+"@") {
			return m
		}
	}
	t.Fatalf("no mount of %s among %+v", repo, st.Mounts)
	return MountInfo{}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
