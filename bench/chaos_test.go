package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/internal/netlab"
)

// Chaos, per round of the chaos arm, from the moment python starts on
// every node.
const (
	// The registry's link goes down at chaosLinkDown for chaosOutage.
	chaosLinkDown = 300 * time.Millisecond
	chaosOutage   = 3 * time.Second
	// Two honest daemons are SIGKILLed at chaosKill.
	chaosKill   = 800 * time.Millisecond
	chaosKilled = 2
)

// TestBenchChaosRollout: the rollout of TestBenchRollout with faults and
// byzantine peers, beside the clean rollout in the same run, alternating
// (issue 17). N honest daemons in network namespaces start python3 at
// once from the Debian image, the registry behind a tbf-capped link. In
// the chaos arm:
//   - two byzantine members (internal/chaos/byzd, the real p2p code made
//     hostile): a liar whose peer ID is ground into the image's origin
//     group and that answers every ORIGIN request COMING and sends
//     nothing, and a node that holds every block and serves each one
//     corrupted;
//   - two honest daemons are killed with SIGKILL during the start;
//   - the registry's link is down for 3 s during the start.
//
// Goals: every honest surviving node starts; p99 time to ready ≤ 2× the
// clean p50 + 3 s; registry egress ≤ 1.5× the unique bytes; only verified
// bytes are used (python runs, and the corrupt blocks are struck). Peak
// RSS of the daemons is reported.
func TestBenchChaosRollout(t *testing.T) {
	needBench(t)
	needRoot(t)
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	faults := chaosFaults()
	bin := buildShoal(t)
	byzd := buildByzd(t)
	lab, regHost, src, img := rolloutLab(t, mbit)
	flatRef, err := fetch.FlatRef(src)
	if err != nil {
		t.Fatal(err)
	}
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}
	byzHosts := []*netlab.Host{lab.AddHost("liar"), lab.AddHost("corrupt")}

	// One node alone first: the unique bytes, and the warm-up.
	tx0 := regHost.TxBytes()
	lazyRollout(t, bin, hosts[:1], src, true)
	unique := float64(regHost.TxBytes() - tx0)

	type armResult struct {
		ready       []float64 // surviving honest nodes
		failed      int       // surviving honest nodes whose run failed
		egress      float64
		rss         []float64 // peak RSS of the surviving daemons, bytes
		badBlocks   float64   // corrupt blocks the honest nodes struck
		undelivered float64   // designated fetchers given up on (ComingGrace)
	}
	results := map[string][]armResult{}
	for round := range pairs() {
		order := []string{"clean", "chaos"}
		if round%2 == 1 {
			order = []string{"chaos", "clean"}
		}
		for _, arm := range order {
			ctx, cancel := context.WithCancel(t.Context())
			c := startCluster(t, ctx, bin, hosts, true)
			var byz []*exec.Cmd
			if arm == "chaos" && faults["byzantine"] {
				boot := waitStatus(t, hosts[0], bin, c.states[0]).Addrs[0]
				byz = startByzantine(t, ctx, byzd, byzHosts, boot, flatRef)
			}
			killed := map[int]bool{}
			tx0 := regHost.TxBytes()
			if arm == "chaos" && faults["outage"] {
				go func() {
					time.Sleep(chaosLinkDown)
					if err := regHost.SetLinkUp(false); err != nil {
						t.Errorf("registry link down: %v", err)
						return
					}
					time.Sleep(chaosOutage)
					if err := regHost.SetLinkUp(true); err != nil {
						t.Errorf("registry link up: %v", err)
					}
				}()
			}
			if arm == "chaos" && faults["kill"] {
				for k := range chaosKilled {
					killed[nodes-1-k] = true
				}
				time.AfterFunc(chaosKill, func() {
					for i := range killed {
						_ = c.procs[i].Kill()
					}
				})
			}
			ready, _, errs := c.startPython(ctx, src, all(nodes))
			var a armResult
			a.egress = float64(regHost.TxBytes() - tx0)
			for i := range nodes {
				if killed[i] {
					continue
				}
				if errs[i] != nil {
					a.failed++
					t.Errorf("round %d %s: surviving node %d: %v", round, arm, i, errs[i])
					continue
				}
				a.ready = append(a.ready, ready[i])
				st := waitStatus(t, hosts[i], bin, c.states[i])
				a.badBlocks += float64(st.Swarm.BadBlocks)
				a.undelivered += float64(st.Swarm.ComingUndelivered)
				a.rss = append(a.rss, peakRSS(t, c.procs[i].Pid))
			}
			for _, b := range byz {
				_ = b.Process.Signal(syscall.SIGTERM)
				_ = b.Wait()
			}
			c.stop()
			cancel()
			t.Logf("round %d %s: %d of %d survivors ready, p50 %.2fs p99 %.2fs, registry egress %.1f MB (%.2f× unique), %0.f corrupt blocks struck, %0.f liars given up on, peak RSS %.0f MB",
				round, arm, len(a.ready), nodes-len(killed), quantile(a.ready, 0.5), quantile(a.ready, 0.99), a.egress/1e6, a.egress/unique,
				a.badBlocks, a.undelivered, slicesMax(a.rss)/(1<<20))
			results[arm] = append(results[arm], a)
		}
	}

	summ := func(arm string) map[string]any {
		var p50, p99, egress, rss, bad, undelivered []float64
		failed := 0
		for _, a := range results[arm] {
			p50 = append(p50, quantile(a.ready, 0.5))
			p99 = append(p99, quantile(a.ready, 0.99))
			egress = append(egress, a.egress)
			rss = append(rss, slicesMax(a.rss))
			bad = append(bad, a.badBlocks)
			undelivered = append(undelivered, a.undelivered)
			failed += a.failed
		}
		return map[string]any{"p50_ready_s": median(p50), "p99_ready_s": median(p99), "p50_samples_s": p50, "p99_samples_s": p99,
			"registry_egress_bytes": median(egress), "registry_egress_per_unique_bytes": median(egress) / unique,
			"surviving_nodes_failed": failed, "peak_daemon_rss_bytes": slicesMax(rss), "corrupt_blocks_struck": bad,
			"designated_fetchers_given_up_on": undelivered}
	}
	var p99Goal []float64
	for i := range results["chaos"] {
		p99Goal = append(p99Goal, quantile(results["chaos"][i].ready, 0.99)/(2*quantile(results["clean"][i].ready, 0.5)+3))
	}
	writeResult(t, "chaos-rollout", map[string]any{
		"runs":               len(results["chaos"]),
		"nodes":              nodes,
		"registry_link_mbit": mbit,
		"image":              imageInfo(t, src, img),
		"command":            pythonCmd,
		"unique_bytes":       unique,
		"faults":             faults,
		"chaos": fmt.Sprintf("2 byzantine members (a coming-liar ground into the origin group, a node serving corrupt blocks); %d honest daemons SIGKILLed %v after the start; the registry's link down from %v to %v",
			chaosKilled, chaosKill, chaosLinkDown, chaosLinkDown+chaosOutage),
		"shoal":         summ("chaos"),
		"baseline":      summ("clean"),
		"baseline_name": "the same rollout, no faults, no byzantine peers, in the same run",
		"ratio_median":  median(p99Goal),
		"ratio_samples": p99Goal,
		"ratio_note":    "chaos p99 ÷ (2 × clean p50 + 3 s), per round: at most 1 is the goal",
		"goals":         "every honest surviving node starts; chaos p99 ≤ 2× clean p50 + 3 s; registry egress ≤ 1.5× unique; corrupt blocks struck, never used",
		"network":       "each node in its own network namespace on one bridge (198.18.0.0/16); registry link shaped with tc tbf both ways; nodes unshaped",
	})
}

