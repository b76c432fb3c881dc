package bench

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/internal/netlab"
	"github.com/shoal-project/shoal/trace"
)

// TestBenchSeeding measures the prefetch and seeding issue's three claims
// in one run, on the Debian + python image behind a capped registry link:
//
//   - time to ready of a cold node with the image's start-up trace
//     published vs without (`--trace-prefetch=false`), alternating;
//   - time to fill a whole image with `shoal prefetch` vs a standard full
//     pull (pull + unpack every layer), alternating;
//   - a rollout to N-k nodes after k nodes were seeded with `shoal prefetch
//     --wait`: registry egress during the rollout and p99 time to ready,
//     against the same rollout without seeds.
func TestBenchSeeding(t *testing.T) {
	needBench(t)
	needRoot(t)
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	seeds := envInt("SHOAL_BENCH_SEEDS", 2)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	bin := buildShoal(t)
	lab, regHost, src, img := rolloutLab(t, mbit)
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}
	h0 := hosts[0]

	// Record the start-up trace on a cold node and publish it.
	traceFile := filepath.Join(t.TempDir(), "python.trace.json")
	runShoalCold(t, h0.Command, bin, src, "--record-trace", traceFile)
	if out, err := h0.Command(t.Context(), bin, "trace", "push", "--plain-http", src, traceFile).CombinedOutput(); err != nil {
		t.Fatalf("trace push: %v\n%s", err, out)
	}
	tr, err := trace.ReadFile(traceFile)
	if err != nil {
		t.Fatal(err)
	}
	traceSize, traceStored := tr.Bytes()
	t.Logf("trace: %d blocks, %.1f MB (%.1f MB stored) of an image of %.1f MB stored", len(tr.Events), float64(traceSize)/1e6, float64(traceStored)/1e6, float64(tr.StoredBytes)/1e6)

	// 1. Time to ready, no trace vs trace.
	var noTrace, withTrace, ttrRatio, wireNo, wireWith []float64
	for round := range pairs() {
		var a, b float64
		var sa, sb shoalRunStats
		arms := []func(){
			func() { a, sa = coldSeconds(runShoalCold(t, h0.Command, bin, src, "--trace-prefetch=false")) },
			func() { b, sb = coldSeconds(runShoalCold(t, h0.Command, bin, src)) },
		}
		if round%2 == 1 {
			slices.Reverse(arms)
		}
		for _, f := range arms {
			f()
		}
		noTrace, withTrace = append(noTrace, a), append(withTrace, b)
		wireNo, wireWith = append(wireNo, float64(sa.RegistryWireBytes)), append(wireWith, float64(sb.RegistryWireBytes))
		ttrRatio = append(ttrRatio, a/b)
		t.Logf("round %d: time to ready without trace %.2fs, with trace %.2fs", round, a, b)
	}

	// 2. Whole image: shoal prefetch vs a standard pull.
	var prefetchS, pullS, fillRatio []float64
	tx := &http.Transport{DialContext: h0.DialContext}
	for round := range pairs() {
		var p, f float64
		arms := []func(){
			func() {
				state, remove := scratchDir(t, "bench-seed-prefetch-")
				defer remove()
				start := time.Now()
				if out, err := h0.Command(t.Context(), bin, "prefetch", "--wait", "--plain-http", "--state-dir", state, src).CombinedOutput(); err != nil {
					t.Fatalf("prefetch: %v\n%s", err, out)
				}
				p = time.Since(start).Seconds()
			},
			func() {
				root, remove := scratchDir(t, "bench-seed-pull-")
				defer remove()
				start := time.Now()
				if _, _, err := unpackImage(t.Context(), src, filepath.Join(root, "rootfs"), remote.WithTransport(tx)); err != nil {
					t.Fatal(err)
				}
				f = time.Since(start).Seconds()
			},
		}
		if round%2 == 1 {
			slices.Reverse(arms)
		}
		for _, fn := range arms {
			fn()
		}
		prefetchS, pullS, fillRatio = append(prefetchS, p), append(pullS, f), append(fillRatio, f/p)
		t.Logf("round %d: whole image by prefetch %.2fs, by full pull %.2fs", round, p, f)
	}

	// 3. Rollout after k seeded nodes vs without seeds.
	type rollout struct {
		ready    []float64
		egress   float64
		seedTime float64
	}
	arms := map[string][]rollout{}
	for round := range pairs() {
		names := []string{"seeded", "unseeded"}
		if round%2 == 1 {
			slices.Reverse(names)
		}
		for _, name := range names {
			ctx, cancel := context.WithCancel(t.Context())
			c := startCluster(t, ctx, bin, hosts, true)
			var r rollout
			if name == "seeded" {
				start := time.Now()
				var wg sync.WaitGroup
				for i := range seeds {
					wg.Go(func() {
						if out, err := hosts[i].Command(ctx, bin, "prefetch", "--wait", "--state-dir", c.states[i], src).CombinedOutput(); err != nil {
							t.Errorf("seed %d: %v\n%s", i, err, out)
						}
					})
				}
				wg.Wait()
				r.seedTime = time.Since(start).Seconds()
			}
			tx0 := regHost.TxBytes()
			r.ready, _ = c.runPython(t, ctx, src, all(nodes)[seeds:])
			r.egress = float64(regHost.TxBytes() - tx0)
			c.stop()
			cancel()
			t.Logf("round %d %s: %d nodes, p50 %.2fs p99 %.2fs, registry egress %.2f MB (seeding took %.1fs)", round, name,
				nodes-seeds, quantile(r.ready, 0.5), quantile(r.ready, 0.99), r.egress/1e6, r.seedTime)
			arms[name] = append(arms[name], r)
		}
	}
	summ := func(name string) map[string]any {
		var p50, p99, egress, seedTime []float64
		for _, r := range arms[name] {
			p50 = append(p50, quantile(r.ready, 0.5))
			p99 = append(p99, quantile(r.ready, 0.99))
			egress = append(egress, r.egress)
			seedTime = append(seedTime, r.seedTime)
		}
		out := map[string]any{"p50_ready_s": median(p50), "p99_ready_s": median(p99), "p99_samples_s": p99,
			"registry_egress_bytes": median(egress), "registry_egress_per_image_stored_bytes": median(egress) / float64(tr.StoredBytes)}
		if name == "seeded" {
			out["seeding_s"] = median(seedTime)
		}
		return out
	}
	writeResult(t, "seeding", map[string]any{
		"runs":               pairs(),
		"registry_link_mbit": mbit,
		"image":              imageInfo(t, src, img),
		"image_stored_bytes": tr.StoredBytes,
		"command":            pythonCmd,
		"trace": map[string]any{"blocks": len(tr.Events), "bytes": traceSize, "stored_bytes": traceStored,
			"image_blocks": tr.Blocks},
		"time_to_ready": map[string]any{
			"no_trace_s": median(noTrace), "trace_s": median(withTrace), "no_trace_samples_s": noTrace, "trace_samples_s": withTrace,
			"registry_wire_bytes_no_trace": median(wireNo), "registry_wire_bytes_trace": median(wireWith),
			"ratio_median": median(ttrRatio), "ratio_note": "no trace ÷ trace, per pair (cold node, same capped link)",
		},
		"fill": map[string]any{
			"prefetch_s": median(prefetchS), "full_pull_s": median(pullS), "prefetch_samples_s": prefetchS, "full_pull_samples_s": pullS,
			"ratio_median": median(fillRatio), "ratio_note": "full pull (pull + unpack every layer) ÷ shoal prefetch --wait, per pair; goal ≥ 1 (no slower)",
		},
		"seeded_rollout": map[string]any{
			"nodes": nodes - seeds, "seeds": seeds,
			"seeded": summ("seeded"), "unseeded": summ("unseeded"),
			"note": "k nodes run `shoal prefetch --wait` through their daemons first; egress counts only the rollout that follows; goal < 5% of one image",
		},
		"network": "each node in its own network namespace on one bridge (198.18.0.0/16); registry link shaped with tc tbf both ways; nodes unshaped",
	})
}

// coldSeconds keeps runShoalCold's time to "ok", in seconds, and the stats.
func coldSeconds(toOK, _ time.Duration, st shoalRunStats) (float64, shoalRunStats) {
	return toOK.Seconds(), st
}
