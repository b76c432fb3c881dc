package simulation

import (
	"encoding/json"
	"fmt"
	"math"
)

// Tolerance is how far a prediction may be from the real run: ±25%.
const Tolerance = 0.25

// Rollout is what the real network-namespace rollout (bench
// TestBenchRollout, or bench TestBenchCalibrate) measured: its topology and,
// per arm, p50 and p99 time to ready and registry egress.
type Rollout struct {
	Nodes            int     `json:"nodes"`
	RegistryLinkMbit float64 `json:"registry_link_mbit"`
	UniqueBytes      float64 `json:"unique_bytes"`
	Commit           string  `json:"commit,omitempty"`
	Date             string  `json:"date,omitempty"`
	Machine          struct {
		Cores int `json:"cores"`
	} `json:"machine"`
	Shoal       *Arm `json:"shoal"`
	LazyNoPeers *Arm `json:"lazy_no_peers"`
	Baseline    *Arm `json:"baseline"`
}

// Arm is one strategy's measurements in a Rollout.
type Arm struct {
	P50ReadyS            float64   `json:"p50_ready_s"`
	P99ReadyS            float64   `json:"p99_ready_s"`
	RegistryEgressBytes  float64   `json:"registry_egress_bytes"`
	P50SamplesS          []float64 `json:"p50_samples_s,omitempty"`
	BusiestUploadPerMean float64   `json:"busiest_upload_per_mean,omitempty"`
	PeerShare            float64   `json:"peer_share_of_block_bytes,omitempty"`
}

// ParseRollout reads a rollout result (bench/results/rollout.json).
func ParseRollout(data []byte) (*Rollout, error) {
	var r Rollout
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("rollout result: %w", err)
	}
	if r.Nodes < 1 || r.RegistryLinkMbit <= 0 || r.Shoal == nil {
		return nil, fmt.Errorf("rollout result: want nodes, registry_link_mbit and a shoal arm")
	}
	return &r, nil
}

// Calibration compares the simulator with a real rollout.
type Calibration struct {
	Nodes        int          `json:"nodes"`
	RegistryMbit float64      `json:"registry_link_mbit"`
	HostCores    int          `json:"host_cores"`
	Zones        int          `json:"zones"`
	Tolerance    float64      `json:"tolerance"`
	Rows         []Comparison `json:"comparisons"`
	Within       bool         `json:"all_within_tolerance"`
	Params       Params       `json:"simulator_parameters"`
}

// Comparison is one metric of one strategy, real and simulated.
type Comparison struct {
	Strategy Strategy `json:"strategy"`
	Metric   string   `json:"metric"`
	Real     float64  `json:"real"`
	Sim      float64  `json:"simulated"`
	// Error is (simulated - real) ÷ real.
	Error  float64 `json:"error"`
	Within bool    `json:"within_tolerance"`
}

// CalibrationConfig is the simulator configuration of a real rollout's rig:
// its node count and registry cap, every node on one machine with the
// rig's cores (network namespaces share the host), the nodes labelled in
// two zones as the bench labels its daemons, and a LAN's delays.
func CalibrationConfig(wl *Workload, real *Rollout) Config {
	cores := real.Machine.Cores
	if cores < 1 {
		cores = 2
	}
	return Config{
		Workload: wl, Nodes: real.Nodes, Zones: 2, HostCores: cores,
		RegistryBytesPerSec: real.RegistryLinkMbit * 1e6 / 8,
		// veth pairs on one bridge, unshaped: the host's memory bandwidth
		// rather than a NIC; 10 Gbit/s stands for "not the bottleneck".
		NodeUpBytesPerSec: 10e9 / 8, NodeDownBytesPerSec: 10e9 / 8,
		RTTRack: 100e3, RTTZone: 100e3, RTTCross: 100e3, RTTRegistry: 200e3,
	}
}

// Calibrate runs the simulator with the rig of real and compares p50, p99
// and registry egress for every arm real measured.
func Calibrate(wl *Workload, real *Rollout) (*Calibration, error) {
	cfg := CalibrationConfig(wl, real)
	c := &Calibration{Nodes: cfg.Nodes, RegistryMbit: real.RegistryLinkMbit, HostCores: cfg.HostCores, Zones: cfg.Zones,
		Tolerance: Tolerance, Within: true, Params: ParamsOf(cfg)}
	arms := []struct {
		s   Strategy
		arm *Arm
	}{{Swarm, real.Shoal}, {LazyNoPeers, real.LazyNoPeers}, {FullPull, real.Baseline}}
	for _, a := range arms {
		if a.arm == nil {
			continue
		}
		cfg.Strategy = a.s
		r, err := Run(cfg)
		if err != nil {
			return nil, err
		}
		for _, m := range []struct {
			name      string
			real, sim float64
		}{
			{"p50_ready_s", a.arm.P50ReadyS, r.P50ReadyS},
			{"p99_ready_s", a.arm.P99ReadyS, r.P99ReadyS},
			{"registry_egress_bytes", a.arm.RegistryEgressBytes, float64(r.RegistryEgressBytes)},
		} {
			if m.real <= 0 {
				continue
			}
			e := (m.sim - m.real) / m.real
			row := Comparison{Strategy: a.s, Metric: m.name, Real: m.real, Sim: m.sim, Error: math.Round(e*1e4) / 1e4,
				Within: math.Abs(e) <= Tolerance}
			c.Within = c.Within && row.Within
			c.Rows = append(c.Rows, row)
		}
	}
	return c, nil
}

// String is the comparison as a table.
func (c *Calibration) String() string {
	s := fmt.Sprintf("calibration: %d nodes, registry %.0f Mbit/s, %d host cores (tolerance ±%.0f%%)\n",
		c.Nodes, c.RegistryMbit, c.HostCores, 100*c.Tolerance)
	s += fmt.Sprintf("%-15s %-22s %14s %14s %8s\n", "strategy", "metric", "real", "simulated", "error")
	for _, r := range c.Rows {
		mark := ""
		if !r.Within {
			mark = "  OUTSIDE"
		}
		s += fmt.Sprintf("%-15s %-22s %14.3f %14.3f %+7.1f%%%s\n", r.Strategy, r.Metric, r.Real, r.Sim, 100*r.Error, mark)
	}
	return s
}
