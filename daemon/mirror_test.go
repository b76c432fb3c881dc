package daemon

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	dto "github.com/prometheus/client_model/go"

	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/p2p"
)

// mirrorMetric reads one of the daemon's registry-mirror metrics (summed
// over labels, or the one with source=src).
func mirrorMetric(t *testing.T, d *Daemon, metric, src string) float64 {
	t.Helper()
	fams, err := d.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != metric {
			continue
		}
		for _, m := range f.GetMetric() {
			if src != "" && !hasLabel(m, "source", src) {
				continue
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// waitMetric waits until a mirror metric reaches at least min: a response
// is counted once its handler returns, which can be just after the client
// has read it all.
func waitMetric(t *testing.T, d *Daemon, metric, src string, min float64) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); mirrorMetric(t, d, metric, src) < min; {
		if time.Now().After(deadline) {
			t.Fatalf("%s{source=%q} = %v, want at least %v", metric, src, mirrorMetric(t, d, metric, src), min)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

// hostsDir writes containerd's hosts.toml for upstream, with the mirror
// as its first host (docs/mirror.md).
func hostsDir(t *testing.T, upstream, mirrorAddr string) string {
	t.Helper()
	return hostsDirServer(t, upstream, mirrorAddr, upstream)
}

// hostsDirServer is hostsDir with another address as the server
// containerd falls back to when the mirror fails.
func hostsDirServer(t *testing.T, upstream, mirrorAddr, server string) string {
	t.Helper()
	dir := t.TempDir()
	writeHosts(t, dir, upstream, mirrorAddr, server)
	return dir
}

// writeHosts writes dir/<upstream>/hosts.toml: pulls go to the mirror
// first, then to server.
func writeHosts(t *testing.T, dir, upstream, mirrorAddr, server string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, upstream), 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", server, mirrorAddr)
	if err := os.WriteFile(filepath.Join(dir, upstream, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// pullVia reads every blob of ref through a mirror with go-containerregistry
// (the mirror as the registry: its default upstream) and checks each against
// its digest; it returns the image's digest.
func pullVia(t *testing.T, mirrorAddr, ref string) v1.Hash {
	t.Helper()
	return pullViaAs(t, mirrorAddr, ref, authn.Anonymous)
}

// pullViaAs is pullVia with the registry's credentials.
func pullViaAs(t *testing.T, mirrorAddr, ref string, auth authn.Authenticator) v1.Hash {
	t.Helper()
	r, err := name.ParseReference(mirrorAddr+"/"+ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithContext(t.Context()), remote.WithAuth(auth))
	if err != nil {
		t.Fatalf("pull %s through %s: %v", ref, mirrorAddr, err)
	}
	if _, err := img.RawConfigFile(); err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, rc) // ggcr checks the digest at EOF
		rc.Close()
		if err != nil {
			t.Fatalf("layer through %s: %v", mirrorAddr, err)
		}
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// mirrorPair starts daemons A and B with the mirror configured, B
// bootstrapped from A; boot is A's swarm address.
func mirrorPair(t *testing.T, mcfg MirrorConfig) (da, db *Daemon, boot []string) {
	t.Helper()
	da, ca := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	db, _ = startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg, P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})
	return da, db, sa.Addrs[:1]
}

// TestMirrorPullsFromPeers is the registry mirror's acceptance test: real
// docker-registry behind a byte-counting proxy, a standard (unconverted)
// three-layer Debian image, two daemons on loopback with the swarm on.
// containerd on node A pulls through A's mirror (the blobs come from
// upstream, once); then containerd on node B pulls through B's mirror:
// upstream serves no blob byte, every one comes from A. With upstream
// dead, a third node still pulls by digest — manifests and blobs — from
// the swarm (the config declares the repository public: with upstream
// down, nothing else can tell it is), and A still resolves the tag from
// its kept copy (anonymous reads of it passed a moment ago).
func TestMirrorPullsFromPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("pulls the Debian image through two mirrors with containerd")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for containerd")
	}
	reg := testenv.StartRegistry(t)
	proxy := reg.Proxy(t)
	const repoTag = "debian:mirror"
	src := testenv.PushDebianImage(t, proxy.Ref(repoTag))
	want, _ := src.Digest()
	man, err := src.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	blobTotal := man.Config.Size
	for _, l := range man.Layers {
		blobTotal += l.Size
	}
	blobBytes := func() int64 {
		var n int64
		for _, r := range proxy.Requests() {
			if strings.Contains(r.Path, "/blobs/") {
				n += r.Bytes
			}
		}
		return n
	}
	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{{Host: proxy.Host, PlainHTTP: true, Default: true}}}
	da, db, boot := mirrorPair(t, mcfg)
	proxy.Reset()

	ctx := t.Context()
	images := func(c *testenv.Containerd) string { return c.CtrOutput(ctx, "images", "ls") }

	// Node A: containerd pulls through A's mirror; upstream serves each
	// blob once. go-containerregistry pulls it again, from A's kept copy.
	start := time.Now()
	ctrA := testenv.StartContainerd(t)
	ctrA.CtrOutput(ctx, "images", "pull", "--hosts-dir", hostsDir(t, proxy.Host, da.MirrorAddr()), proxy.Ref(repoTag))
	if out := images(ctrA); !strings.Contains(out, want.String()) {
		t.Fatalf("A's containerd does not list %s:\n%s", want, out)
	}
	t.Logf("A: containerd pull through the mirror in %v", time.Since(start).Round(time.Millisecond))
	if got := blobBytes(); got != blobTotal {
		t.Errorf("upstream served %d blob bytes for A, want each blob once (%d)", got, blobTotal)
	}
	if got := pullVia(t, da.MirrorAddr(), repoTag); got != want {
		t.Errorf("A via ggcr: %s, want %s", got, want)
	}
	// The second pull came from A's kept copy.
	waitMetric(t, da, "shoal_mirror_served_bytes_total", "local", float64(blobTotal))
	// Manifest, config and three layers kept and announced.
	waitMetric(t, da, "shoal_mirror_kept_blobs", "", 5)
	waitMetric(t, da, "shoal_mirror_announced_total", "", 5)

	// Node B: containerd pulls through B's mirror. Every blob byte from A.
	before := blobBytes()
	start = time.Now()
	ctrB := testenv.StartContainerd(t)
	ctrB.CtrOutput(ctx, "images", "pull", "--hosts-dir", hostsDir(t, proxy.Host, db.MirrorAddr()), proxy.Ref(repoTag))
	t.Logf("B: containerd pull through the mirror in %v", time.Since(start).Round(time.Millisecond))
	if out := images(ctrB); !strings.Contains(out, want.String()) {
		t.Fatalf("B's containerd does not list %s:\n%s", want, out)
	}
	upstreamB := blobBytes() - before
	peersB := mirrorMetric(t, db, "shoal_mirror_fetched_bytes_total", "peers")
	t.Logf("B: %d blob bytes from upstream, %.0f from peers (image blobs: %d)", upstreamB, peersB, blobTotal)
	if upstreamB != 0 {
		t.Errorf("upstream served %d blob bytes for B, want 0", upstreamB)
	}
	if peersB != float64(blobTotal) {
		t.Errorf("B fetched %.0f bytes from peers, want every blob byte (%d)", peersB, blobTotal)
	}
	waitMetric(t, db, "shoal_mirror_served_bytes_total", "peers", float64(blobTotal))
	if got := pullVia(t, db.MirrorAddr(), repoTag); got != want {
		t.Errorf("B via ggcr: %s, want %s", got, want)
	}

	// Upstream dead.
	reg.Stop()
	mcfgC := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{{Host: proxy.Host, PlainHTTP: true, Default: true, PublicRepositories: []string{"debian"}}}}
	dc, _ := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfgC, P2P: P2PConfig{Bootstrap: boot}})
	if got := pullVia(t, dc.MirrorAddr(), "debian@"+want.String()); got != want {
		t.Errorf("C by digest with upstream dead: %s, want %s", got, want)
	}
	if got := mirrorMetric(t, dc, "shoal_mirror_fetched_bytes_total", "peers"); got < float64(blobTotal) {
		t.Errorf("C fetched %.0f bytes from peers, want every blob byte (%d)", got, blobTotal)
	}
	if got := pullVia(t, da.MirrorAddr(), repoTag); got != want {
		t.Errorf("A by tag with upstream dead: %s, want %s", got, want)
	}
}

