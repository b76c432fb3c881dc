package simulation

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/shoal-project/shoal/p2p"
	"github.com/shoal-project/shoal/trace"
)

// Strategy is how the nodes of a rollout get the image.
type Strategy string

// The strategies a run compares.
const (
	// FullPull: every node pulls the source image's layers from the
	// registry and unpacks them, then starts (what a standard client does).
	FullPull Strategy = "full-pull"
	// LazyNoPeers: Shoal without the swarm: blocks on demand, from the
	// registry only.
	LazyNoPeers Strategy = "lazy-no-peers"
	// Swarm: Shoal: blocks on demand, from peers first (have bitmaps,
	// peer choice, origin coalescing), the registry last.
	Swarm Strategy = "lazy-swarm"
	// SwarmSeeded: Swarm, plus Config.Seeds nodes that hold the whole
	// image before the rollout starts (filled by `shoal prefetch`).
	SwarmSeeded Strategy = "lazy-swarm-seeded"
)

// Strategies lists every strategy, in the order results show them.
var Strategies = []Strategy{FullPull, LazyNoPeers, Swarm, SwarmSeeded}

// ParseStrategy returns the strategy named s.
func ParseStrategy(s string) (Strategy, error) {
	for _, x := range Strategies {
		if string(x) == s {
			return x, nil
		}
	}
	return "", fmt.Errorf("unknown strategy %q (want one of %v)", s, Strategies)
}

// Workload is what every node runs: the start-up trace of one image and the
// image facts a replay needs beyond it.
type Workload struct {
	Trace *trace.Trace
	// ManifestBytes and IndexBytes are what a lazy mount reads from the
	// registry before its first block: the flat manifest (and config) and
	// the index blob.
	ManifestBytes int64 `json:"manifest_bytes"`
	IndexBytes    int64 `json:"index_bytes"`
	// SourceLayerBytes is what a full pull reads: the source image's
	// compressed (gzip) layers.
	SourceLayerBytes int64 `json:"source_layer_bytes"`
}

// imageFacts is the sidecar file beside a committed trace.
type imageFacts struct {
	Image            string `json:"image"`
	ManifestBytes    int64  `json:"manifest_bytes"`
	IndexBytes       int64  `json:"index_bytes"`
	SourceLayerBytes int64  `json:"source_layer_bytes"`
}

// LoadWorkload reads a trace and, if factsPath is not "", its image facts
// (JSON with manifest_bytes, index_bytes, source_layer_bytes, as
// bench.TestBenchRecordTrace writes them). Without facts, the manifest and
// index are taken as free and a full pull as reading the stored blocks.
func LoadWorkload(tracePath, factsPath string) (*Workload, error) {
	tr, err := trace.ReadFile(tracePath)
	if err != nil {
		return nil, err
	}
	w := &Workload{Trace: tr, SourceLayerBytes: tr.StoredBytes}
	if factsPath == "" {
		return w, nil
	}
	b, err := os.ReadFile(factsPath)
	if err != nil {
		return nil, fmt.Errorf("image facts: %w", err)
	}
	var f imageFacts
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("image facts %s: %w", factsPath, err)
	}
	if f.Image != "" && f.Image != tr.Image {
		return nil, fmt.Errorf("image facts %s are for %s, the trace for %s", factsPath, f.Image, tr.Image)
	}
	w.ManifestBytes, w.IndexBytes, w.SourceLayerBytes = f.ManifestBytes, f.IndexBytes, f.SourceLayerBytes
	return w, nil
}

