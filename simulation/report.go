package simulation

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/shoal-project/shoal/internal/provenance"
)

// Sweep is a set of runs: every strategy at every node count, one base
// configuration.
type Sweep struct {
	Base       Config
	Nodes      []int
	Strategies []Strategy
	// Progress, if set, is called after each run with its wall time
	// (which is not part of the results: it depends on the machine).
	Progress func(r *Result, wall time.Duration)
}

// Report is what a sweep writes: the parameters and every result, and
// where they came from.
type Report struct {
	// Stamp is the provenance (commit, date, machine, reproducing command).
	// Sweep.Run leaves it nil, so that a report is a function of its
	// configuration alone; the command that writes the report sets it.
	*provenance.Stamp
	Trace      string    `json:"trace"`
	Image      string    `json:"image"`
	Parameters Params    `json:"parameters"`
	Results    []*Result `json:"results"`
	Goals      string    `json:"goals"`
	Note       string    `json:"note,omitempty"`
}

// Params are the configuration a report was run with, in units people
// read.
type Params struct {
	Zones               int     `json:"zones"`
	RacksPerZone        int     `json:"racks_per_zone"`
	Seeds               int     `json:"seeds"`
	Seed                uint64  `json:"seed"`
	RegistryMbps        float64 `json:"registry_mbps"`
	NodeMbps            float64 `json:"node_mbps"`
	RTTRackMS           float64 `json:"rtt_rack_ms"`
	RTTZoneMS           float64 `json:"rtt_zone_ms"`
	RTTCrossMS          float64 `json:"rtt_cross_zone_ms"`
	RTTRegistryMS       float64 `json:"rtt_registry_ms"`
	Waves               int     `json:"waves"`
	WaveIntervalS       float64 `json:"wave_interval_s"`
	HostCores           int     `json:"host_cores,omitempty"`
	NodeCores           int     `json:"node_cores"`
	BlockCPUMSPerMiB    float64 `json:"block_cpu_ms_per_mib"`
	ServeCPUMSPerMiB    float64 `json:"serve_cpu_ms_per_mib"`
	UnpackCPUMSPerMiB   float64 `json:"unpack_cpu_ms_per_mib"`
	Prefetch            int     `json:"prefetch_blocks"`
	DHTRandomProviders  bool    `json:"dht_random_providers,omitempty"`
	DesignateGone       bool    `json:"designate_gone,omitempty"`
	NotMemberOff        bool    `json:"not_member_off,omitempty"`
	NoDesignatedHedge   bool    `json:"no_designated_hedge,omitempty"`
	MaxUploadStreams    int     `json:"max_upload_streams"`
	UploadStreamsPeer   int     `json:"upload_streams_per_peer"`
	SpreadCopies        int     `json:"spread_copies"`
	SpreadWaitMS        float64 `json:"spread_wait_ms"`
	UploadShare         float64 `json:"upload_share,omitempty"` // 0: no cap (p2p.OverShare)
	MaxImagePeers       int     `json:"max_image_peers"`
	OriginWaitS         float64 `json:"origin_wait_s"`
	AnnounceIntervalMS  float64 `json:"announce_interval_ms"`
	UploadBytesPerSec   int64   `json:"upload_bytes_per_sec,omitempty"`
	ManifestBytes       int64   `json:"manifest_bytes"`
	IndexBytes          int64   `json:"index_bytes"`
	SourceLayerBytes    int64   `json:"source_layer_bytes"`
	TraceBlocks         int     `json:"trace_blocks"`
	TraceStoredBytes    int64   `json:"trace_stored_bytes"`
	ImageStoredBytes    int64   `json:"image_stored_bytes"`
	ApplicationOwnTimeS float64 `json:"application_own_time_s"`
}

