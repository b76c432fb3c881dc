package bench

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/netlab"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/lazyfs"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/sandbox"
	"github.com/shoal-project/shoal/simulation"
	"github.com/shoal-project/shoal/trace"
)

// traceDir is where the simulator's committed workloads live.
const traceDir = "../simulation/testdata"

// TestBenchRecordTrace records the block-access trace of the rollout's
// workload — python3 starting from the Debian image of TestBenchRollout,
// cold, on one node, registry on loopback — and writes it with its image
// facts (index and manifest bytes, the source image's layer bytes) to
// bench/results/trace, or to simulation/testdata, where the simulator and
// its calibration read it, with make trace-fixture (see traceOut).
func TestBenchRecordTrace(t *testing.T) {
	needBench(t)
	needRoot(t)
	reg := testenv.StartRegistry(t)
	src := reg.Ref("bench/debian:v1")
	img := testenv.PushDebianImage(t, src)
	if _, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true),
		converter.WithLogger(slog.New(slog.DiscardHandler))); err != nil {
		t.Fatal(err)
	}
	state, remove := scratchDir(t, "bench-trace-")
	defer remove()
	n, err := node.Open(t.Context(), state, node.WithPlainHTTP(true), node.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	im, err := n.Resolve(t.Context(), src)
	if err != nil {
		t.Fatal(err)
	}
	_, digest, ok := strings.Cut(im.Ref, "@")
	if !ok {
		t.Fatalf("flat ref %q is not pinned", im.Ref)
	}
	rec := trace.NewRecorder(digest, im.Index, 0)
	rec.SetCommand(strings.Join(pythonCmd, " "))
	m, err := n.Mount(t.Context(), im, "", lazyfs.WithAccessObserver(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	upper, work := filepath.Join(m.RunDir, "upper"), filepath.Join(m.RunDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var env []string
	var wd string
	if cf := im.Config; cf != nil {
		env, wd = cf.Config.Env, cf.Config.WorkingDir
	}
	out := &okWriter{start: time.Now()}
	var errb syncBuffer
	if err := sandbox.Run(t.Context(), sandbox.Spec{Lower: m.Dir, Upper: upper, Work: work, Args: pythonCmd,
		Env: env, Dir: wd, Hostname: "shoal", Stdout: out, Stderr: &errb}); err != nil {
		t.Fatalf("run: %v\n%s", err, errb.String())
	}
	rec.Stop()
	tr := rec.Trace()
	if len(tr.Events) == 0 {
		t.Fatal("recorded no block")
	}

	// The image facts a replay needs beyond the trace: what a mount reads
	// before the first block (manifest and index), and what a standard
	// client's full pull reads (the source image's gzip layers).
	fr, err := name.ParseReference(im.Ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(fr)
	if err != nil {
		t.Fatal(err)
	}
	fm, err := remote.Image(fr)
	if err != nil {
		t.Fatal(err)
	}
	mf, err := fm.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var indexBytes int64
	for _, l := range mf.Layers {
		if l.MediaType == flat.MediaTypeIndex {
			indexBytes += l.Size
		}
	}
	sm, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var layerBytes int64
	for _, l := range sm.Layers {
		layerBytes += l.Size
	}
	size, stored := tr.Bytes()
	meta := map[string]any{
		"image":               digest,
		"description":         "testenv.DebianImage (Debian bookworm minbase + python3, 3 layers), converted with default options: the image of TestBenchRollout",
		"command":             pythonCmd,
		"manifest_bytes":      len(desc.Manifest) + int(mf.Config.Size),
		"index_bytes":         indexBytes,
		"source_layer_bytes":  layerBytes,
		"source_layers":       len(sm.Layers),
		"trace_blocks":        len(tr.Events),
		"trace_bytes":         size,
		"trace_stored_bytes":  stored,
		"image_blocks":        tr.Blocks,
		"image_bytes":         tr.ImageBytes,
		"image_stored_bytes":  tr.StoredBytes,
		"time_to_ok_s":        out.okAfter().Seconds(),
		"recorded_by":         "make trace-fixture (SHOAL_BENCH=1 SHOAL_TRACE_OUT=../simulation/testdata go test -count=1 -run '^TestBenchRecordTrace$' -v ./bench/, as root)",
		"recorded_on_machine": machine(),
		"commit":              commit(),
	}
	dir := traceOut(t)
	if err := trace.WriteFile(filepath.Join(dir, "python-debian.trace.json"), tr); err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "python-debian.image.json"), append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("trace: %d events, %d B (%d B stored) of %d blocks; ok after %v\n%s", len(tr.Events), size, stored, tr.Blocks,
		out.okAfter().Round(time.Millisecond), b)
}

// TestBenchCalibrate runs the real network-namespace rollout of
// TestBenchRollout, short (SHOAL_BENCH_NODES nodes, default 12; one round
// of Shoal, lazy + swarm), and the simulator with the same topology, caps
// and the committed trace of the same workload, and writes the comparison
// of p50 and p99 time to ready and registry egress to
// bench/results/calibration.json. It does not fail on a prediction outside
// the tolerance (a single real round on a shared machine moves by tens of
// percent): the JSON says so, and the simulation package's TestCalibration
// gates on the committed rollout.json.
func TestBenchCalibrate(t *testing.T) {
	needBench(t)
	needRoot(t)
	needNetlab(t)
	wl, err := simulation.LoadWorkload(filepath.Join(traceDir, "python-debian.trace.json"), filepath.Join(traceDir, "python-debian.image.json"))
	if err != nil {
		t.Fatal(err)
	}
	nodes := envInt("SHOAL_BENCH_NODES", 12)
	mbit := envInt("SHOAL_BENCH_REGISTRY_MBIT", 100)
	bin := buildShoal(t)
	lab := netlab.New(t)
	regHost := lab.AddHost("registry")
	regAddr := regHost.StartRegistry(t)
	tr := &http.Transport{DialContext: regHost.DialContext}
	src := regAddr + "/bench/debian:v1"
	img := testenv.DebianImage(t)
	r, _ := name.ParseReference(src, name.Insecure)
	if err := remote.Write(r, img, remote.WithTransport(tr)); err != nil {
		t.Fatal(err)
	}
	res, err := converter.Convert(t.Context(), src, "", converter.WithPlainHTTP(true), converter.WithTransport(tr),
		converter.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != wl.Trace.Image {
		t.Fatalf("the committed trace is of flat image %s, this run converted %s: record it again (TestBenchRecordTrace)", wl.Trace.Image, res.Digest)
	}
	if err := regHost.SetRate(mbit); err != nil {
		t.Fatal(err)
	}
	hosts := make([]*netlab.Host, nodes)
	for i := range hosts {
		hosts[i] = lab.AddHost(fmt.Sprintf("n%d", i))
	}
	tx0 := regHost.TxBytes()
	lazyRollout(t, bin, hosts[:1], src, false)
	unique := float64(regHost.TxBytes() - tx0)

	tx0 = regHost.TxBytes()
	ready, fromPeer, fromReg, uploads, _, _, _ := lazyRollout(t, bin, hosts, src, true)
	egress := float64(regHost.TxBytes() - tx0)
	real := &simulation.Rollout{Nodes: nodes, RegistryLinkMbit: float64(mbit), UniqueBytes: unique,
		Shoal: &simulation.Arm{P50ReadyS: quantile(ready, 0.5), P99ReadyS: quantile(ready, 0.99), RegistryEgressBytes: egress}}
	real.Machine.Cores = machine().Cores
	if m := mean(uploads); m > 0 {
		real.Shoal.BusiestUploadPerMean = slices.Max(uploads) / m
	}
	if fromPeer+fromReg > 0 {
		real.Shoal.PeerShare = fromPeer / (fromPeer + fromReg)
	}
	cal, err := simulation.Calibrate(wl, real)
	if err != nil {
		t.Fatal(err)
	}
	simCfg := simulation.CalibrationConfig(wl, real)
	simCfg.Strategy = simulation.Swarm
	simR, err := simulation.Run(simCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", cal)
	writeResult(t, "calibration", map[string]any{
		"runs":  1,
		"nodes": nodes, "registry_link_mbit": mbit,
		"real": map[string]any{
			"p50_ready_s": real.Shoal.P50ReadyS, "p99_ready_s": real.Shoal.P99ReadyS, "ready_s": ready,
			"registry_egress_bytes": egress, "unique_bytes": unique, "registry_egress_per_unique_bytes": egress / unique,
			"busiest_upload_per_mean": real.Shoal.BusiestUploadPerMean, "peer_share_of_block_bytes": real.Shoal.PeerShare,
		},
		"simulated":  simR,
		"comparison": cal,
		"trace":      wl.Trace.Image,
		"note":       "one real round of Shoal (lazy + swarm) in network namespaces on this machine, and the simulator with the same node count, registry cap, host cores and the committed trace of the same image and command",
		"reproduce":  fmt.Sprintf("make calibrate (SHOAL_BENCH=1 SHOAL_BENCH_NODES=%d go test -count=1 -run '^TestBenchCalibrate$' -v ./bench/, as root)", nodes),
	})
}
