package bench

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/internal/netlab"
)

// TestBenchPrivateRollout: what keeping an image private costs a rollout.
// The rollout of TestBenchRollout (N daemons in network namespaces, python3
// started on all at once, the registry behind a tbf-capped link) on a real
// registry behind htpasswd, every daemon holding credentials, in two arms
// alternating round by round:
//   - private (the default for a registry that refuses anonymous reads):
//     every node reads the flat manifest from the registry itself, and
//     peers exchange the index, have bitmaps and blocks only after a
//     proof of access;
//   - public: the same image listed in registry.public_repositories,
//     shared as a public image is (manifest from peers, no proofs).
//
// Goal (issue 16): the private arm's p50 time to ready and registry egress
// within 5% of the public arm's, in the same run.
func TestBenchPrivateRollout(t *testing.T) {
	needBench(t)
	needRoot(t)
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	bin := buildShoal(t)
	const user, password = "bench", "bench-secret"
	lab, regHost, src, img := rolloutLabAs(t, mbit, user, password)
	regAddr := strings.SplitN(src, "/", 2)[0]
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}

	// The daemons' credentials, and one config per arm.
	dir := t.TempDir()
	creds, err := json.Marshal(map[string]any{"auths": map[string]any{regAddr: map[string]string{
		"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), creds, 0o600); err != nil {
		t.Fatal(err)
	}
	configs := map[string]string{
		"private": fmt.Sprintf("registry:\n  docker_config: %s\n", dir),
		"public":  fmt.Sprintf("registry:\n  docker_config: %s\n  public_repositories: [%q]\n", dir, regAddr+"/bench/*"),
	}
	for arm, body := range configs {
		if err := os.WriteFile(filepath.Join(dir, arm+".yaml"), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	type armResult struct {
		ready             []float64
		egress            float64
		fromPeer, fromReg float64
		proofs            float64 // proof-of-access handshakes run, summed over nodes
	}
	// A first start of one node, private, before the rounds: the cold
	// effects of a first run (the binary and image files out of the page
	// cache, the lab's first connections) are not charged to either arm,
	// and its registry egress is the unique bytes one node needs.
	tx0 := regHost.TxBytes()
	{
		ctx, cancel := context.WithCancel(t.Context())
		c := startCluster(t, ctx, bin, hosts[:1], true, "--config", filepath.Join(dir, "private.yaml"))
		c.runPython(t, ctx, src, all(1))
		c.stop()
		cancel()
	}
	unique := float64(regHost.TxBytes() - tx0)

	results := map[string][]armResult{}
	for round := range pairs() {
		order := []string{"private", "public"}
		if round%2 == 1 {
			order = []string{"public", "private"}
		}
		for _, arm := range order {
			var a armResult
			ctx, cancel := context.WithCancel(t.Context())
			tx0 := regHost.TxBytes()
			c := startCluster(t, ctx, bin, hosts, true, "--config", filepath.Join(dir, arm+".yaml"))
			var stats []shoalRunStats
			a.ready, stats = c.runPython(t, ctx, src, all(len(hosts)))
			a.egress = float64(regHost.TxBytes() - tx0)
			for i, h := range hosts {
				a.fromPeer += float64(stats[i].BytesFromPeers)
				a.fromReg += float64(stats[i].BytesFromRegistry)
				st := waitStatus(t, h, bin, c.states[i])
				a.proofs += float64(st.Swarm.ProofsSent)
			}
			c.stop()
			cancel()
			t.Logf("round %d %s: p50 %.2fs p99 %.2fs, registry egress %.1f MB, peers %.0f%% of block bytes, %.0f proofs of access",
				round, arm, quantile(a.ready, 0.5), quantile(a.ready, 0.99), a.egress/1e6, 100*a.fromPeer/(a.fromPeer+a.fromReg), a.proofs)
			results[arm] = append(results[arm], a)
		}
	}

	summ := func(arm string) map[string]any {
		var p50, p99, egress, share, proofs []float64
		for _, a := range results[arm] {
			p50 = append(p50, quantile(a.ready, 0.5))
			p99 = append(p99, quantile(a.ready, 0.99))
			egress = append(egress, a.egress)
			share = append(share, a.fromPeer/(a.fromPeer+a.fromReg))
			proofs = append(proofs, a.proofs)
		}
		return map[string]any{"p50_ready_s": median(p50), "p99_ready_s": median(p99), "p50_samples_s": p50, "p99_samples_s": p99,
			"registry_egress_bytes": median(egress), "egress_samples_bytes": egress, "registry_egress_per_unique_bytes": median(egress) / unique,
			"peer_share_of_block_bytes": median(share), "proofs_of_access_per_round": proofs}
	}
	var p50Ratio, egressRatio []float64
	for i := range results["private"] {
		p, q := results["private"][i], results["public"][i]
		p50Ratio = append(p50Ratio, quantile(p.ready, 0.5)/quantile(q.ready, 0.5))
		egressRatio = append(egressRatio, p.egress/q.egress)
	}
	writeResult(t, "private-rollout", map[string]any{
		"runs":                 len(results["private"]),
		"nodes":                nodes,
		"registry_link_mbit":   mbit,
		"image":                imageInfo(t, src, img),
		"command":              pythonCmd,
		"registry":             "Debian's docker-registry behind htpasswd (anonymous reads refused); every daemon has credentials (registry.docker_config)",
		"unique_bytes":         unique,
		"unique_bytes_note":    "registry link egress when one node starts alone and cold (private), before the rounds: also their warm-up",
		"shoal":                summ("private"),
		"baseline":             summ("public"),
		"baseline_name":        "the same image listed in registry.public_repositories: shared as a public image (manifest from peers, no proofs of access)",
		"ratio_median":         median(p50Ratio),
		"ratio_samples":        p50Ratio,
		"ratio_note":           "p50 time to ready, private ÷ public, per round",
		"egress_ratio_median":  median(egressRatio),
		"egress_ratio_samples": egressRatio,
		"goals":                "private p50 and registry egress within 5% of public (ratios ≤ 1.05)",
		"network":              "each node in its own network namespace on one bridge (198.18.0.0/16); registry link shaped with tc tbf both ways; nodes unshaped",
	})
}
