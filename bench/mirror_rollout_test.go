package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/internal/netlab"
	"github.com/shoal-project/shoal/internal/testenv"
)

// mirrorListen is where each node's mirror listens, inside its namespace.
const mirrorListen = "127.0.0.1:5001"

// TestBenchMirrorRollout: N nodes, each a daemon with the registry mirror
// in its own network namespace, pull the same standard (unconverted)
// Debian image through their own mirrors at the same moment, as containerd
// does (the manifest, the config, then every layer, each checked against
// its digest); the registry sits behind a tbf-capped link. Three arms per
// round, alternating:
//   - shoal: the mirror with the swarm, blobs nobody holds yet pulled in
//     ranges, each range read from the registry by one node;
//   - mirror without coalescing (coalesce_min -1): the mirror as before
//     issue 22, every node reads each layer it finds nowhere;
//   - direct: every node pulls straight from the registry (the baseline).
//
// Goals (issue 22): registry egress ÷ one copy ≤ 1.2; p99 pull time ≤ 2×
// the time one copy takes over the link.
func TestBenchMirrorRollout(t *testing.T) {
	needBench(t)
	needRoot(t)
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	bin := buildShoal(t)
	lab, regHost, src, img := registryLab(t, mbit)
	regAddr := src[:len(src)-len("/bench/debian:v1")]
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}
	dir := t.TempDir()
	configs := map[string]string{}
	for arm, coalesce := range map[string]int{"shoal": 0, "mirror-no-coalescing": -1} {
		body := fmt.Sprintf("mirror:\n  listen: %s\n  coalesce_min: %d\n  upstreams:\n    - host: %s\n      plain_http: true\n      default: true\n",
			mirrorListen, coalesce, regAddr)
		configs[arm] = filepath.Join(dir, arm+".yaml")
		if err := os.WriteFile(configs[arm], []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ref := "bench/debian:v1"

	// One copy: the registry's egress when one node pulls the image alone
	// through its mirror (manifest, config, layers), which is also the
	// rounds' warm-up.
	tx0 := regHost.TxBytes()
	mirrorPulls(t, bin, hosts[:1], configs["shoal"], ref)
	oneCopy := float64(regHost.TxBytes() - tx0)
	linkSeconds := oneCopy * 8 / (float64(mbit) * 1e6)

	type arm struct {
		pull     []float64 // seconds from the common start to the last layer verified, per node
		egress   float64
		uploads  []float64 // bytes each node's swarm uploaded
		peers    float64   // blob bytes the mirrors fetched from peers
		upstream float64
	}
	arms := map[string][]arm{}
	for round := range pairs() {
		order := []string{"shoal", "mirror-no-coalescing", "direct"}
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, name := range order {
			var a arm
			tx0 := regHost.TxBytes()
			switch name {
			case "direct":
				a.pull = directPulls(t, hosts, src)
			default:
				a.pull, a.uploads, a.peers, a.upstream = mirrorPulls(t, bin, hosts, configs[name], ref)
			}
			a.egress = float64(regHost.TxBytes() - tx0)
			t.Logf("round %d %s: p50 %.2fs p99 %.2fs, registry egress %.1f MB = %.2f copies, blob bytes from peers %.1f MB, upstream %.1f MB",
				round, name, quantile(a.pull, 0.5), quantile(a.pull, 0.99), a.egress/1e6, a.egress/oneCopy, a.peers/1e6, a.upstream/1e6)
			arms[name] = append(arms[name], a)
		}
	}

	summ := func(name string) map[string]any {
		var p50, p99, egress, copies, busiest []float64
		for _, a := range arms[name] {
			p50 = append(p50, quantile(a.pull, 0.5))
			p99 = append(p99, quantile(a.pull, 0.99))
			egress = append(egress, a.egress)
			copies = append(copies, a.egress/oneCopy)
			if m := mean(a.uploads); m > 0 {
				busiest = append(busiest, slices.Max(a.uploads)/m)
			}
		}
		out := map[string]any{
			"p50_pull_s": median(p50), "p99_pull_s": median(p99), "p50_samples_s": p50, "p99_samples_s": p99,
			"registry_egress_bytes": median(egress), "registry_egress_per_copy": median(copies), "egress_per_copy_samples": copies,
			"p99_per_link_copy_time": median(p99) / linkSeconds,
		}
		if len(busiest) > 0 {
			out["busiest_upload_per_mean"] = median(busiest)
		}
		return out
	}
	info := imageInfo(t, src, img)
	info["description"] = "testenv.DebianImage: Debian bookworm minbase + python3, 3 layers, standard (unconverted)"
	var ratios []float64
	for i := range arms["shoal"] {
		ratios = append(ratios, quantile(arms["direct"][i].pull, 0.5)/quantile(arms["shoal"][i].pull, 0.5))
	}
	writeResult(t, "mirror-rollout", map[string]any{
		"runs":                   len(arms["shoal"]),
		"nodes":                  nodes,
		"registry_link_mbit":     mbit,
		"image":                  info,
		"client":                 "go-containerregistry in each node's namespace through its own mirror: manifest, config, then every layer at once, each checked against its digest",
		"one_copy_bytes":         oneCopy,
		"one_copy_note":          "registry link egress when one node pulls the image alone through its mirror (manifest, config, layers), before the rounds",
		"one_copy_link_s":        linkSeconds,
		"shoal":                  summ("shoal"),
		"baseline":               summ("direct"),
		"baseline_name":          "every node pulls the image straight from the capped registry",
		"mirror_no_coalescing":   summ("mirror-no-coalescing"),
		"ratio_median":           median(ratios),
		"ratio_note":             "p50 pull time, direct ÷ shoal, per round",
		"goals":                  "registry egress ÷ one copy ≤ 1.2; p99 pull time ≤ 2× one copy's time over the link",
		"network":                "each node in its own network namespace on one bridge (198.18.0.0/16); registry link shaped with tc tbf both ways; nodes unshaped",
		"mirror_listen_per_node": mirrorListen,
	})
}

// registryLab is a network lab with a registry host holding the Debian
// image (standard, unconverted), its link capped at mbit.
func registryLab(t *testing.T, mbit int) (*netlab.Lab, *netlab.Host, string, v1.Image) {
	t.Helper()
	needNetlab(t)
	lab := netlab.New(t)
	regHost := lab.AddHost("registry")
	src := regHost.StartRegistry(t) + "/bench/debian:v1"
	img := testenv.DebianImage(t)
	r, _ := name.ParseReference(src, name.Insecure)
	if err := remote.Write(r, img, remote.WithTransport(&http.Transport{DialContext: regHost.DialContext})); err != nil {
		t.Fatal(err)
	}
	if err := regHost.SetRate(mbit); err != nil {
		t.Fatal(err)
	}
	return lab, regHost, src, img
}

// mirrorPulls starts a daemon with the mirror (config) and the swarm on
// every host, then has every node pull ref through its own mirror at once.
// It returns each node's pull time, its swarm's upload, and the blob bytes
// all mirrors fetched from peers and upstream.
func mirrorPulls(t *testing.T, bin string, hosts []*netlab.Host, config, ref string) (pull, uploads []float64, peers, upstream float64) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := startCluster(t, ctx, bin, hosts, true, "--config", config)
	defer c.stop()
	pull = pullAllAt(t, hosts, func(int) string { return mirrorListen + "/" + ref })
	for i, h := range hosts {
		st := waitStatus(t, h, bin, c.states[i])
		uploads = append(uploads, float64(st.Swarm.BytesUploaded))
		peers += float64(st.Mirror.FetchedPeers)
		upstream += float64(st.Mirror.FetchedUpstream)
	}
	return pull, uploads, peers, upstream
}