// chaosFaults are the faults of the chaos arm: all three, or those
// $SHOAL_CHAOS lists (byzantine, kill, outage), to see what each costs.
func chaosFaults() map[string]bool {
	faults := map[string]bool{"byzantine": true, "kill": true, "outage": true}
	if v := os.Getenv("SHOAL_CHAOS"); v != "" {
		faults = map[string]bool{}
		for f := range strings.SplitSeq(v, ",") {
			faults[strings.TrimSpace(f)] = true
		}
	}
	return faults
}

// buildByzd builds the byzantine member (internal/chaos/byzd, -tags
// shoal_hostile).
func buildByzd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "byzd")
	out, err := exec.CommandContext(t.Context(), "go", "build", "-tags", "shoal_hostile", "-o", bin, "github.com/shoal-project/shoal/internal/chaos/byzd").CombinedOutput()
	if err != nil {
		t.Fatalf("go build byzd: %v\n%s", err, out)
	}
	return bin
}

// startByzantine starts the liar (ground into the origin group) and the
// corrupt node on hosts, bootstrapped from boot, and waits until both are
// members of the image's swarm.
func startByzantine(t *testing.T, ctx context.Context, bin string, hosts []*netlab.Host, boot, ref string) []*exec.Cmd {
	t.Helper()
	args := [][]string{{"--mode", "coming-liar", "--grind"}, {"--mode", "corrupt", "--hold-all"}}
	var cmds []*exec.Cmd
	for i, h := range hosts {
		dir, err := os.MkdirTemp("", "bench-byzd-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		cmd := h.Command(ctx, bin, append([]string{"--state-dir", dir, "--listen", "/ip4/" + h.IP() + "/tcp/4701",
			"--bootstrap", boot, "--image", ref, "--plain-http"}, args[i]...)...)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		ready := make(chan string, 1)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if id, ok := strings.CutPrefix(sc.Text(), "ready "); ok {
					ready <- id
				}
			}
		}()
		select {
		case id := <-ready:
			t.Logf("byzantine %s (%s) is a member: %s", h.Name(), args[i][1], id)
		case <-time.After(2 * time.Minute):
			t.Fatalf("byzantine %s did not come up", h.Name())
		}
	}
	return cmds
}

// peakRSS reads a process's peak resident set size (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Errorf("peak RSS of %d: %v", pid, err)
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb * 1024
		}
	}
	return 0
}

func slicesMax(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