// TestMirrorConfigDoc loads the daemon config that docs/mirror.md shows,
// strictly (unknown keys are errors).
func TestMirrorConfigDoc(t *testing.T) {
	doc, err := os.ReadFile("../docs/mirror.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "```yaml\n")
	snippet, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("no yaml block in docs/mirror.md")
	}
	p := filepath.Join(t.TempDir(), "shoal.yaml")
	if err := os.WriteFile(p, []byte(snippet), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	m := cfg.Mirror
	if m.Listen != "127.0.0.1:5001" || len(m.Upstreams) != 2 || m.Upstreams[0].Endpoint != "registry-1.docker.io" ||
		!m.Upstreams[1].PlainHTTP || !m.Upstreams[1].Default ||
		fmt.Sprint(m.Upstreams[0].PublicRepositories) != "[library/*]" || fmt.Sprint(m.Upstreams[1].SharedRepositories) != "[tools/*]" {
		t.Errorf("parsed %+v", m)
	}
}

// TestMirrorPrivateImage: a private image (docker-registry behind
// htpasswd) is pulled through daemon A's mirror by containerd with
// `ctr images pull --user` and by crane with credentials, and refused
// without them. containerd's fallback server is a closed port, so only
// the mirror can serve it. None of its blobs is announced in the DHT or
// given to a peer asking for its recipe, while the public image's are.
func TestMirrorPrivateImage(t *testing.T) {
	if testing.Short() {
		t.Skip("pulls through the mirror with containerd")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for containerd")
	}
	const user, pass = "alice", "wonderland-7"
	priv := testenv.StartRegistry(t, testenv.WithBasicAuth(user, pass))
	pub := testenv.StartRegistry(t)
	privImg := testenv.RandomImage(t, 2, 600_000)
	pubImg := testenv.RandomImage(t, 1, 600_000)
	pushTo := func(reg *testenv.Registry, repoTag string, img v1.Image) {
		ref, err := name.ParseReference(reg.Ref(repoTag), name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img, remote.WithContext(t.Context()), remote.WithAuth(reg.Auth())); err != nil {
			t.Fatalf("push %s: %v", repoTag, err)
		}
	}
	pushTo(priv, "team/app:v1", privImg)
	pushTo(pub, "lib/pub:v1", pubImg)
	privDigest, _ := privImg.Digest()

	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{
		{Host: priv.Host, PlainHTTP: true, Default: true},
		{Host: pub.Host, PlainHTTP: true},
	}}
	da, ca := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	db, _ := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})

	ctx := t.Context()
	ctr := testenv.StartContainerd(t)
	const dead = "127.0.0.1:1" // containerd's fallback: nothing listens
	privHosts := hostsDirServer(t, priv.Host, da.MirrorAddr(), dead)
	if out, err := ctr.Ctr(ctx, "images", "pull", "--hosts-dir", privHosts, priv.Ref("team/app:v1")).CombinedOutput(); err == nil {
		t.Fatalf("ctr pulled the private image through the mirror without credentials:\n%s", out)
	} else if !strings.Contains(string(out), "401") && !strings.Contains(strings.ToLower(string(out)), "unauthorized") {
		t.Errorf("ctr without credentials failed, but not for want of them:\n%s", out)
	}
	start := time.Now()
	ctr.CtrOutput(ctx, "images", "pull", "--user", user+":"+pass, "--hosts-dir", privHosts, priv.Ref("team/app:v1"))
	if out := ctr.CtrOutput(ctx, "images", "ls"); !strings.Contains(out, privDigest.String()) {
		t.Fatalf("containerd does not list %s:\n%s", privDigest, out)
	}
	t.Logf("ctr images pull --user through the mirror in %v", time.Since(start).Round(time.Millisecond))
	ctr.CtrOutput(ctx, "images", "pull", "--hosts-dir", hostsDirServer(t, pub.Host, da.MirrorAddr(), dead), pub.Ref("lib/pub:v1"))

	// crane with credentials, the mirror as its registry (the default
	// upstream); without them it is refused.
	img, err := crane.Pull(da.MirrorAddr()+"/team/app:v1", crane.Insecure, crane.WithAuth(priv.Auth()), crane.WithContext(ctx))
	if err != nil {
		t.Fatalf("crane pull with credentials: %v", err)
	}
	if d, _ := img.Digest(); d != privDigest {
		t.Errorf("crane pulled %s, want %s", d, privDigest)
	}
	if _, err := crane.Pull(da.MirrorAddr()+"/team/app:v1", crane.Insecure, crane.WithContext(ctx)); err == nil {
		t.Error("crane pulled the private image without credentials")
	}

	// Peers get the public blobs and none of the private ones.
	blobs := func(img v1.Image) []string { return testenv.ImageBlobs(t, img) }
	waitMetric(t, da, "shoal_mirror_kept_blobs", "", 7)
	waitMetric(t, da, "shoal_mirror_kept_public_blobs", "", 3)
	if got := mirrorMetric(t, da, "shoal_mirror_kept_public_blobs", ""); got != 3 {
		t.Errorf("A keeps %v public blobs, want the public image's 3", got)
	}
	for _, d := range blobs(pubImg) {
		for deadline := time.Now().Add(20 * time.Second); ; {
			ps, _ := db.swarm.BlobProviders(ctx, d, 4)
			if len(ps) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("B finds no provider of public %s", d)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := db.swarm.FetchRecipe(ctx, da.swarm.ID(), d); err != nil {
			t.Errorf("A refused B the recipe of public %s: %v", d, err)
		}
	}
	if got := mirrorMetric(t, da, "shoal_mirror_announced_total", ""); got != 3 {
		t.Errorf("A announced %v records, want the public image's 3", got)
	}
	for _, d := range blobs(privImg) {
		if ps, _ := db.swarm.BlobProviders(ctx, d, 4); len(ps) != 0 {
			t.Errorf("private %s has providers in the DHT: %v", d, ps)
		}
		if _, err := db.swarm.FetchRecipe(ctx, da.swarm.ID(), d); !errors.Is(err, p2p.ErrNoRecipe) {
			t.Errorf("A's answer to B's recipe request for private %s: %v, want ErrNoRecipe", d, err)
		}
	}
}

// TestMirrorPrivateBlobsFromPeers: two daemons' mirrors in front of a
// real docker-registry behind htpasswd (through a byte-counting proxy),
// go-containerregistry pulling through each with the registry's
// credentials. A private
// image of two 3 MiB gzip layers: after A, B's layers come from A over
// the swarm under their names (A proves to B, B to A, that each read
// them); the registry sends B each layer's 4 KiB window, the config whole
// (under 1 MiB) and the manifest. Neither daemon announces a private
// digest.
func TestMirrorPrivateBlobsFromPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("two daemons and a registry")
	}
	const user, pass = "alice", "wonderland-7"
	reg := testenv.StartRegistry(t, testenv.WithBasicAuth(user, pass))
	proxy := reg.Proxy(t)
	img := testenv.PushImageAs(t, reg.Ref("team/app:v1"), testenv.RandomImage(t, 2, 3<<20), reg.Auth())
	want, _ := img.Digest()
	man, layerTotal := layersOf(t, img)

	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{{Host: proxy.Host, PlainHTTP: true, Default: true}}}
	da, db, _ := mirrorPair(t, mcfg)
	pull := func(d *Daemon) {
		t.Helper()
		if got := pullViaAs(t, d.MirrorAddr(), "team/app:v1", reg.Auth()); got != want {
			t.Fatalf("pulled %s, want %s", got, want)
		}
	}

	pull(da)
	waitMetric(t, da, "shoal_mirror_named_blobs", "", 2)
	waitMetric(t, da, "shoal_mirror_announced_total", "", 2)
	for _, d := range man.Layers {
		if ps, _ := db.swarm.BlobProviders(t.Context(), d.Digest.String(), 4); len(ps) != 0 {
			t.Errorf("private %s has providers under its digest: %v", d.Digest, ps)
		}
	}
	proxy.Reset()
	pull(db)
	var layerUpstream, windows, other int64
	for _, r := range proxy.Requests() {
		if r.Method != "GET" || !strings.Contains(r.Path, "/blobs/") {
			continue
		}
		isLayer := false
		for _, l := range man.Layers {
			isLayer = isLayer || strings.Contains(r.Path, l.Digest.String())
		}
		switch {
		case isLayer && r.Range != "":
			windows += r.Bytes
			layerUpstream += r.Bytes
		case isLayer:
			layerUpstream += r.Bytes
		default:
			other += r.Bytes
		}
	}
	peersB := mirrorMetric(t, db, "shoal_mirror_fetched_bytes_total", "peers")
	t.Logf("B: layers %d bytes, %.0f from peers; the registry sent %d layer bytes (%d in windows) and %d bytes of other blobs (config %d)",
		layerTotal, peersB, layerUpstream, windows, other, man.Config.Size)
	if layerUpstream != 2*4096 || windows != 2*4096 {
		t.Errorf("the registry sent B %d layer bytes (%d in windows), want the two 4 KiB windows only", layerUpstream, windows)
	}
	if peersB != float64(layerTotal) {
		t.Errorf("B fetched %.0f bytes from peers, want both layers (%d)", peersB, layerTotal)
	}
	// B holds the layers now, under their names too.
	waitMetric(t, db, "shoal_mirror_named_blobs", "", 2)
	if got := mirrorMetric(t, db, "shoal_mirror_kept_public_blobs", ""); got != 0 {
		t.Errorf("B keeps %v public blobs, want 0", got)
	}
}