// Config describes one simulated rollout. Zero values take the defaults
// Defaults documents.
type Config struct {
	Strategy Strategy
	Workload *Workload
	// Nodes start the image; Seeds (SwarmSeeded only) are extra nodes that
	// hold every block before the start and run nothing.
	Nodes, Seeds int
	// Gone (swarm strategies only; the others ignore it) are members of the image's origin group
	// that are gone: nodes that provided the image before the rollout (a
	// day ago, say) and have since been drained or preempted, their
	// records still in the DHT (they live 48 h). They rank first in the
	// group, so each is the designated fetcher of about one block in
	// OriginGroupSize; a dial to one fails after GoneDial.
	Gone int
	// GoneDial is how long a dial to a gone node takes to fail: 0 is one
	// round trip (its host answers with a reset); a silent address fails
	// at the caller's bound (p2p's FirstByteTimeout for a block request, 5
	// s for a connect) when GoneDial is longer.
	GoneDial time.Duration
	// Left (swarm strategies only) are members of the image's origin
	// group that are up but not in the image's swarm: daemons restarted
	// on the same identity (kept in their state dir) that do not run the
	// image again, their records still in the DHT. They rank first in the
	// group after the gone ones. They accept connections, turn have
	// sessions away, hold none of the image (the worst case: their cache
	// evicted it), and answer every request for it NOT_MEMBER: the asker
	// leaves them out of the image's designation for p2p.NotMemberRest and
	// plans their blocks again for the next member, as for a gone one.
	Left int
	// Liars (swarm strategies only) are byzantine members of the image's
	// origin group: peers that ground their IDs into the group (they rank
	// first after the gone and left ones) and answer every ORIGIN request
	// COMING — the blocks are out, they say — without sending any. They
	// turn have sessions away and hold nothing. Readers that see such a
	// block nowhere within p2p.ComingGrace take the liar for unreachable.
	Liars int
	// Zones and RacksPerZone label the nodes round-robin (zone i%Zones).
	Zones, RacksPerZone int
	// Seed makes a run reproducible: the same Config gives the same Result.
	Seed uint64

	// RegistryBytesPerSec caps the registry's egress (its link).
	RegistryBytesPerSec float64
	// NodeUpBytesPerSec and NodeDownBytesPerSec are each node's network
	// interface, shared by its peer transfers.
	NodeUpBytesPerSec, NodeDownBytesPerSec float64
	// Round-trip times between two nodes in the same rack, the same zone,
	// different zones, and between a node and the registry.
	RTTRack, RTTZone, RTTCross, RTTRegistry time.Duration
	// RegistryRequestTime is the registry's own time per request (before
	// the first byte).
	RegistryRequestTime time.Duration

	// Waves split the nodes into groups started WaveInterval apart (1: all
	// at once).
	Waves        int
	WaveInterval time.Duration

	// HostCores > 0 puts every node on one machine with that many cores
	// (the calibration rig: network namespaces on one host); otherwise each
	// node has NodeCores of its own.
	HostCores, NodeCores int
	// BlockCPU is the CPU time a node spends per uncompressed byte of a
	// block it fetches (receive, decompress, verify, store, hand to FUSE).
	BlockCPU time.Duration
	// ServeCPU is the CPU time a node spends per uncompressed byte it
	// uploads to a peer (the block store's verifying get, the noise
	// channel's encryption), per BlockCPUBytes.
	ServeCPU time.Duration
	// BlockCPUBytes is the byte count BlockCPU and ServeCPU are per (1 MiB
	// by default).
	BlockCPUBytes int64
	// UnpackCPU is the CPU time per MiB of uncompressed image a full pull
	// spends gunzipping and writing files.
	UnpackCPU time.Duration
	// StartOverhead is the time from a node's start to its first request
	// to the registry (CLI, daemon API); it counts in time to ready.
	StartOverhead time.Duration

	// Prefetch is how many blocks of seeder.Order a node fills in the
	// background after its mount: 0 none (the daemon of the calibration
	// run), -1 the whole image.
	Prefetch int
	// PrefetchWindow bounds the prefetch fetches in flight per node.
	PrefetchWindow int

	// DHTHops is the round trips a provide or a lookup takes; 0: 1 +
	// ceil(log16(nodes)).
	DHTHops int
	// DHTRandomProviders is a what-if, not the daemon: a lookup returns a
	// random sample of the providers instead of the earliest ones (see
	// sampleProviders).
	DHTRandomProviders bool
	// DesignateGone is a what-if, not the daemon: the daemon before it
	// left unreachable members out of the designation (p2p.LiveGroup).
	// A designated fetcher found gone is not asked, and its blocks go to
	// the registry, per node.
	DesignateGone bool
	// NotMemberOff is a what-if, not the daemon: the daemon before
	// NOT_MEMBER. A left member answers NOT_FOUND and stays designated; the
	// blocks it is designated for go to the registry, per node, and a
	// node waits OriginWait for a blob it is designated for.
	NotMemberOff bool
	// ComingGraceOff is a what-if, not the daemon: the daemon before
	// p2p.ComingGrace. A reader waits for a block its designated fetcher
	// answered COMING for until OriginWait, then reads it from the
	// registry itself.
	ComingGraceOff bool
	// NoDesignatedHedge is a what-if, not the daemon: the daemon before
	// p2p.DesignatedHedge. A node waits for its dial to a designated
	// fetcher at a silent address (GoneDial) until the dial fails, at most
	// p2p.DesignatedDial, before it plans the member's blocks for the next
	// member, and JoinImage waits for all its dials, at most
	// FirstByteTimeout. DesignateGone implies it.
	NoDesignatedHedge bool

	// Swarm is the p2p configuration every node runs; zero fields take the
	// daemon's defaults (p2p.Defaults).
	Swarm p2p.Config

	// Limit stops the simulation at this simulated time (0: 1 hour).
	Limit time.Duration
}

