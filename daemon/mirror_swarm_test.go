package daemon

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/internal/testenv"
)

// pullAll reads the manifest, the config and every layer of ref through a
// mirror, as a client that pulls does, checking each blob against its
// digest (go-containerregistry does at EOF); it returns the image digest.
func pullAll(ctx context.Context, mirrorAddr, ref string, auth authn.Authenticator) (v1.Hash, error) {
	r, err := name.ParseReference(mirrorAddr+"/"+ref, name.Insecure)
	if err != nil {
		return v1.Hash{}, err
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithAuth(auth))
	if err != nil {
		return v1.Hash{}, fmt.Errorf("pull %s through %s: %w", ref, mirrorAddr, err)
	}
	if _, err := img.RawConfigFile(); err != nil {
		return v1.Hash{}, err
	}
	layers, err := img.Layers()
	if err != nil {
		return v1.Hash{}, err
	}
	var wg sync.WaitGroup
	errs := make([]error, len(layers))
	for i, l := range layers {
		wg.Go(func() {
			rc, err := l.Compressed()
			if err != nil {
				errs[i] = err
				return
			}
			defer rc.Close()
			if _, err := io.Copy(io.Discard, rc); err != nil {
				errs[i] = fmt.Errorf("layer %d through %s: %w", i, mirrorAddr, err)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return v1.Hash{}, err
		}
	}
	return img.Digest()
}

// swarmOf starts n daemons with the mirror configured, each bootstrapped
// from the first.
func swarmOf(t *testing.T, n int, mcfg MirrorConfig) []*Daemon {
	t.Helper()
	da, db, boot := mirrorPair(t, mcfg)
	ds := []*Daemon{da, db}
	for len(ds) < n {
		d, _ := startDaemon(t, Config{StateDir: t.TempDir(), Mirror: mcfg, P2P: P2PConfig{Bootstrap: boot}})
		ds = append(ds, d)
	}
	return ds
}

// pullTogether has every daemon's mirror pull ref at the same moment,
// each with the credentials auth gives it, and returns what each got.
func pullTogether(t *testing.T, ds []*Daemon, ref string, auth func(i int) authn.Authenticator) ([]v1.Hash, []error) {
	t.Helper()
	start := make(chan struct{})
	var wg sync.WaitGroup
	got := make([]v1.Hash, len(ds))
	errs := make([]error, len(ds))
	for i, d := range ds {
		wg.Go(func() {
			<-start
			got[i], errs[i] = pullAll(t.Context(), d.MirrorAddr(), ref, auth(i))
		})
	}
	close(start)
	wg.Wait()
	return got, errs
}

// layersOf returns img's manifest and the size of its layers together.
func layersOf(t *testing.T, img v1.Image) (*v1.Manifest, int64) {
	t.Helper()
	man, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, l := range man.Layers {
		total += l.Size
	}
	return man, total
}

// layerBytes sums the bytes the registry sent for GETs of the layers.
func layerBytes(reqs []testenv.ProxiedRequest, layers []v1.Descriptor) (total, ranged int64) {
	for _, r := range reqs {
		if r.Method != "GET" || !strings.Contains(r.Path, "/blobs/") {
			continue
		}
		for _, l := range layers {
			if strings.Contains(r.Path, l.Digest.String()) {
				total += r.Bytes
				if r.Range != "" {
					ranged += r.Bytes
				}
			}
		}
	}
	return total, ranged
}

// TestMirrorPullsAtOnce is issue 22's acceptance test: four daemons pull
// the same three-layer image through their own mirrors at the same moment,
// from the real docker-registry behind a counting proxy whose link is
// slower than the nodes' (as a registry's is, seen from a cluster). Nobody
// holds a layer when they start, so each layer is pulled in ranges, each
// range read upstream by its designated node and swapped: the registry
// sends at most 1.2 copies of the layers, and every node gets the exact
// bytes (each blob checked against its digest by the client).
func TestMirrorPullsAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("four daemons and a registry")
	}
	reg := testenv.StartRegistry(t)
	proxy := reg.Proxy(t)
	const repoTag = "rollout/app:v1"
	img := testenv.PushImage(t, proxy.Ref(repoTag), testenv.RandomImage(t, 3, 4<<20))
	want, _ := img.Digest()
	man, layerTotal := layersOf(t, img)
	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{{Host: proxy.Host, PlainHTTP: true, Default: true}}}
	ds := swarmOf(t, 4, mcfg)
	proxy.Reset()
	proxy.Limit(16 << 20)
	got, errs := pullTogether(t, ds, repoTag, func(int) authn.Authenticator { return authn.Anonymous })
	for i := range ds {
		if errs[i] != nil || got[i] != want {
			t.Errorf("node %d pulled %s (%v), want %s", i, got[i], errs[i], want)
		}
	}
	up, ranged := layerBytes(proxy.Requests(), man.Layers)
	ratio := float64(up) / float64(layerTotal)
	for i, d := range ds {
		st := d.mirror.Stats()
		t.Logf("node %d: %d pulls in ranges, ranges from peers %d, upstream %d; layer bytes from peers %d, upstream %d",
			i, st.Pulls, st.RangesPeers, st.RangesUpstream, st.FetchedPeers, st.FetchedUpstream)
	}
	t.Logf("the registry sent %d layer bytes (%d in ranges) for %d nodes: %.2f copies of the layers (%d bytes)", up, ranged, len(ds), ratio, layerTotal)
	if ratio > 1.2 {
		t.Errorf("the registry sent %.2f copies of the layers, want at most 1.2", ratio)
	}
	var fromPeers int64
	for _, d := range ds {
		fromPeers += d.mirror.Stats().FetchedPeers
	}
	if fromPeers == 0 {
		t.Errorf("no node got a byte from its peers")
	}
	// The status page lists each layer's pull, with its bytes by source.
	for i, d := range ds {
		pulls := d.pageStatus(newSeries(1)).Pulls
		if len(pulls) != len(man.Layers) {
			t.Errorf("node %d: status page lists %d pulls, want %d", i, len(pulls), len(man.Layers))
		}
		for _, p := range pulls {
			if p.Digest == "" || p.FromPeers+p.FromUpstream < p.Size || p.Done != p.Ranges || p.EndedMS == 0 {
				t.Errorf("node %d: pull on the status page: %+v", i, p)
			}
		}
	}
}

