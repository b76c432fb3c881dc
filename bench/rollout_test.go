package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/internal/netlab"
	"github.com/shoal-project/shoal/sandbox"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestBenchRollout: N nodes, each a daemon in its own network namespace on
// a bridge, start python3 from the same image at the same moment; the
// registry sits behind a tbf-capped link. Three arms per round, alternating:
// Shoal (lazy + swarm), lazy without peers (daemons with --no-p2p), and the
// standard full pull + unpack on every node.
func TestBenchRollout(t *testing.T) {
	needBench(t)
	needRoot(t)
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	bin := buildShoal(t)
	lab, regHost, src, img := rolloutLab(t, mbit)
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}

	type arm struct {
		ready    []float64 // seconds from the common start to "ok", per node
		egress   float64   // bytes the registry host sent
		fromPeer float64
		fromReg  float64
		uploads  []float64
		lookups  []float64
		wire     []float64 // per node registry wire bytes (lazy arms)
		// unreachable: peers the nodes found unreachable (summed), which
		// a healthy rig should never see: a live designated fetcher
		// taken for gone costs a second registry copy of its blocks.
		unreachable float64
	}
	// Unique bytes: the registry's egress when one node starts alone (cold):
	// manifest, index and the merged ranges of the blocks python reads —
	// the "one copy" a whole rollout should cost.
	tx0 := regHost.TxBytes()
	lazyRollout(t, bin, hosts[:1], src, false)
	unique := float64(regHost.TxBytes() - tx0)

	arms := map[string][]arm{}
	for round := range pairs() {
		for _, name := range []string{"shoal", "lazy-no-peers", "full-pull"} {
			var a arm
			tx0 := regHost.TxBytes()
			switch name {
			case "full-pull":
				a.ready = fullPullRollout(t, hosts, src)
			default:
				a.ready, a.fromPeer, a.fromReg, a.uploads, a.lookups, a.wire, a.unreachable = lazyRollout(t, bin, hosts, src, name == "shoal")
			}
			a.egress = float64(regHost.TxBytes() - tx0)
			t.Logf("round %d %s: p50 %.2fs p99 %.2fs, registry egress %.1f MB", round, name,
				quantile(a.ready, 0.5), quantile(a.ready, 0.99), a.egress/1e6)
			arms[name] = append(arms[name], a)
		}
	}

	summ := func(name string) map[string]any {
		var p50, p99, egress, peerShare, busiest, lookups, unreachable []float64
		for _, a := range arms[name] {
			p50 = append(p50, quantile(a.ready, 0.5))
			p99 = append(p99, quantile(a.ready, 0.99))
			egress = append(egress, a.egress)
			if a.fromPeer+a.fromReg > 0 {
				peerShare = append(peerShare, a.fromPeer/(a.fromPeer+a.fromReg))
			}
			if m := mean(a.uploads); m > 0 {
				busiest = append(busiest, slices.Max(a.uploads)/m)
			}
			lookups = append(lookups, a.lookups...)
			unreachable = append(unreachable, a.unreachable)
		}
		out := map[string]any{
			"p50_ready_s": median(p50), "p99_ready_s": median(p99), "p50_samples_s": p50, "p99_samples_s": p99,
			"registry_egress_bytes": median(egress), "registry_egress_per_unique_bytes": median(egress) / unique,
		}
		if len(peerShare) > 0 {
			out["peer_share_of_block_bytes"] = median(peerShare)
		}
		if len(busiest) > 0 {
			out["busiest_upload_per_mean"] = median(busiest)
		}
		if len(lookups) > 0 {
			out["dht_lookups_per_node_start"] = median(lookups)
		}
		if name == "shoal" {
			out["unreachable_peers_samples"] = unreachable
		}
		return out
	}
	var speedups []float64
	for i := range arms["shoal"] {
		speedups = append(speedups, quantile(arms["full-pull"][i].ready, 0.5)/quantile(arms["shoal"][i].ready, 0.5))
	}
	writeResult(t, "rollout", map[string]any{
		"runs":               len(arms["shoal"]),
		"nodes":              nodes,
		"registry_link_mbit": mbit,
		"image":              imageInfo(t, src, img),
		"command":            pythonCmd,
		"unique_bytes":       unique,
		"unique_bytes_note":  "registry link egress when one node starts alone and cold: manifest, index and the merged block ranges it reads",
		"shoal":              summ("shoal"),
		"baseline":           summ("full-pull"),
		"baseline_name":      "every node pulls and unpacks the whole image from the capped registry, then runs the command",
		"lazy_no_peers":      summ("lazy-no-peers"),
		"ratio_median":       median(speedups),
		"ratio_note":         "p50 time to ready, full pull ÷ shoal, per round",
		"goals":              "registry egress ÷ unique ≤ 1.2; peer share ≥ 0.9; busiest upload ÷ mean ≤ 4",
		"network":            "each node in its own network namespace on one bridge (198.18.0.0/16); registry link shaped with tc tbf both ways; nodes unshaped",
	})
}