// Defaults returns c with every zero field set to its default:
//
//   - 1 zone, 1 rack per zone; seed 1; one wave.
//   - registry 100 Mbit/s; node interfaces 1 Gbit/s each way;
//     RTT 0.2 ms in a rack, 0.5 ms in a zone, 2 ms across zones, 1 ms to
//     the registry; 1 ms registry time per request.
//   - Each node 2 cores of its own; BlockCPU measured from the trace
//     (see TraceBlockCPU); ServeCPU DefaultServeCPU; UnpackCPU 28 ms/MiB (bench/results/
//     coldstart-python.json: 14.4 s pull+unpack of 508 MB on loopback);
//     StartOverhead 30 ms.
//   - Swarm: p2p.Defaults().
func (c Config) Defaults() Config {
	setI := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	setD := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	setF := func(p *float64, v float64) {
		if *p == 0 {
			*p = v
		}
	}
	setI(&c.Zones, 1)
	setI(&c.RacksPerZone, 1)
	if c.Seed == 0 {
		c.Seed = 1
	}
	setI(&c.Waves, 1)
	setF(&c.RegistryBytesPerSec, 100e6/8)
	setF(&c.NodeUpBytesPerSec, 1e9/8)
	setF(&c.NodeDownBytesPerSec, 1e9/8)
	setD(&c.RTTRack, 200*time.Microsecond)
	setD(&c.RTTZone, 500*time.Microsecond)
	setD(&c.RTTCross, 2*time.Millisecond)
	setD(&c.RTTRegistry, time.Millisecond)
	setD(&c.RegistryRequestTime, time.Millisecond)
	setI(&c.NodeCores, 2)
	if c.BlockCPUBytes == 0 {
		c.BlockCPUBytes = 1 << 20
	}
	if c.BlockCPU == 0 && c.Workload != nil {
		c.BlockCPU = TraceBlockCPU(c.Workload.Trace, c.BlockCPUBytes)
	}
	setD(&c.ServeCPU, DefaultServeCPU)
	setD(&c.UnpackCPU, 28*time.Millisecond)
	setD(&c.StartOverhead, 30*time.Millisecond)
	setI(&c.PrefetchWindow, 4)
	if c.DHTHops == 0 {
		c.DHTHops = 1 + int(math.Ceil(math.Log(float64(max(c.Nodes+c.Seeds, 2)))/math.Log(16)))
	}
	d := p2p.Defaults()
	s := &c.Swarm
	setI(&s.MaxUploadStreams, d.MaxUploadStreams)
	s.UploadStreamsPerPeer = p2p.PerPeerSlots(s.MaxUploadStreams, s.UploadStreamsPerPeer)
	setD(&s.FirstByteTimeout, d.FirstByteTimeout)
	setD(&s.AnnounceInterval, d.AnnounceInterval)
	setI(&s.MaxImagePeers, d.MaxImagePeers)
	setI(&s.DiscoveryPool, d.DiscoveryPool)
	setD(&s.BusyBackoff, d.BusyBackoff)
	setI(&s.SpreadCopies, d.SpreadCopies)
	setD(&s.SpreadWait, d.SpreadWait)
	setD(&s.HedgeDelay, d.HedgeDelay)
	setD(&s.OriginWait, d.OriginWait)
	setI(&s.MaxOriginFetches, d.MaxOriginFetches)
	setD(&s.OriginFetchTimeout, d.OriginFetchTimeout)
	if s.UploadShare == 0 {
		s.UploadShare = d.UploadShare
	}
	setD(&c.Limit, time.Hour)
	return c
}

