package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/shoal-project/shoal/internal/provenance"
	"github.com/shoal-project/shoal/p2p"
	"github.com/shoal-project/shoal/simulation"
)

func runSimulate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, level := newFlags("simulate", stderr)
	var (
		nodes      = fs.String("nodes", "1000", "node counts to simulate, comma-separated (e.g. 1000,10000)")
		zones      = fs.Int("zones", 1, "zones; nodes are labelled round-robin")
		racks      = fs.Int("racks", 1, "racks per zone")
		regMbps    = fs.Float64("registry-mbps", 100, "registry egress cap, Mbit/s")
		nodeMbps   = fs.Float64("node-mbps", 1000, "each node's network interface, Mbit/s each way")
		tracePath  = fs.String("trace", "", "block-access trace the nodes replay (shoal trace JSON)")
		factsPath  = fs.String("image-facts", "", "image facts beside the trace (manifest, index and source layer bytes); default: <trace without .trace.json>.image.json if it exists")
		strategies = fs.String("strategies", "full-pull,lazy-no-peers,lazy-swarm,lazy-swarm-seeded", "strategies to compare, comma-separated")
		seeds      = fs.Int("seeds", 4, "seeded nodes for lazy-swarm-seeded")
		seed       = fs.Uint64("seed", 1, "random seed; the same seed gives the same results")
		waves      = fs.Int("waves", 1, "start the nodes in this many waves")
		waveIv     = fs.Duration("wave-interval", 10*time.Second, "time between waves")
		hostCores  = fs.Int("host-cores", 0, "put every node on one machine with this many cores (0: each node has its own)")
		prefetch   = fs.Int("prefetch", 0, "blocks of the fill order each node prefetches after mounting (-1: the whole image)")
		spreadN    = fs.Int("spread-copies", 0, "copies of a block a node sends before answering COMING (0: the daemon's default; -1: no limit)")
		spreadWait = fs.Duration("spread-wait", 0, "wait for another holder before asking again with FORCE (0: the daemon's default)")
		share      = fs.Float64("upload-share", 0, "cap each node's uploads of the image at this many times what it holds (0: the daemon's default, off; negative: off)")
		perPeer    = fs.Int("upload-streams-per-peer", 0, "upload slots one peer may hold at a node (0: the daemon's default, half of them)")
		randomDHT  = fs.Bool("dht-random-providers", false, "what-if: a DHT lookup returns random providers instead of the earliest")
		gone       = fs.Int("gone", 0, "members of the image's origin group that are gone: their records are in the DHT from before the rollout, they answer nothing (swarm strategies; at most 8)")
		goneDial   = fs.Duration("gone-dial", 0, "how long a dial to a gone node takes to fail (0: one round trip, a reset; longer: a silent address, bounded by the caller's timeout)")
		desGone    = fs.Bool("designate-gone", false, "what-if: keep designating group members found unreachable, their blocks going to the registry per node (the daemon before it left them out)")
		left       = fs.Int("left", 0, "members of the image's origin group that are up but left the image (restarted daemons): their records are in the DHT from before the rollout, they answer NOT_MEMBER (swarm strategies; gone + left at most 8)")
		noHedge    = fs.Bool("no-designated-hedge", false, "what-if: wait for a dial to a designated fetcher until it fails (at most 1 s), instead of taking it for gone after 200 ms, and JoinImage for all its dials (at most 2 s), not half of them after 200 ms (the daemon before p2p.DesignatedHedge)")
		liars      = fs.Int("liars", 0, "byzantine members of the image's origin group (IDs ground into it) that answer every ORIGIN request COMING and send nothing (swarm strategies; gone + left + liars at most 8)")
		graceOff   = fs.Bool("coming-grace-off", false, "what-if: a reader waits for a block its designated fetcher answered COMING for until OriginWait, then reads it from the registry itself (the daemon before p2p.ComingGrace)")
		notMember  = fs.Bool("not-member-off", false, "what-if: left members answer NOT_FOUND and stay designated, their blocks going to the registry per node (the daemon before NOT_MEMBER)")
		out        = fs.String("out", "", "directory for <name>.json and the SVG plots (default: JSON on stdout only)")
		name       = fs.String("name", "rollout", "file name prefix of the results in --out")
	)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: shoal simulate [flags] --trace FILE\n\nSimulates a rollout of one image to many nodes (discrete events, simulated\ntime), driving the swarm's own peer-choice, origin and upload policies, and\ncompares strategies: full pull, lazy without peers, lazy with the swarm, and\nwith seeded nodes. Writes JSON (and SVG plots with --out).\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	if *tracePath == "" {
		return fmt.Errorf("%w: --trace is required", errUsage)
	}
	log, err := logger(*level, stderr)
	if err != nil {
		return err
	}
	var counts []int
	for _, s := range strings.Split(*nodes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return fmt.Errorf("%w: --nodes %q: want positive integers", errUsage, *nodes)
		}
		counts = append(counts, n)
	}
	var strats []simulation.Strategy
	for _, s := range strings.Split(*strategies, ",") {
		st, err := simulation.ParseStrategy(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("%w: --strategies: %v", errUsage, err)
		}
		strats = append(strats, st)
	}
	facts := *factsPath
	if facts == "" {
		guess := strings.TrimSuffix(*tracePath, ".trace.json") + ".image.json"
		if _, err := os.Stat(guess); err == nil && guess != *tracePath {
			facts = guess
		}
	}
	wl, err := simulation.LoadWorkload(*tracePath, facts)
	if err != nil {
		return err
	}
	sw := simulation.Sweep{
		Base: simulation.Config{
			Workload: wl, Zones: *zones, RacksPerZone: *racks, Seeds: *seeds, Seed: *seed,
			RegistryBytesPerSec: *regMbps * 1e6 / 8, NodeUpBytesPerSec: *nodeMbps * 1e6 / 8, NodeDownBytesPerSec: *nodeMbps * 1e6 / 8,
			Waves: *waves, WaveInterval: *waveIv, HostCores: *hostCores, Prefetch: *prefetch, DHTRandomProviders: *randomDHT,
			Gone: *gone, GoneDial: *goneDial, DesignateGone: *desGone, Left: *left, NotMemberOff: *notMember, NoDesignatedHedge: *noHedge,
			Liars: *liars, ComingGraceOff: *graceOff,
			Limit: 72 * time.Hour,
			Swarm: p2p.Config{SpreadCopies: *spreadN, SpreadWait: *spreadWait, UploadShare: *share, UploadStreamsPerPeer: *perPeer},
		},
		Nodes: counts, Strategies: strats,
		Progress: func(r *simulation.Result, wall time.Duration) {
			log.Info("simulated", "strategy", r.Strategy, "nodes", r.Nodes, "wall", wall.Round(time.Millisecond),
				"p50_s", r.P50ReadyS, "p99_s", r.P99ReadyS, "egress_per_unique", r.EgressPerUnique, "busiest_per_mean", r.BusiestPerMean)
		},
	}
	start := time.Now()
	rep, err := sw.Run(ctx)
	if err != nil {
		return err
	}
	rep.Trace = filepath.Base(*tracePath) + ": " + rep.Trace
	st := provenance.New(provenance.Current(ctx), provenance.Command(append([]string{"shoal", "simulate"}, args...)))
	rep.Stamp = &st
	fmt.Fprintf(stderr, "simulated %d runs in %v\n", len(rep.Results), time.Since(start).Round(time.Millisecond))
	if *out != "" {
		paths, err := rep.Write(*out, *name)
		if err != nil {
			return err
		}
		for _, p := range paths {
			fmt.Fprintln(stderr, "wrote", p)
		}
		return nil
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}
