package simulation

import (
	"fmt"
	"math"
	"slices"
)

// Result is what one simulated rollout measured. Every field follows from
// the Config alone: the same Config gives the same Result, byte for byte
// once encoded.
type Result struct {
	Strategy Strategy `json:"strategy"`
	Nodes    int      `json:"nodes"`
	Seeds    int      `json:"seeds,omitempty"`
	// Gone members of the origin group (Config.Gone), and how long a dial
	// to one took to fail (0: one round trip).
	Gone      int     `json:"gone,omitempty"`
	GoneDialS float64 `json:"gone_dial_s,omitempty"`
	// Members of the group that are up but left the image (Config.Left),
	// and whether NOT_MEMBER was off (the what-if Config.NotMemberOff).
	Left         int  `json:"left,omitempty"`
	NotMemberOff bool `json:"not_member_off,omitempty"`
	// Lying members of the group (Config.Liars), and whether ComingGrace
	// was off (the what-if Config.ComingGraceOff).
	Liars          int    `json:"liars,omitempty"`
	ComingGraceOff bool   `json:"coming_grace_off,omitempty"`
	Zones          int    `json:"zones"`
	Seed           uint64 `json:"seed"`

	// Time to ready: from a node's start to the end of its last traced
	// read (the bench's "ok" line), over the Nodes (not the seeds).
	P50ReadyS  float64 `json:"p50_ready_s"`
	P90ReadyS  float64 `json:"p90_ready_s"`
	P99ReadyS  float64 `json:"p99_ready_s"`
	MaxReadyS  float64 `json:"max_ready_s"`
	MeanReadyS float64 `json:"mean_ready_s"`
	// ReadyCDF is the time to ready at every percentile 0..100.
	ReadyCDF []float64 `json:"ready_cdf_s"`
	NotReady int       `json:"not_ready,omitempty"`

	// UniqueBytes is what one node starting alone reads from the registry:
	// manifest, index and the stored bytes of the traced blocks (for a full
	// pull too, so that the strategies share one denominator).
	UniqueBytes int64 `json:"unique_bytes"`
	// Registry egress during the rollout, by kind.
	RegistryEgressBytes int64   `json:"registry_egress_bytes"`
	RegistryMetaBytes   int64   `json:"registry_meta_bytes"`
	RegistryBlockBytes  int64   `json:"registry_block_bytes"`
	RegistryLayerBytes  int64   `json:"registry_layer_bytes,omitempty"`
	EgressPerUnique     float64 `json:"registry_egress_per_unique"`
	// BlockEgressPerUnique leaves the per-node manifest and index out:
	// registry block bytes ÷ the traced blocks' stored bytes.
	BlockEgressPerUnique float64 `json:"registry_block_egress_per_unique_blocks"`
	// SeedingBytes is what filling the seeds cost the registry before the
	// rollout (the whole image's stored bytes per seed); not in the egress.
	SeedingBytes     int64 `json:"seeding_bytes,omitempty"`
	RegistryRequests int64 `json:"registry_requests"`

	// Block bytes (uncompressed) nodes got from peers and from the registry.
	BytesFromPeers    int64   `json:"bytes_from_peers"`
	BytesFromRegistry int64   `json:"bytes_from_registry"`
	PeerShare         float64 `json:"peer_share_of_block_bytes"`
	// Uploads over every node that serves (nodes and seeds).
	UploadMeanBytes float64 `json:"upload_mean_bytes"`
	UploadMaxBytes  int64   `json:"upload_max_bytes"`
	BusiestPerMean  float64 `json:"busiest_upload_per_mean"`
	// BusiestNodePerMean leaves the seeds out of both.
	BusiestNodePerMean float64 `json:"busiest_node_upload_per_mean,omitempty"`

	PeerRequests       int64 `json:"peer_requests"`
	BusyAnswers        int64 `json:"busy_answers"`
	OriginAsks         int64 `json:"origin_asks"`
	OriginBusy         int64 `json:"origin_busy"`
	OriginTimeouts     int64 `json:"origin_timeouts"`
	OriginBlocks       int64 `json:"origin_blocks_served"`
	ManifestsFromPeers int   `json:"manifests_from_peers"`
	IndexesFromPeers   int   `json:"indexes_from_peers"`
	BlobRequests       int64 `json:"blob_requests"`
	ComingAnswers      int64 `json:"coming_answers"`
	AwaitRounds        int64 `json:"await_rounds"`
	// Blocks answered COMING because the holder had sent them to
	// SpreadCopies peers, and requests sent with FORCE after SpreadWait.
	SpreadAnswers  int64 `json:"spread_answers"`
	ForcedRequests int64 `json:"forced_requests"`
	// Peers COMING answers named as a block's recipients that the asker
	// kept as holders of it (p2p's hints).
	HintsReceived int64 `json:"hints_received"`
	// ORIGIN requests answered COMING because other askers of the same
	// fetch were picked for the first copies (p2p.FirstCopies).
	FirstCopyPassed int64 `json:"first_copy_passed"`
	// Blocks a node read from the registry as their designated fetcher
	// (for itself), and blocks the swarm did not deliver (of which
	// AwaitTimeouts were still awaited at OriginWait).
	DesignatedOwnBlocks int64   `json:"designated_own_blocks"`
	FellThroughBlocks   int64   `json:"fell_through_blocks"`
	AwaitTimeouts       int64   `json:"await_timeouts"`
	HedgesDue           int64   `json:"hedges_due"`
	DuplicateBytes      int64   `json:"duplicate_bytes"`
	DHTLookupsPerNode   float64 `json:"dht_lookups_per_node_start"`
	// Dials that failed because the peer was gone, and blocks whose
	// designated fetcher was found gone, planned again for the next
	// member of the group.
	UnreachableDials int64 `json:"unreachable_dials,omitempty"`
	// NOT_MEMBER answers the nodes received (Config.Left).
	NotMemberAnswers int64 `json:"not_member_answers,omitempty"`
	// Dials to designated fetchers given up on at p2p.DesignatedHedge.
	DesignatedSlow int64 `json:"designated_slow,omitempty"`
	// Designated fetchers taken for unreachable because blocks they
	// answered COMING for showed up nowhere within p2p.ComingGrace.
	ComingUndelivered int64   `json:"coming_undelivered,omitempty"`
	OriginReplanned   int64   `json:"origin_replanned,omitempty"`
	SessionsMean      float64 `json:"have_sessions_mean,omitempty"`

	SimulatedS float64 `json:"simulated_s"`
	Events     int64   `json:"events"`
}