// ParamsOf describes cfg (with defaults applied).
func ParamsOf(cfg Config) Params {
	c := cfg.Defaults()
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	p := Params{
		Zones: c.Zones, RacksPerZone: c.RacksPerZone, Seeds: c.Seeds, Seed: c.Seed,
		RegistryMbps: c.RegistryBytesPerSec * 8 / 1e6, NodeMbps: c.NodeUpBytesPerSec * 8 / 1e6,
		RTTRackMS: ms(c.RTTRack), RTTZoneMS: ms(c.RTTZone), RTTCrossMS: ms(c.RTTCross), RTTRegistryMS: ms(c.RTTRegistry),
		Waves: c.Waves, WaveIntervalS: c.WaveInterval.Seconds(), HostCores: c.HostCores, NodeCores: c.NodeCores,
		BlockCPUMSPerMiB:   ms(c.BlockCPU) * float64(1<<20) / float64(c.BlockCPUBytes),
		ServeCPUMSPerMiB:   ms(c.ServeCPU) * float64(1<<20) / float64(c.BlockCPUBytes),
		UnpackCPUMSPerMiB:  ms(c.UnpackCPU),
		Prefetch:           c.Prefetch,
		DHTRandomProviders: c.DHTRandomProviders,
		DesignateGone:      c.DesignateGone,
		NotMemberOff:       c.NotMemberOff,
		NoDesignatedHedge:  c.NoDesignatedHedge,
		MaxUploadStreams:   c.Swarm.MaxUploadStreams, MaxImagePeers: c.Swarm.MaxImagePeers,
		UploadStreamsPeer: c.Swarm.UploadStreamsPerPeer,
		SpreadCopies:      c.Swarm.SpreadCopies, SpreadWaitMS: ms(c.Swarm.SpreadWait),
		OriginWaitS: c.Swarm.OriginWait.Seconds(), AnnounceIntervalMS: ms(c.Swarm.AnnounceInterval),
		UploadBytesPerSec: c.Swarm.UploadBytesPerSec,
	}
	if c.Swarm.UploadShare > 0 {
		p.UploadShare = c.Swarm.UploadShare
	}
	if w := c.Workload; w != nil && w.Trace != nil {
		im := newImage(w)
		p.ManifestBytes, p.IndexBytes, p.SourceLayerBytes = w.ManifestBytes, w.IndexBytes, w.SourceLayerBytes
		p.TraceBlocks, p.TraceStoredBytes, p.ImageStoredBytes = len(w.Trace.Events), im.traceStored, w.Trace.StoredBytes
		var own time.Duration
		for _, r := range im.reads {
			own += r.think
		}
		p.ApplicationOwnTimeS = round6(own.Seconds())
	}
	return p
}

// Run runs the sweep, strategies inside node counts.
func (s Sweep) Run(ctx context.Context) (*Report, error) {
	rep := &Report{
		Parameters: ParamsOf(s.Base),
		Goals:      "registry egress ÷ unique ≤ 1.2 independent of N; p99 time to ready grows at most logarithmically with N; busiest peer upload ≤ 4× the mean",
	}
	if w := s.Base.Workload; w != nil && w.Trace != nil {
		rep.Image, rep.Trace = w.Trace.Image, w.Trace.Command
	}
	for _, n := range s.Nodes {
		for _, st := range s.Strategies {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			cfg := s.Base
			cfg.Nodes, cfg.Strategy = n, st
			if st != SwarmSeeded {
				cfg.Seeds = 0
			} else if cfg.Seeds == 0 {
				cfg.Seeds = 1
			}
			start := time.Now()
			r, err := Run(cfg)
			if err != nil {
				return nil, err
			}
			if s.Progress != nil {
				s.Progress(r, time.Since(start))
			}
			rep.Results = append(rep.Results, r)
		}
	}
	return rep, nil
}

// Write writes the report to dir as name.json and its plots as
// name-egress.svg, name-ready-<N>.svg (one per node count) and
// name-upload.svg, and returns the paths written.
func (rep *Report) Write(dir, name string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("results: %w", err)
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{name + ".json": append(b, '\n')}
	files[name+"-egress.svg"] = rep.egressPlot()
	files[name+"-upload.svg"] = rep.uploadPlot()
	for _, n := range rep.nodeCounts() {
		files[fmt.Sprintf("%s-ready-%d.svg", name, n)] = rep.readyPlot(n)
	}
	var paths []string
	for _, f := range sortedKeys(files) {
		p := filepath.Join(dir, f)
		if err := os.WriteFile(p, files[f], 0o644); err != nil {
			return paths, fmt.Errorf("results: %w", err)
		}
		paths = append(paths, p)
	}
	return paths, nil
}

func (rep *Report) nodeCounts() []int {
	var out []int
	for _, r := range rep.Results {
		if len(out) == 0 || out[len(out)-1] != r.Nodes {
			out = append(out, r.Nodes)
		}
	}
	return out
}