// directPulls has every node pull src straight from the registry at once.
func directPulls(t *testing.T, hosts []*netlab.Host, src string) []float64 {
	t.Helper()
	return pullAllAt(t, hosts, func(int) string { return src })
}

// pullAllAt has every host pull the image ref(i) names at the same moment,
// from inside its namespace, as containerd does: the manifest, the config,
// then every layer at once, each read whole and checked against its
// digest. It returns each host's seconds from the common start to its
// last verified byte.
func pullAllAt(t *testing.T, hosts []*netlab.Host, ref func(i int) string) []float64 {
	t.Helper()
	took := make([]float64, len(hosts))
	var wg sync.WaitGroup
	start := time.Now()
	for i, h := range hosts {
		wg.Go(func() {
			if err := pullImage(t.Context(), ref(i), h); err != nil {
				t.Errorf("node %d: %v", i, err)
				return
			}
			took[i] = time.Since(start).Seconds()
		})
	}
	wg.Wait()
	return took
}

func pullImage(ctx context.Context, ref string, h *netlab.Host) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return err
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithTransport(&http.Transport{DialContext: h.DialContext}))
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	if _, err := img.RawConfigFile(); err != nil {
		return fmt.Errorf("config of %s: %w", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	errs := make([]error, len(layers))
	var wg sync.WaitGroup
	for k, l := range layers {
		wg.Go(func() {
			rc, err := l.Compressed()
			if err != nil {
				errs[k] = err
				return
			}
			defer rc.Close()
			if _, err := io.Copy(io.Discard, rc); err != nil { // ggcr checks the digest at EOF
				errs[k] = fmt.Errorf("layer %d of %s: %w", k, ref, err)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