// TestMirrorPrivatePullsAtOnce is TestMirrorPullsAtOnce for a private
// repository: three daemons whose clients hold the registry's credentials
// pull at once and share the ranges (under the layers' swarm names, after
// proving access with their own window reads), and a fourth whose client
// has no credentials is refused, and gets no range.
func TestMirrorPrivatePullsAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("four daemons and a registry")
	}
	const user, pass = "alice", "wonderland-7"
	reg := testenv.StartRegistry(t, testenv.WithBasicAuth(user, pass))
	proxy := reg.Proxy(t)
	img := testenv.RandomImage(t, 2, 4<<20)
	testenv.PushImageAs(t, reg.Ref("team/app:v1"), img, reg.Auth())
	want, _ := img.Digest()
	man, layerTotal := layersOf(t, img)
	mcfg := MirrorConfig{Listen: "127.0.0.1:0", Upstreams: []MirrorUpstream{{Host: proxy.Host, PlainHTTP: true, Default: true}}}
	ds := swarmOf(t, 4, mcfg)
	proxy.Reset()
	proxy.Limit(16 << 20)
	got, errs := pullTogether(t, ds, "team/app:v1", func(i int) authn.Authenticator {
		if i == len(ds)-1 {
			return authn.Anonymous
		}
		return reg.Auth()
	})
	for i := range ds[:len(ds)-1] {
		if errs[i] != nil || got[i] != want {
			t.Errorf("node %d pulled %s (%v), want %s", i, got[i], errs[i], want)
		}
	}
	if errs[len(ds)-1] == nil {
		t.Errorf("the node without credentials pulled the private image")
	}
	if st := ds[len(ds)-1].mirror.Stats(); st.FetchedPeers != 0 || st.RangesPeers != 0 || st.Pulls != 0 {
		t.Errorf("the node without credentials fetched from peers: %+v", st)
	}
	up, ranged := layerBytes(proxy.Requests(), man.Layers)
	ratio := float64(up) / float64(layerTotal)
	t.Logf("the registry sent %d layer bytes (%d in ranges and windows) for 3 nodes: %.2f copies of the layers (%d bytes)", up, ranged, ratio, layerTotal)
	if ratio > 1.2 {
		t.Errorf("the registry sent %.2f copies of the layers, want at most 1.2", ratio)
	}
	for _, l := range man.Layers {
		if ps, _ := ds[0].swarm.BlobProviders(t.Context(), l.Digest.String(), 4); len(ps) != 0 {
			t.Errorf("private %s has providers under its digest: %v", l.Digest, ps)
		}
	}
	// The status page (served to anyone on its port) does not name them.
	if pulls := ds[0].pageStatus(newSeries(1)).Pulls; len(pulls) != len(man.Layers) || slices.ContainsFunc(pulls, func(p MirrorPull) bool { return p.Digest != "" }) {
		t.Errorf("status page pulls of private blobs: %+v, want %d without digests", pulls, len(man.Layers))
	}
}