// Run simulates one rollout.
func Run(cfg Config) (*Result, error) {
	w, err := simulate(cfg)
	if err != nil {
		return nil, err
	}
	return w.result(), nil
}

// simulate runs a rollout and returns its final state.
func simulate(cfg Config) (*world, error) {
	cfg = cfg.Defaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("simulation: %w", err)
	}
	if cfg.Strategy != Swarm && cfg.Strategy != SwarmSeeded {
		cfg.Gone, cfg.Left, cfg.Liars = 0, 0, 0 // nobody asks peers
	}
	w := newWorld(cfg)
	w.goneAll()
	if cfg.Strategy == SwarmSeeded {
		w.seedAll()
	}
	for _, n := range w.nodes {
		if !n.seed && !n.away() {
			w.start(n)
		}
	}
	w.e.run(cfg.Limit)
	return w, nil
}

func (w *world) result() *Result {
	cfg := w.cfg
	wl := cfg.Workload
	r := &Result{
		Strategy: cfg.Strategy, Nodes: cfg.Nodes, Seeds: cfg.Seeds, Zones: cfg.Zones, Seed: cfg.Seed,
		Gone: cfg.Gone, GoneDialS: cfg.GoneDial.Seconds(), Left: cfg.Left, NotMemberOff: cfg.NotMemberOff,
		Liars: cfg.Liars, ComingGraceOff: cfg.ComingGraceOff,
		UnreachableDials:    w.st.unreachable,
		NotMemberAnswers:    w.st.notMember,
		DesignatedSlow:      w.st.designatedSlow,
		ComingUndelivered:   w.st.comingUndelivered,
		OriginReplanned:     w.st.originReplanned,
		UniqueBytes:         wl.ManifestBytes + wl.IndexBytes + w.im.traceStored,
		RegistryMetaBytes:   int64(w.st.registryMetaBytes),
		RegistryBlockBytes:  int64(w.st.registryBlockBytes),
		RegistryLayerBytes:  int64(w.st.registryLayerBytes),
		RegistryRequests:    w.st.registryRequests,
		PeerRequests:        w.st.peerRequests,
		BusyAnswers:         w.st.busyAnswers,
		OriginAsks:          w.st.originAsks,
		OriginBusy:          w.st.originBusy,
		OriginTimeouts:      w.st.originTimeouts,
		OriginBlocks:        w.st.originBlocks,
		ManifestsFromPeers:  w.st.blobsFromPeers[blobManifest],
		IndexesFromPeers:    w.st.blobsFromPeers[blobIndex],
		BlobRequests:        w.st.blobRequests,
		ComingAnswers:       w.st.comingAnswers,
		AwaitRounds:         w.st.awaitRounds,
		SpreadAnswers:       w.st.spreadAnswers,
		ForcedRequests:      w.st.forcedRequests,
		HintsReceived:       w.st.hintsReceived,
		FirstCopyPassed:     w.st.firstCopyPassed,
		DesignatedOwnBlocks: w.st.designatedOwn,
		FellThroughBlocks:   w.st.fellThrough,
		AwaitTimeouts:       w.st.awaitTimeouts,
		HedgesDue:           w.st.hedgesDue,
		DuplicateBytes:      int64(w.st.duplicateBytes),
		SimulatedS:          w.e.now.Seconds(),
		Events:              w.e.events,
	}
	r.RegistryEgressBytes = r.RegistryMetaBytes + r.RegistryBlockBytes + r.RegistryLayerBytes
	r.EgressPerUnique = float64(r.RegistryEgressBytes) / float64(r.UniqueBytes)
	if w.im.traceStored > 0 {
		r.BlockEgressPerUnique = float64(r.RegistryBlockBytes) / float64(w.im.traceStored)
	}
	if cfg.Strategy == SwarmSeeded {
		r.SeedingBytes = int64(cfg.Seeds) * wl.Trace.StoredBytes
	}
	var ready []float64
	var fromPeers, fromReg, upSum, upNodes float64
	var upMax, upNodeMax float64
	var sessions int
	for _, n := range w.nodes {
		if n.away() {
			continue
		}
		fromPeers += n.fromPeers
		fromReg += n.fromRegistry
		upSum += n.uploaded
		upMax = max(upMax, n.uploaded)
		sessions += len(n.sessions)
		if n.seed {
			continue
		}
		upNodes += n.uploaded
		upNodeMax = max(upNodeMax, n.uploaded)
		if n.readyOK {
			ready = append(ready, n.ready.Seconds())
		} else {
			r.NotReady++
		}
	}
	r.BytesFromPeers, r.BytesFromRegistry = int64(fromPeers), int64(fromReg)
	if fromPeers+fromReg > 0 {
		r.PeerShare = fromPeers / (fromPeers + fromReg)
	}
	all := float64(len(w.nodes) - cfg.Gone - cfg.Left - cfg.Liars)
	r.UploadMeanBytes = upSum / all
	r.UploadMaxBytes = int64(upMax)
	if upSum > 0 {
		r.BusiestPerMean = upMax / (upSum / all)
	}
	if cfg.Seeds > 0 && upNodes > 0 {
		r.BusiestNodePerMean = upNodeMax / (upNodes / float64(cfg.Nodes))
	}
	if w.swarm {
		r.DHTLookupsPerNode = float64(w.st.dhtLookups) / float64(cfg.Nodes)
		r.SessionsMean = float64(sessions) / all
	}
	slices.Sort(ready)
	if len(ready) > 0 {
		r.P50ReadyS, r.P90ReadyS, r.P99ReadyS = Quantile(ready, 0.5), Quantile(ready, 0.9), Quantile(ready, 0.99)
		r.MaxReadyS = ready[len(ready)-1]
		var sum float64
		for _, x := range ready {
			sum += x
		}
		r.MeanReadyS = sum / float64(len(ready))
		r.ReadyCDF = make([]float64, 101)
		for p := range r.ReadyCDF {
			r.ReadyCDF[p] = round6(Quantile(ready, float64(p)/100))
		}
	}
	for _, f := range []*float64{&r.P50ReadyS, &r.P90ReadyS, &r.P99ReadyS, &r.MaxReadyS, &r.MeanReadyS, &r.SimulatedS} {
		*f = round6(*f)
	}
	return r
}

// Quantile is the q-quantile of sorted xs, by the bench's rule (nearest
// rank, rounded): the same definition the real rollout reports.
func Quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(q*float64(len(sorted)-1)+0.5)]
}

func round6(x float64) float64 { return math.Round(x*1e6) / 1e6 }