// DefaultServeCPU is the CPU a node spends per MiB it serves. Its
// per-byte crypto is measured by BenchmarkServeCPU: SHA-256 (the block
// store verifies every get) plus ChaCha20-Poly1305 (libp2p's Noise), about
// 1.1 ms/MiB on the 2-core machine here. The badger read, yamux and the
// system calls come on top and are not measured apart; 3.4 ms/MiB stands
// for all of it, and with it the simulator predicts the real 12-node
// rollout about 10% fast (docs/simulation.md, Calibration), so it is not
// an overestimate.
const DefaultServeCPU = 3400 * time.Microsecond

// blobGraceOff reports whether ImageBlob passes over a designated fetcher
// that delivered nothing by p2p.BlobGrace: not under ComingGraceOff, nor
// under the what-ifs of daemons that had no BlobGrace (DesignateGone,
// NotMemberOff, NoDesignatedHedge), so that each replays its daemon.
func (c Config) blobGraceOff() bool {
	return c.ComingGraceOff || c.DesignateGone || c.NotMemberOff || c.NoDesignatedHedge
}

// validate reports what cannot be simulated.
func (c Config) validate() error {
	var errs []error
	if c.Workload == nil || c.Workload.Trace == nil {
		errs = append(errs, errors.New("no workload trace"))
	} else if len(c.Workload.Trace.Events) == 0 {
		errs = append(errs, errors.New("the trace has no events"))
	}
	if _, err := ParseStrategy(string(c.Strategy)); err != nil {
		errs = append(errs, err)
	}
	if c.Nodes < 1 {
		errs = append(errs, fmt.Errorf("%d nodes: want at least 1", c.Nodes))
	}
	if c.Seeds < 0 || (c.Seeds > 0 && c.Strategy != SwarmSeeded) {
		errs = append(errs, fmt.Errorf("%d seeds: only %s has seeds", c.Seeds, SwarmSeeded))
	}
	if c.Gone < 0 || c.Left < 0 || c.Liars < 0 || c.Gone+c.Left+c.Liars > p2p.OriginGroupSize || c.GoneDial < 0 {
		errs = append(errs, fmt.Errorf("%d gone, %d left and %d lying nodes (dial %v): at most %d in all, and the dial not negative",
			c.Gone, c.Left, c.Liars, c.GoneDial, p2p.OriginGroupSize))
	}
	if c.Strategy == SwarmSeeded && c.Seeds < 1 {
		errs = append(errs, fmt.Errorf("%s needs at least one seed", SwarmSeeded))
	}
	if c.Zones < 1 || c.RacksPerZone < 1 || c.Waves < 1 || c.WaveInterval < 0 {
		errs = append(errs, errors.New("zones, racks per zone and waves must be at least 1, the wave interval not negative"))
	}
	if c.RegistryBytesPerSec <= 0 || c.NodeUpBytesPerSec <= 0 || c.NodeDownBytesPerSec <= 0 {
		errs = append(errs, errors.New("bandwidths must be positive"))
	}
	if c.HostCores < 0 || c.NodeCores < 1 {
		errs = append(errs, errors.New("cores: host cores not negative, node cores at least 1"))
	}
	if c.Prefetch < -1 || c.PrefetchWindow < 1 {
		errs = append(errs, errors.New("prefetch: -1, 0 or a block count; window at least 1"))
	}
	return errors.Join(errs...)
}

// TraceBlockCPU is the time per perBytes of block that the trace's own
// recording spent waiting: the sum of the waits of its reads divided by the
// uncompressed bytes they fetched. Recorded cold on one node with the
// registry on loopback, where the network costs almost nothing, it is the
// per-byte cost of everything else a fetch does (the registry serving, zstd,
// SHA-256, the block store, FUSE) on the recording machine.
func TraceBlockCPU(tr *trace.Trace, perBytes int64) time.Duration {
	if tr == nil {
		return 0
	}
	var wait time.Duration
	var bytes int64
	for _, r := range groupReads(tr) {
		wait += r.wait
	}
	for _, e := range tr.Events {
		bytes += int64(e.Size)
	}
	if bytes == 0 {
		return 0
	}
	return time.Duration(float64(wait) * float64(perBytes) / float64(bytes))
}
