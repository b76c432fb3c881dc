// Package simulation is a discrete-event simulator of an image rollout: N
// nodes in zones and racks start the same image at once (or in waves), each
// replaying a block-access trace that the daemon recorded (package trace),
// and the run reports time to ready, registry egress and peer uploads for
// four strategies — full pull, lazy without peers, lazy with the swarm, and
// the swarm with seeded nodes. `shoal simulate` and `make simulate` run it;
// docs/simulation.md describes the model and its calibration.
//
// # The same code as the daemon
//
// The decisions that matter are not re-implemented here; the simulator
// calls package p2p for them, with simulated time (a p2p.Clock) and
// simulated transfers:
//
//   - peer choice: p2p.ChoosePeers and p2p.Assign over the holders each
//     node sees in its peers' have bitmaps, with the node's own
//     p2p.PeerScores (latency EWMA, load, rests after BUSY or failures);
//   - origin coalescing: p2p.OriginGroup (the image's origin group, from
//     the lookup's providers and the node's sessions), p2p.PlanOrigin and
//     p2p.Designate for the blocks nobody holds and for the manifest and
//     the index; p2p.OriginSpread (COMING after as many ORIGIN copies as
//     upload slots); p2p.FirstCopies (which askers of a fetch get those
//     copies);
//   - spreading: p2p.Spread (a holder answers a block COMING once it has
//     sent it SpreadCopies times, naming up to p2p.MaxHints of the peers
//     its copies reached, which the reader counts as holders, up to
//     p2p.HintLimit per block, and asks after 3 extra round trips to
//     connect if it never met them) and p2p.ForceSpread (when a reader
//     asks such holders again with FORCE);
//   - request batching: p2p.Batches; rounds and parallelism: p2p.MaxRounds,
//     p2p.ParallelPeers; hedging: p2p.HedgeDelay;
//   - upload limits: p2p.UploadSlots (BUSY when no slot is free, or the
//     asker holds its share of them) and
//     p2p.OverShare (BUSY past a node's share of the image's uploads);
//   - discovery: p2p.SampleProviders;
//   - every default (upload slots, upload share, spread copies and wait,
//     announce interval, origin
//     wait, busy back-off, origin fetch slots, image peers, discovery
//     pool): p2p.Defaults;
//   - prefetch order: seeder.Order.
//
// What glues them — the rounds of PeerSource.FetchMany, the ORIGIN
// request's wait for its designated fetcher, the await for holders, the
// chain's fall-through to the registry, ImageBlob's early provide, lookup
// and passes, JoinImage's sessions — is replayed as events, following p2p's
// code path by path (see swarm.go and node.go); it cannot call that code
// because the daemon runs it on goroutines over libp2p streams.
//
// # Design choices
//
//   - One goroutine, one event queue (container/heap), ties broken by the
//     order events were scheduled; every random draw comes from a
//     math/rand/v2 PCG seeded with Config.Seed and the node's number; no map
//     iteration order decides anything. The same Config gives the same
//     Result, byte for byte.
//   - Links are shared, not queued packet by packet. The registry's link
//     and every CPU are processor-sharing servers kept on one virtual
//     clock, so 10,000 nodes pulling at once cost O(log n) per transfer
//     start or end. A peer transfer runs at the smaller of its equal shares
//     of the sender's up link and the receiver's down link, recomputed for
//     the transfers of those two links when one starts or ends.
//   - Announcements are mostly not events: a block a node acquires becomes
//     visible to its session peers at the node's next announce tick plus
//     the one-way delay, and a planner asks "who holds b now" by scanning
//     the node's sessions. Only session peers that are awaiting a block at
//     the tick get an event (a wake-up, as the daemon's have handler wakes
//     PeerSource.await). That keeps 10,000 nodes × 43 sessions × every
//     update out of the event queue.
//   - CPU is modelled because it dominates small rigs: a node's CPU (its
//     own cores, or one host's cores shared by every node in the
//     calibration rig) runs the application's own time between reads, the
//     per-byte cost of taking in a block (measured from the trace's own
//     waits, see TraceBlockCPU) and of serving one (DefaultServeCPU).
package simulation