// lazyRollout starts a daemon per node (node 0 first, the others
// bootstrapped from it), then `shoal run` on every node at once.
func lazyRollout(t *testing.T, bin string, hosts []*netlab.Host, src string, peers bool) (ready []float64, fromPeer, fromReg float64, uploads, lookups, wire []float64, unreachable float64) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := startCluster(t, ctx, bin, hosts, peers)
	defer c.stop()
	ready, stats := c.runPython(t, ctx, src, all(len(hosts)))
	for i, h := range hosts {
		fromPeer += float64(stats[i].BytesFromPeers)
		fromReg += float64(stats[i].BytesFromRegistry)
		wire = append(wire, float64(stats[i].RegistryWireBytes))
		if peers {
			st := waitStatus(t, h, bin, c.states[i])
			uploads = append(uploads, float64(st.Swarm.BytesUploaded))
			if st.Swarm.DHTLookups > 0 {
				lookups = append(lookups, float64(st.Swarm.DHTLookups))
			}
			unreachable += float64(st.Swarm.Unreachable)
		}
	}
	return ready, fromPeer, fromReg, uploads, lookups, wire, unreachable
}

type daemonStatus struct {
	Addrs []string `json:"addrs"`
	Swarm struct {
		BytesUploaded int64 `json:"bytes_uploaded"`
		DHTLookups    int64 `json:"dht_lookups"`
		Unreachable   int64 `json:"unreachable"`
		ProofsSent    int64 `json:"proofs_sent"`
		BadBlocks     int64 `json:"bad_blocks"`
		// Designated fetchers given up on after ComingGrace.
		ComingUndelivered int64 `json:"coming_undelivered"`
	} `json:"swarm"`
	Mirror struct {
		FetchedPeers    int64 `json:"fetched_peers"`
		FetchedUpstream int64 `json:"fetched_upstream"`
	} `json:"mirror"`
}

// waitStatus polls `shoal status` inside the host until the daemon answers.
func waitStatus(t *testing.T, h *netlab.Host, bin, state string) daemonStatus {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := h.Command(t.Context(), bin, "status", "--state-dir", state).Output()
		if err == nil {
			var st daemonStatus
			if err := json.Unmarshal(out, &st); err != nil {
				t.Fatalf("status: %v", err)
			}
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon in %s did not come up: %v", h.Name(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// fullPullRollout: every node pulls and unpacks the whole image from the
// capped registry at once (through its own namespace), then runs python.
func fullPullRollout(t *testing.T, hosts []*netlab.Host, src string) []float64 {
	t.Helper()
	ready := make([]float64, len(hosts))
	var wg sync.WaitGroup
	start := time.Now()
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			root, remove := scratchDir(t, "bench-rollout-pull-")
			defer remove()
			lower, upper, work := filepath.Join(root, "lower"), filepath.Join(root, "upper"), filepath.Join(root, "work")
			_, cf, err := unpackImage(t.Context(), src, lower, remote.WithTransport(&http.Transport{DialContext: h.DialContext}))
			if err != nil {
				t.Errorf("node %d: pull: %v", i, err)
				return
			}
			for _, d := range []string{upper, work} {
				_ = os.Mkdir(d, 0o755)
			}
			out := &okWriter{start: start}
			var errb syncBuffer
			if err := sandbox.Run(t.Context(), sandbox.Spec{Lower: lower, Upper: upper, Work: work, Args: pythonCmd,
				Env: cf.Config.Env, Dir: cf.Config.WorkingDir, Hostname: "shoal", Stdout: out, Stderr: &errb}); err != nil {
				t.Errorf("node %d: run: %v %s", i, err, errb.String())
				return
			}
			ready[i] = out.okAfter().Seconds()
		}()
	}
	wg.Wait()
	return ready
}

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(q*float64(len(s)-1) + 0.5)
	return s[i]
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	var t float64
	for _, x := range xs {
		t += x
	}
	return t / float64(len(xs))
}
