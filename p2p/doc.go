// Package p2p is Shoal's swarm: how a node finds the other nodes that hold
// an image's blocks, learns which blocks each of them holds, and fetches
// blocks from them — verified, bounded in time, and never at the cost of a
// wrong byte. It is the "peers" step of a read, between the local block
// cache and the registry; the fetch chain sees it only as a fetch.Source
// (PeerSource), and whatever it cannot deliver quickly falls through to the
// registry.
//
//	store, _ := blockstore.Open(ctx, dir, blockstore.WithOnEvict(func(id flat.BlockID) { node.Withdraw(id) }))
//	node, _ := p2p.New(ctx, p2p.Config{IdentityDir: stateDir, BootstrapPeers: peers, Blocks: store, Zone: zone})
//	go node.Run(ctx)
//	reg, _ := fetch.NewChain(store, []fetch.Source{im.Registry()}) // the registry behind the cache
//	origin := node.ServeOrigin(im.Digest(), reg)                   // the node keeps the first per image
//	_ = node.JoinImage(ctx, im.Digest(), im.Index())
//	// asRegistry: origin as a fetch.Source named fetch.RegistryName
//	chain, _ := fetch.NewChain(store, []fetch.Source{node.Source(im.Digest()), asRegistry{origin}})
//	// after a block is fetched and stored: node.Announce(id)
//
// # Lifecycle
//
// New wires: it loads the identity (an ed25519 key created on first start,
// mode 0600), starts the libp2p host listening (TCP, noise, yamux; a
// pre-shared key makes it a libp2p private network), creates the DHT and
// registers the stream handlers, so the node serves peers as soon as New
// returns. Run joins the DHT through the bootstrap peers, sends batched
// have-updates, and refreshes, until its context ends; it closes the node
// on the way out. Close is idempotent and waits for every goroutine the node
// started.
//
// # Finding peers: image records and have bitmaps
//
// The DHT is go-libp2p-kad-dht in server mode under the protocol prefix
// /shoal (it speaks /shoal/kad/1.0.0 and never mixes with the public IPFS
// DHT). Provider records are keyed by ImageKey: the flat image's manifest
// digest as a CIDv1 (raw codec, sha2-256) — the CID of the manifest bytes.
// There are no per-block records. JoinImage costs one provide (in the
// background) and one FindProviders; the node then connects to up to
// MaxImagePeers providers, picked at random from the first DiscoveryPool
// (16,384) the lookup returns (kad-dht answers in record-arrival order, so
// taking the first MaxImagePeers would send every node of a big swarm to
// the same few peers, which turn most away at their session limit: the
// simulator measured 4 sessions per node at 1,000 nodes that way, 60 with
// sampling; a pool of 2,048 left 20 per node at 10,000 nodes, 43 with a
// pool that holds them all); it waits for those dials at most
// FirstByteTimeout (a provider at a silent address holds a dial for 5 s:
// the rest go on in the background), and the peers tell each other, over
// /shoal/have/1, which blocks of the image they hold: a bitmap over the
// image's block table, by position. A start therefore costs O(images) DHT
// operations, not O(blocks).
//
// Why not per-block records, measured in TestDHTConverges (30 nodes on
// loopback, no race detector): a provide is a DHT lookup plus an
// ADD_PROVIDER to the 20 closest peers, about 40 ms once routing tables
// have settled and over a second while they fill. A 2 GiB image of 256 KiB
// blocks has about 8,000 blocks: per-block records would be 8,000 provides
// per node per image (minutes of provide work, repeated every 12 hours to
// outlive the 48-hour record lifetime) and 160,000 stored records per node,
// 160 million for a thousand nodes; and a reader would need a lookup per
// block before its first byte. With image records it is one provide and one
// lookup per node per image; the image's bitmap is 1 KB, sent once per peer,
// and each newly held block costs a few bytes in a batched update.
//
// The cost of the choice: a node sees the blocks of the peers it has a have
// session with (up to MaxImagePeers it found, plus up to twice that many
// that found it), not of the whole swarm; and a block shared by two images
// is found through either image's peers only if the node joined that image
// (PeerSource looks across every joined image).
//
// # The have protocol (/shoal/have/1)
//
// Each direction is its own stream: a node opens one to each peer of the
// image and only writes on it; the peer only reads. All messages are
// length-prefixed frames (uvarint length, then the payload):
//
//	hello  = 0x01 str(image digest) str(zone) str(rack) uvarint(nblocks) bitmap
//	update = 0x02 positions(set) positions(clear)
//	str(s)       = uvarint(len) bytes
//	bitmap       = ceil(nblocks/8) bytes, bit i%8 of byte i/8 is block i; bits past nblocks are 0
//	positions(p) = uvarint(count) then count uvarint deltas (p[0], then p[i]-p[i-1]-1)
//
// The hello carries the sender's zone and rack labels, kept per peer for
// peer choice. A node that receives a hello for an image it has joined
// (with the same block count) keeps the bitmap, answers with its own
// session if it has none to the sender, and applies updates until the
// stream ends, when the peer's bitmap is dropped. A hello for an image not
// joined, or for a private image from a peer not verified for it, is
// answered with a stream reset. Announce (after a block is
// verified and stored) and Withdraw (on eviction, from the blockstore's
// OnEvict hook) change the node's own bitmap; the changed positions go out
// every AnnounceInterval (10 ms; a block spreads through a swarm from
// holder to holder, and each hop waits for the next flush) as one update,
// sent only when something changed, carrying each position's
// state at flush time. An idle session sends an empty update every 15 s; a
// peer silent for 45 s is dropped. A session whose queue (64 updates)
// overflows is closed, and the next one starts with a full hello. A
// NOT_FOUND answer clears the block from that peer's bitmap locally (its
// withdrawal is in flight). DHT records cannot be withdrawn: they expire,
// and LeaveImage stops re-providing.
//
// # The block protocol (/shoal/block/1)
//
// One request per stream; the client writes it and closes its side:
//
//	request = frame( str(image digest) uvarint(count) count × str(binary CID) [uvarint(flags)] )
//	flags   = bit 0 ORIGIN, bit 1 FORCE, bit 2 HINTS, bit 3 MEMBER; other bits are ignored
//
// with at most MaxRequestBlocks (256) CIDs and a 16 KiB frame. The flags
// field is optional and, when present, not zero: a request without flags
// is byte for byte what it was before flags existed, and every request has
// one encoding. (A server older than flags resets a request that has them;
// the asker then falls through to the registry at once.) The server
// answers with one frame per CID — first the blocks answered COMING, then
// the others in order — streamed:
//
//	answer = status(1 byte) str(binary CID) uvarint(len) len bytes
//	status = 0 OK (len = the block's uncompressed size, at most flat.MaxBlockSize)
//	         1 NOT_FOUND (len 0)
//	         2 BUSY (empty CID, len 0; the only frame, sent instead of any answer)
//	         3 COMING, with an empty CID: as BUSY, to ORIGIN requests only (the
//	           designated fetcher holds the blocks now but sends them no more,
//	           see Origin coalescing); with a CID: that block was sent to
//	           enough peers already, ask them (see Spreading). len is 0, or,
//	           if the request set HINTS, the length (at most 4 KiB) of
//	           hints = uvarint(k) k × ( str(peer ID) uvarint(m) m × str(binary multiaddr) )
//	           naming up to MaxHints (4) of the peers the block's copies
//	           reached, with up to 4 addresses each
//	         4 NOT_MEMBER (empty CID, len 0; the only frame), to requests that
//	           set MEMBER only: the server is not a member of the image's
//	           swarm (see Origin coalescing); NOT_FOUND for every block
//	         5 DENIED (empty CID, len 0; the only frame): the image is private
//	           and the asker holds no proof of access for it here (see
//	           Private images)
//
// A server answers with data only blocks of images the asker may read
// there: those of a public image it holds or opens, and of private images
// the asker proved it can read; every other CID is NOT_FOUND, whether the
// server holds it or not (servable). The image a request names comes
// first, then the server's other images: blocks are shared across images.
//
// Blocks travel uncompressed, as the blockstore keeps them. Every length is
// checked against its limit before anything is allocated for it
// (FuzzReadFrame; a frame claiming 2^62 bytes costs no allocation), and
// the client also refuses a block whose length is not the one its index
// says. Deadlines: a server reads the request within 10 s, each write has
// 10 s, and a response that holds an upload slot keeps to a minimum rate
// and a total deadline (see Upload limits); a client waits
// FirstByteTimeout (2 s) for the first answer and FrameTimeout (5 s) plus
// a second per MiB for each later frame. A caller's cancellation resets
// the stream at once.
//
// Upload limits: a request is served only if one of MaxUploadStreams (4)
// slots is free, otherwise it gets BUSY at once — the asker rests the peer
// for BusyBackoff (30 ms) rather than queueing behind it, and asks it again
// or another holder. Four blocks in flight fill a gigabit link; a holder
// with four slots passes a new block on sooner than one with sixteen, so
// blocks spread through a swarm faster. Slots are fair and bounded, so
// that a peer that reads slowly, or not at all, cannot starve the others:
// a peer holds at most UploadStreamsPerPeer (2) of them, and its request
// beyond gets BUSY while the node serves others (PeerBusy); once a
// response holds a slot, the time its writes wait on the reader may run
// at most 2 s ahead of bytes sent / UploadMinBytesPerSec (256 KiB/s;
// waits for the token bucket and the store do not count), and it ends by
// UploadTimeout (60 s) — past either its stream is reset and the reader
// asks again or elsewhere for the rest (UploadsCut); and a response whose
// write has been blocked on its reader for a second gives its slot to a
// request from another peer that finds none free (UploadsPreempted). One
// slow peer then leaves an honest one served at once, two that hold all
// four slots between them delay it under a second, and slow responses end
// within 4 s (TestSlowReaderCannotStarve). Copies counted for Spread and
// OriginSpread that a cut response did not deliver whole are taken back.
// A node may also keep to a share of
// an image's uploads (UploadShare, off by default): once it has sent peers
// more than that many times what it holds of the image (at least
// ShareFloor, 16 MiB, assumed held), it answers plain requests for the
// image's blocks BUSY (OverShare), except for blocks few of its peers hold
// (Rare). In a swarm that starts at once the few nodes a little ahead get
// every block first and otherwise serve most copies of every block (the
// simulator measured the busiest at 11× the mean without a trace); the
// cap brings that down but can stall blocks (see Config.UploadShare), and
// Spreading (below) does it without stalls. Bytes are paced by one
// token bucket for the whole node (UploadBytesPerSec), in 32 KiB steps. An
// ORIGIN request waits for its blocks without a slot (waiting for a fetch
// costs nothing, and many askers wait for the same one), then queues for
// a slot if it gets one of a block's first copies; see Origin coalescing.
//
// Resource limits: libp2p's resource manager runs on Config.Limits, not
// on its defaults (which scale with the machine's memory and know nothing
// of these protocols): connections (4,096, 3,072 inbound, 8 per peer),
// streams per peer (256), block requests and have sessions open at once
// (2,048 each; 32 and 64 per peer), and stream buffers (1 GiB, 64 MiB per
// peer; yamux reserves 256 KiB a stream). A stream past a limit is reset
// as it opens. The tables the node keeps per peer — scores, proofs of
// access — hold at most 16,384 peers and drop the least valuable first,
// never one with a request or handshake in flight (nor a connected one,
// for scores): peer IDs cost nothing, and anyone can make the node meet
// more.
//
// # Spreading
//
// Each block spreads as a tree whose inner nodes change from block to
// block. A holder sends each of an image's blocks to at most SpreadCopies
// (2) peers — ORIGIN copies count — and answers later plain requests for
// it COMING, block by block, without taking an upload slot (Spread). The
// reader asks the block's other holders, and awaits it while none may be
// asked: the copies it was refused for are announced within a round trip
// and an AnnounceInterval, and each passes the block on again. A reader
// that, SpreadWait (100 ms) after its first COMING for a block, sees no
// holder but those that answered COMING asks them again with FORCE, which
// is always served (ForceSpread): the limit costs a block at most
// SpreadWait, never a registry read. Without it the nodes a little ahead
// of a swarm starting at once — which get every block first — served
// their session peers, all a little behind, most copies of every block
// (the simulator, 1,000 nodes without a trace: the busiest node uploaded
// 11.5× the mean; with it 2.3×, and p99 to ready 3.3 s → 2.7 s, since
// blocks no longer queue at a few holders). Requests for blobs and for
// images the node has not joined are not counted.
//
// A COMING answer names the block's recipients (hints, when the request
// set HINTS, as PeerSource always does): the last MaxHints peers whose
// copy from this holder was written whole, with the addresses this node
// knows for them. The reader counts them as holders of the block beside
// its have sessions — asking them (a dial if it never met them) before it
// would FORCE — and a hinted peer that answers NOT_FOUND is dropped like
// any stale holder. A session is one of about 40 random peers in a swarm
// of thousands: a reader's sessions rarely include the peers the holder
// sent its copies to, so without hints it waited SpreadWait and forced
// the first holder, and the node a little ahead of everyone uploaded most
// forced copies (the simulator, 10,000 nodes with a trace: busiest 4.3×
// the mean, 57% of its bytes in FORCE answers; with hints 3.8×, FORCE
// requests 131,000 → 113,000, p99 to ready 1.36 s → 1.25 s). Hints that
// do not decode
// mark the answer bad (the peer is penalised as for a wrong block); a
// hinted address that is wrong costs a failed dial, since the handshake
// verifies the peer ID. Connections made for hints are not protected
// (have sessions are), so the connection manager trims them first.
//
// # Policies
//
// Peer choice, hedge delays and designated fetchers are pure functions in
// policy.go, with no network, clock or global state, so that the
// simulator drives the same code as the daemon:
//
//   - ChoosePeers(candidates, self labels, rng) orders peers: same zone and
//     rack first, then same zone, then the lowest latency EWMA (peers within
//     a factor of two are equals), then the fewest requests in flight from
//     this node (least loaded), at random among equals. Assign then gives
//     each block its first and second choice among its holders, by that one
//     order per round, so blocks with the same holders batch onto the same
//     peer.
//   - HedgeDelay(latency EWMA, limit) is twice the EWMA, at least 50 ms, at
//     most Config.HedgeDelay (300 ms), and the limit for a peer never
//     measured.
//   - OriginGroup(image, providers, self, 8) is the image's origin group:
//     of the providers a lookup found and self, the eight with the lowest
//     sha256(image ID ‖ peer ID). It does not depend on the order the DHT
//     returned them in, nor on which node computes it: every node that
//     found the same providers gets the same eight (TestOriginGroup).
//   - Designated(block, candidates, self) is rendezvous (highest random
//     weight) hashing: the highest sha256(block ID ‖ peer ID) among the
//     candidates wins; a candidate leaving moves only its own blocks; over
//     10,000 blocks and 20 peers no peer gets more than 1.2× its share
//     (TestDesignated). Designate(block, group, self) applies it to the
//     origin group (self a candidate only as a member), and PlanOrigin
//     splits a call's unheld blocks by it.
//   - OverShare(uploaded, held, share) and OriginSpread(copies, slots) are
//     the upload share cap and the origin copies cap (see Upload limits
//     and Origin coalescing); Spread(copies, limit) and
//     ForceSpread(waited, wait, others) the per-block copies limit (see
//     Spreading); FirstCopies(block, askers, k) picks who gets a block's
//     first copies from its designated fetcher.
//   - Clock (Config.Clock) is what the hedge delay is waited on.
//
// # Fetching, hedging, verification and penalties
//
// PeerSource.FetchMany plans each round with ChoosePeers and Assign over
// the holders that may be asked: not avoided, not resting after BUSY, not
// failed in this call, not known to lack the block. Requests to different
// peers run in parallel (up to 8), each peer's blocks in batches of at most
// 256 blocks and 32 MiB. If a peer has not answered a batch within its
// HedgeDelay, the batch's blocks are asked of their second-choice holders
// too; each block is taken from whichever request delivers it first
// (verified), and the requests still running are cancelled once the batch
// is complete. A first choice that lost the race without a byte has its
// latency EWMA raised by the wait (not a failure: it may be loaded, not
// gone) and is not asked again in this call. FirstByteTimeout (2 s) stays
// the budget for a dead peer. Every received block is hashed against its
// ID before it is accepted. A wrong block, or an answer for a block not
// asked for, ends the request, is counted as a strike against the peer,
// and after BadBlockStrikes (3) strikes the peer is avoided for
// PenaltyCoolDown (10 min). A peer that is busy, slow to first byte, or
// gone is not asked again in the same call; three failures in a row rest it
// for 10 s. The blocks it did not deliver are planned again over the
// remaining holders (up to four rounds); what is still missing is left out
// with an error, for the registry. The fetch chain verifies again whatever
// a source returns.
//
// # Origin coalescing
//
// A block no peer holds would otherwise be fetched from the registry by
// every node that reads it at once. Instead each such block has one
// designated fetcher, and every node agrees which: Designate over the
// image's origin group (originView: OriginGroup over the providers the
// node's last lookup found and its have-session peers; the lowest scores
// of a union are the lowest of one part's lowest plus the other part, so
// a node that looked up before most records were out converges on the
// group the others use). Designating over each node's own peers instead,
// as an earlier version did, made nodes with different views pick
// different fetchers: 59 registry copies of each block at 1,000 nodes in
// the simulator. In the same call as the requests to holders:
//
//   - Designated to this node: its fetch starts at once through the image's
//     origin (Config.Origin, or what ServeOrigin set) and PeerSource leaves
//     it out; the chain's registry source, which is the same cache-backed
//     registry chain, joins that fetch. A node alone is designated for
//     everything, so a lone starter goes straight to the registry.
//   - Designated to peer P: P is asked with the ORIGIN flag (even while it
//     rests after a BUSY: a designated fetcher answers without a slot),
//     waiting at most OriginWait (3 s). P fetches what it does not hold
//     through its origin — bounded by OriginFetchTimeout (10 s), one fetch
//     per block however many ORIGIN requests (and local reads) want it, at
//     most MaxOriginFetches (8) at once (a request that would start one
//     more gets BUSY; one that can join a running fetch is served what that
//     fetch brings, NOT_FOUND for the rest). Then, if the request waited
//     for a fetch and FirstCopies did not pick it among the askers that
//     waited for the fetch of its first block (the MaxUploadStreams lowest
//     of a per-block hash of their peer IDs, not the first to arrive:
//     first come, first served gave every block's first copies to the
//     same few nodes), or if P has sent each of the blocks
//     MaxUploadStreams times already (OriginSpread), it answers COMING:
//     the blocks are out, and the asker takes them from the swarm.
//     Otherwise the request gets one of the first copies: it queues for
//     an upload slot (at most OriginWait;
//     COMING if none frees), whatever else the node does — without these
//     copies a block would be nowhere but at P. P's origin stores what it
//     fetches and announces it.
//
// Meanwhile PeerSource awaits (until OriginWait after the call began) the
// blocks still missing that the swarm is about to have: those answered
// COMING, those with an ORIGIN request outstanding, and those held by a
// peer not excluded from the call (a BUSY holder rests 30 ms and may be
// asked again); blocks that nobody could be asked for during a third of
// OriginWait go to their designated fetcher then; the ORIGIN requests
// still outstanding are dropped when the call ends. Each time a session's
// bitmap gains a block (announces go out every AnnounceInterval, 10 ms),
// or every 50 ms, it plans again and asks. So in a swarm of thousands
// starting at once, the designated fetcher reads each block once, sends
// four copies, and the block spreads from holder to holder; the simulator
// measures one registry copy at 1,000 and 10,000 nodes. A block whose only
// holders failed or answered NOT_FOUND, or whose designated fetcher failed
// or answered BUSY or NOT_FOUND, is not waited for: it falls through to
// the registry at once. A read never waits on the swarm much longer than
// OriginWait: a holder stuck BUSY costs that at most. A designated
// fetcher that answered COMING for a block that then shows up at no other
// holder within ComingGrace (half of OriginWait) is taken for one that
// does not deliver: it is marked unreachable, and the block goes to the
// next member of the group, as for a gone member (a byzantine member that
// answers COMING and sends nothing would otherwise cost every reader
// OriginWait, then a registry copy each; TestOriginComingLiar).
//
// A designated fetcher that is gone — no connection to it can be made: a
// node drained or preempted, whose provider record lives on for up to 48
// h and keeps it in every node's origin group — is left out of the
// designation for UnreachableRest (1 min) by each node that fails to
// reach it: a connect that fails, a block request whose stream cannot
// open and leaves no connection, or an ORIGIN request whose connection
// broke before any answer and cannot be made again (lost). A dial to a
// designated fetcher the node is not connected to is bounded by
// DesignatedDial (1 s), but the node waits for it only DesignatedHedge
// (200 ms; a connection within a data centre takes a few milliseconds):
// a member not connected by then is slow, left out of the designation
// until its dial ends, and unreachable if the dial fails. A gone member at
// a silent address (a drained node's address that nobody answers on) so
// costs each node that meets it 200 ms, not a second; a block whose next
// members are gone too costs 200 ms for each, where three seconds in a row
// used up OriginWait (3 s) before. A member that is merely slow to connect
// costs a registry copy, at the next member, of the blocks planned away
// from it. Its blocks are planned again at once, in the same
// call, for the member next in each block's rendezvous order (LiveGroup):
// the same member for every node that found it gone, so each of those
// blocks still comes from the registry once; ImageBlob puts that member
// in the gone one's place for the manifest and the index. Before, every
// node read them from the registry itself. The simulator, with the gone
// members ranked first in the group (make simulate-gone): one gone member
// whose host resets dials, at 10,000 nodes, 1.00× the unique bytes from
// the registry and p50 2.80 s, against 36.5× and 5.94 s before (every
// node waited OriginWait for the index, then read it from the registry);
// two at silent addresses, 1.00× and 3.24 s against 29.1× and 17.3 s
// (4.83 s without DesignatedHedge); four at silent addresses, at 1,000
// nodes, 1.00× the unique block bytes and p50 3.07 s, against 8.19× and
// 6.67 s without DesignatedHedge. TestOriginDesignatedDead and
// TestImageBlobDesignatedGone check it on real hosts, also with a silent
// address.
//
// The origin's contract (OriginFetcher): it shares its fetches and cache
// with the registry source of the node's chains, and is not itself a chain
// with this node's PeerSource (that chain is waiting on PeerSource when
// the origin is called). The daemon meets it with one fetch.Chain per
// image over the block cache and the registry alone, which is both the
// swarm's origin and the registry source of every chain of the image.
// Measured (TestOriginCoalescingDaemons): three daemons reading a 6 MiB
// file of 24 blocks at the same time make the registry serve 1.00 copies
// of its compressed bytes; TestOriginCoalescing: four nodes, each block
// fetched from the registry exactly once, by its designated node.
//
// Designated fetchers are per block, so a node's registry requests for its
// share of a run of small compressed blocks may read the gaps between them
// (up to the registry's merge gap). Provider records outlive a node that
// left the image while staying up, or restarted (until they expire, 48 h),
// so the origin group still names it. Such a node is not a member of the
// image's swarm: it has not joined the image, and ImageBlob has not asked
// for it within openingGrace (1 min; a mount reads the manifest and the
// index before it joins). To a request with the MEMBER flag it answers
// NOT_MEMBER: always to an ORIGIN request (it fetches for nobody), and to a
// plain one when it holds none of the blocks (a left node still serves
// what its cache keeps). The asker leaves it out of the image's
// designation for NotMemberRest (1 min, LiveGroup) and plans its blocks
// again, for the next member in each block's rendezvous order, as for a
// gone member; ImageBlob puts the next member in its place. Every asker
// hears the same answer, so each block is still fetched once: before
// NOT_MEMBER, every node read the left member's share from the registry,
// and if it was the index's designated fetcher every node waited out
// OriginWait (3 s) first (TestOriginDesignatedDead/left,
// TestImageBlobDesignatedGone/left: 3.0 s before, 20 ms now). An asker
// that does not set MEMBER (a daemon older than it) gets NOT_FOUND as
// before, and a server older than it ignores the flag.
//
// # The manifest and the index from peers
//
// A mount needs the image's manifest (about 1 KB) and index blob (about
// 120 KB for a Debian image) before its first block; read from the
// registry by every node, they would cost a 10,000-node rollout a hundred
// times the bytes one node reads. ImageBlob gets them from peers, which
// keep both in their block caches (node.Resolve puts them there): the
// node first provides the image's record (in the background, so that
// nodes starting at the same moment find each other; JoinImage then does
// not provide again), looks the image up once (the lookup JoinImage
// reuses), and asks the blob's designated fetcher in the origin group,
// then a random sample of the providers, one after the other, passing
// again after a back-off (10 ms doubling to 200 ms) until OriginWait. A
// candidate it cannot connect to within DesignatedHedge is dropped from
// the call (dialHedged): a provider at a silent address held the pass for
// its whole dial, and the node read the blob from the registry after
// OriginWait (TestImageBlobSilentProvider: 370 ms now, the registry after
// 3 s before; the simulator with four such providers at 1,000 nodes: 29
// nodes read the manifest from the registry before, none now). The
// designated fetcher itself asks three providers once, then reads the
// registry (fetch.OpenImage falls back on any error). fetch.OpenImage
// resolves a tag with a HEAD (no body) and takes the manifest from peers
// by digest, checked against it.
//
// # Blob ranges (ranges.go)
//
// The registry mirror pulls a blob that many nodes want at once and
// nobody holds yet in fixed-size ranges: the nodes pulling it join a
// pull (JoinPull: an early-provided record under PullKey, a lookup, and
// the peers that ask for its ranges, which together make the pull's
// origin group), each range has a designated fetcher (Designate over the
// group, LiveGroup less members found gone, slow or not pulling), and the
// others ask it over /shoal/range/1 (FetchRange) until it delivers, with
// ImageBlob's bounds: BlobGrace for a designee that says nothing, then the
// next member; OriginWait plus a second per RangeMinRate of the range for
// one that says COMING and never sends. A designee first asks the other
// members once whether one reads the range already (RangeElsewhere): nodes
// that joined a moment apart see different groups at first. Ranges have
// no digest; ranges.go says how the mirror keeps that safe.
//
// # Private images
//
// A private image (its registry refuses anonymous reads) is named in the
// swarm by what its manifest's bytes derive (PrivateImage): each node
// reads those bytes from the registry with its own credentials, so
// holding them is the proof that it may read the image. AddPrivate
// registers the image; from then on two nodes exchange nothing of it —
// blocks, the index, have bitmaps, ORIGIN fetches — before one handshake
// (/shoal/access/1, one round trip per peer and image) has proven each to
// the other. access.go describes the handshake; docs/security.md the
// threat model.
//
// # Private networks
//
// Config.PSK or PSKFile turns on libp2p's private network: every connection
// is encrypted with the 32-byte key before the handshake, so a node without
// it cannot connect at all. ParsePSK accepts libp2p's swarm key file
// ("/key/swarm/psk/1.0.0/", then /base16/, /base64/ or /bin/ and the key)
// or the key alone as 64 hex digits.
//
// Stats exposes counters (bytes up and down, blocks served and fetched,
// BUSY sent and received, bad blocks, failed requests, peers, hedged
// requests and their wins, ORIGIN requests sent and blocks they brought,
// origin fetches run and blocks served from them, COMING answers received,
// await rounds, share-cap BUSY answers, blocks answered COMING under
// SpreadCopies and received so, FORCE requests, hinted holders kept,
// ORIGIN askers passed over
// for first copies, BUSY answers for a peer's share, uploads cut and
// preempted, manifests and indexes from peers)
// for the daemon's metrics.
package p2p
