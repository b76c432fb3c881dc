package p2p

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/multiformats/go-multihash"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-project/shoal/flat"
)

// Protocol IDs.
const (
	// DHTPrefix is the kad-dht protocol prefix: the DHT speaks
	// /shoal/kad/1.0.0, so it never mixes with the public IPFS DHT.
	DHTPrefix protocol.ID = "/shoal"
	// ProtocolBlock is the block exchange protocol.
	ProtocolBlock protocol.ID = "/shoal/block/1"
	// ProtocolHave is the have-bitmap protocol between peers of one image.
	ProtocolHave protocol.ID = "/shoal/have/1"
)

var (
	// ErrClosed is returned by methods of a closed Node.
	ErrClosed = errors.New("p2p: node closed")
	// ErrNotJoined is returned for an image the node has not joined.
	ErrNotJoined = errors.New("p2p: image not joined")
	// ErrBadDigest is returned for an image digest that is not "sha256:<64 hex>".
	ErrBadDigest = errors.New("p2p: image digest must be sha256:<64 hex digits>")
	// ErrNoHolder is wrapped when no usable peer holds a block.
	ErrNoHolder = errors.New("p2p: no usable peer holds the block")
	// ErrBusy is wrapped when a peer answered BUSY.
	ErrBusy = errors.New("p2p: peer busy")
	// ErrComing is wrapped when a designated fetcher answered that it
	// holds the blocks but has no upload slot: they come from the swarm.
	ErrComing = errors.New("p2p: designated fetcher holds the blocks but is busy; they spread through the swarm")
	// ErrBadBlock is wrapped when a peer sent bytes that do not match the
	// block's ID.
	ErrBadBlock = errors.New("p2p: peer sent a block that does not match its id")
)

// Node is one Shoal daemon's presence in the swarm: a libp2p host, its DHT,
// the block exchange server, and the have-state of the images it joined.
// Its methods are safe for concurrent use.
type Node struct {
	cfg  Config
	log  *slog.Logger
	host host.Host
	dht  *dht.IpfsDHT
	boot []peer.AddrInfo

	peers  *peerTable
	up     *uploader
	origin *originGroup
	access *access
	st     counters

	// life is the node's lifetime: sessions and background provides run
	// under it, and Close ends it.
	life    context.Context
	cancel  context.CancelFunc
	running atomic.Bool

	mu       sync.Mutex
	closed   bool
	swarms   map[string]*swarm
	origins  map[string]ImageFetcher   // by image, from ServeOrigin
	swarmSeq atomic.Int64              // makes each swarm's connection-manager tag unique
	found    map[string]foundProviders // recent image lookups, by key (index.go)
	groups   map[string][]peer.ID      // origin group per image digest, from the latest lookup (index.go)
	early    map[string]earlyProvide   // early provides of image records, by key (index.go)
	// blobs are, per image, the blobs ImageBlob fetched for it (its
	// manifest and index): the node serves them under the image while it
	// opens or holds it (servable).
	blobs   map[string][]flat.BlockID
	recipes RecipeGetter // what ServeRecipes set; nil before
	// pullPeers are, per pull key (PullKey), the peers a lookup found or
	// that asked this node for the pull's ranges, and when: members of the
	// pull, which its origin group includes (ranges.go).
	pullPeers map[string]map[peer.ID]time.Time
	// notMembers are, per image digest, the peers that answered NOT_MEMBER
	// for it and when they may be designated for it again.
	notMembers map[string]map[peer.ID]time.Time
	// slowDials counts, per peer, the dials to it (dialHedged) that have
	// gone on longer than DesignatedHedge and not ended yet.
	slowDials map[peer.ID]int
	wg        sync.WaitGroup // goroutines the node started; Add only under mu, while !closed

	closeOnce sync.Once
	closeErr  error
}

// New makes a node: it loads (or creates) the identity, starts the libp2p
// host listening, sets up the DHT in server mode and registers the block and
// have protocols, so peers can reach it as soon as New returns. Joining the
// DHT through the bootstrap peers, announcing blocks and refreshing happen
// in Run. ctx bounds construction only.
func New(ctx context.Context, cfg Config) (*Node, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("p2p config: %w", err)
	}
	log := cfg.Logger.With("component", "p2p")
	boot, err := parseBootstrap(cfg.BootstrapPeers)
	if err != nil {
		return nil, fmt.Errorf("p2p config: %w", err)
	}
	psk := cfg.PSK
	if len(psk) == 0 && cfg.PSKFile != "" {
		if psk, err = LoadPSK(cfg.PSKFile); err != nil {
			return nil, fmt.Errorf("p2p config: %w", err)
		}
	}
	if len(psk) != 0 && len(psk) != 32 {
		return nil, fmt.Errorf("p2p config: pre-shared key of %d bytes, want 32", len(psk))
	}
	key, err := loadIdentity(cfg.IdentityDir, log)
	if err != nil {
		return nil, fmt.Errorf("p2p: %w", err)
	}

	rm, err := cfg.Limits.resourceManager()
	if err != nil {
		return nil, fmt.Errorf("p2p: %w", err)
	}
	opts := []libp2p.Option{
		libp2p.Identity(key),
		// Explicit limits (Config.Limits) rather than libp2p's defaults,
		// which scale with the machine's memory and know nothing of the
		// node's protocols.
		libp2p.ResourceManager(rm),
		libp2p.ListenAddrStrings(cfg.ListenAddrs...),
		// TCP alone: it works with a pre-shared key (QUIC does not) and
		// keeps the set of moving parts small.
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Muxer(yamux.ID, yamux.DefaultTransport),
		libp2p.DisableRelay(),
		// Prometheus wiring comes from the daemon; libp2p's own metrics
		// would register on the global registry once per host.
		libp2p.DisableMetrics(),
		libp2p.UserAgent("shoal"),
	}
	if len(psk) != 0 {
		opts = append(opts, libp2p.PrivateNetwork(psk))
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		rm.Close() // the host closes it from now on
		return nil, fmt.Errorf("p2p: start libp2p host: %w", err)
	}
	// The DHT lives until Close, not until the constructor's ctx ends.
	d, err := dht.New(context.WithoutCancel(ctx), h,
		dht.Mode(dht.ModeServer),
		dht.ProtocolPrefix(DHTPrefix),
		dht.BootstrapPeers(boot...),
	)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("p2p: start dht: %w", err), h.Close())
	}

	n := &Node{
		cfg:     cfg,
		log:     log,
		host:    h,
		dht:     d,
		boot:    boot,
		peers:   newPeerTable(),
		up:      newUploader(cfg.MaxUploadStreams, cfg.UploadStreamsPerPeer, cfg.UploadBytesPerSec),
		origin:  newOriginGroup(cfg.MaxOriginFetches),
		access:  newAccess(),
		swarms:  map[string]*swarm{},
		origins: map[string]ImageFetcher{},
	}
	n.peers.pinned = h.Network().Peers // connected peers keep their entries
	n.life, n.cancel = context.WithCancel(context.Background())
	h.SetStreamHandler(ProtocolBlock, n.handleBlock)
	h.SetStreamHandler(ProtocolHave, n.handleHave)
	h.SetStreamHandler(ProtocolAccess, n.handleAccess)
	log.Info("p2p node started", "peer", h.ID().String(), "addrs", fmt.Sprint(h.Addrs()),
		"private_network", len(psk) != 0, "zone", cfg.Zone, "rack", cfg.Rack)
	return n, nil
}

// ID returns the node's peer ID.
func (n *Node) ID() peer.ID { return n.host.ID() }

// AddrInfo returns the node's peer ID and listen addresses.
func (n *Node) AddrInfo() peer.AddrInfo {
	return peer.AddrInfo{ID: n.host.ID(), Addrs: n.host.Addrs()}
}

// Addrs returns the node's listen addresses with /p2p/<id>, the form
// Config.BootstrapPeers takes.
func (n *Node) Addrs() []string {
	mas, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: n.host.ID(), Addrs: n.host.Addrs()})
	if err != nil {
		return nil
	}
	out := make([]string, len(mas))
	for i, m := range mas {
		out[i] = m.String()
	}
	return out
}

// Run joins the DHT through the bootstrap peers and then, until ctx ends or
// the node is closed, sends batched have-updates to image peers every
// AnnounceInterval and refreshes every RefreshInterval. It closes the node
// before it returns, and returns nil when ctx ended it.
func (n *Node) Run(ctx context.Context) error {
	if !n.running.CompareAndSwap(false, true) {
		return errors.New("p2p: Run called twice")
	}
	defer n.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(n.life, cancel)
	defer stop()

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		n.bootstrap(ctx)
		t := time.NewTicker(n.cfg.RefreshInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
				n.refresh(ctx)
			}
		}
	})
	g.Go(func() error {
		t := time.NewTicker(n.cfg.AnnounceInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
				n.flush()
			}
		}
	})
	return g.Wait()
}

// Close stops the node: ends its sessions, closes the DHT and the host, and
// waits for the goroutines it started. It is idempotent.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.mu.Lock()
		n.closed = true
		n.mu.Unlock()
		n.cancel()
		n.closeErr = errors.Join(n.dht.Close(), n.host.Close())
		n.wg.Wait()
		n.log.Info("p2p node closed", "peer", n.host.ID().String())
	})
	return n.closeErr
}

// spawn runs fn on a goroutine the node owns (Close waits for it); it
// reports false, without running fn, once the node is closed.
func (n *Node) spawn(fn func()) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Go(fn)
	return true
}

// bootstrap connects to the bootstrap peers and waits (briefly) for the DHT
// routing table to take one in, so that a JoinImage right after Run starts
// has somebody to ask.
func (n *Node) bootstrap(ctx context.Context) {
	if len(n.boot) == 0 {
		return
	}
	var wg sync.WaitGroup
	var ok atomic.Int32
	for _, ai := range n.boot {
		if ai.ID == n.host.ID() {
			continue
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := n.host.Connect(cctx, ai); err != nil {
				if ctx.Err() != nil {
					return
				}
				n.log.Warn("could not reach bootstrap peer", "peer", ai.ID.String(), "err", err)
				return
			}
			ok.Add(1)
		})
	}
	wg.Wait()
	if ok.Load() == 0 {
		if ctx.Err() == nil {
			n.log.Warn("no bootstrap peer reachable; will retry", "peers", len(n.boot))
		}
		return
	}
	if err := n.dht.Bootstrap(ctx); err != nil {
		n.log.Warn("dht bootstrap", "err", err)
	}
	n.waitRoutingTable(ctx, 5*time.Second)
}

// waitRoutingTable waits until the DHT's routing table has a peer, up to
// timeout, if the host is connected to anyone at all.
func (n *Node) waitRoutingTable(ctx context.Context, timeout time.Duration) {
	if n.dht.RoutingTable().Size() > 0 || len(n.host.Network().Peers()) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for n.dht.RoutingTable().Size() == 0 {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refresh reconnects to the bootstrap peers if the node is alone, and for
// every joined image re-provides its record when due and looks for more
// peers when it has few: O(images) DHT operations per interval.
func (n *Node) refresh(ctx context.Context) {
	if len(n.host.Network().Peers()) == 0 {
		n.bootstrap(ctx)
	}
	for _, s := range n.swarmList() {
		if ctx.Err() != nil {
			return
		}
		if s.provideDue(time.Now()) {
			n.provideImage(ctx, s)
		}
		if s.peerCount() < max(1, n.cfg.MaxImagePeers/2) {
			n.discover(ctx, s)
		}
	}
}

// Connect connects to a peer given as a multiaddr with /p2p/<id>.
func (n *Node) Connect(ctx context.Context, addr string) error {
	infos, err := parseBootstrap([]string{addr})
	if err != nil {
		return err
	}
	for _, ai := range infos {
		if err := n.host.Connect(ctx, ai); err != nil {
			return fmt.Errorf("connect %s: %w", ai.ID, err)
		}
	}
	return nil
}

// ImageKey returns the DHT key of a flat image: its manifest digest
// ("sha256:<hex>") as a CIDv1 with the raw codec and a sha2-256 multihash —
// the CID that names the manifest's bytes, which is what the digest is.
func ImageKey(digest string) (cid.Cid, error) {
	hexDigest, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(hexDigest) != 64 || strings.ToLower(hexDigest) != hexDigest {
		return cid.Undef, fmt.Errorf("%q: %w", digest, ErrBadDigest)
	}
	raw, err := hex.DecodeString(hexDigest)
	if err != nil {
		return cid.Undef, fmt.Errorf("%q: %w", digest, ErrBadDigest)
	}
	mh, err := multihash.Encode(raw, multihash.SHA2_256)
	if err != nil {
		return cid.Undef, fmt.Errorf("%q: %w", digest, err)
	}
	return cid.NewCidV1(cid.Raw, mh), nil
}

// Provide announces in the DHT that this node provides c. The record is
// stored locally at once, so peers that ask this node find it even if
// publishing to the closest peers fails; that failure is still returned.
func (n *Node) Provide(ctx context.Context, c cid.Cid) error {
	n.st.provides.Add(1)
	if err := n.dht.Provide(ctx, c, true); err != nil {
		return fmt.Errorf("provide %s: %w", c, err)
	}
	return nil
}

// FindProviders returns up to limit providers of c other than this node.
func (n *Node) FindProviders(ctx context.Context, c cid.Cid, limit int) ([]peer.AddrInfo, error) {
	if limit <= 0 {
		limit = n.cfg.MaxImagePeers
	}
	n.st.lookups.Add(1)
	var out []peer.AddrInfo
	// Ask for one more than limit: this node may be among the answers.
	for ai := range n.dht.FindProvidersAsync(ctx, c, limit+1) {
		if ai.ID == n.host.ID() || ai.ID == "" {
			continue
		}
		out = append(out, ai)
		if len(out) == limit {
			break
		}
	}
	if len(out) == 0 && ctx.Err() != nil {
		return nil, fmt.Errorf("find providers of %s: %w", c, ctx.Err())
	}
	return out, nil
}

// Stats is a snapshot of the node's counters.
type Stats struct {
	Peers           int   `json:"peers"`       // connected libp2p peers
	Images          int   `json:"images"`      // images joined
	ImagePeers      int   `json:"image_peers"` // peers with a have-bitmap, summed over images
	AvoidedPeers    int   `json:"avoided_peers"`
	BytesUploaded   int64 `json:"bytes_uploaded"`
	BytesDownloaded int64 `json:"bytes_downloaded"` // verified block bytes received
	BlocksServed    int64 `json:"blocks_served"`
	BlocksFetched   int64 `json:"blocks_fetched"`
	NotFoundServed  int64 `json:"not_found_served"`
	BusyAnswers     int64 `json:"busy_answers"` // BUSY sent
	BusyReceived    int64 `json:"busy_received"`
	BadBlocks       int64 `json:"bad_blocks"` // received blocks that failed verification
	FailedRequests  int64 `json:"failed_requests"`
	ActiveUploads   int64 `json:"active_uploads"`
	HaveUpdatesSent int64 `json:"have_updates_sent"`
	DHTLookups      int64 `json:"dht_lookups"`  // FindProviders calls: one per image joined, plus refreshes
	DHTProvides     int64 `json:"dht_provides"` // provider records published (image level only)

	// Hedging: requests sent to a second holder because the first was
	// slow to answer, and those that delivered at least one block first.
	HedgedRequests int64 `json:"hedged_requests"`
	HedgeWins      int64 `json:"hedge_wins"`
	// Origin coalescing, asking: ORIGIN requests sent to designated
	// fetchers, and the blocks they delivered.
	OriginRequests int64 `json:"origin_requests"`
	OriginBlocks   int64 `json:"origin_blocks"`
	// Origin coalescing, serving: origin fetches run for peers, blocks
	// served from them, and ORIGIN requests turned away BUSY.
	OriginFetches int64 `json:"origin_fetches"`
	OriginServed  int64 `json:"origin_served"`
	OriginBusy    int64 `json:"origin_busy"`
	OriginWaiting int64 `json:"origin_waiting"` // ORIGIN requests waiting for their fetches now
	// Unreachable counts connections and block requests that failed
	// because no connection to the peer could be made (gone);
	// OriginReplanned, the blocks whose designated fetcher
	// was such a peer, planned again for the next member of the group.
	Unreachable     int64 `json:"unreachable"`
	OriginReplanned int64 `json:"origin_replanned"`
	// DesignatedSlow counts dials to designated fetchers and ImageBlob's
	// candidates not connected within DesignatedHedge: the peer was left
	// out of the designation until its dial ended.
	DesignatedSlow int64 `json:"designated_slow"`
	// NotMemberSent counts requests this node answered NOT_MEMBER (it was
	// asked about an image it has left); NotMemberReceived, the NOT_MEMBER
	// answers it got (a member of an origin group had left the image).
	NotMemberSent     int64 `json:"not_member_sent"`
	NotMemberReceived int64 `json:"not_member_received"`
	// Waiting for the swarm: COMING answers from designated fetchers, and
	// rounds planned again because holders appeared while blocks were
	// awaited.
	ComingReceived int64 `json:"coming_received"`
	AwaitRounds    int64 `json:"await_rounds"`
	// ShareBusy counts requests answered BUSY because the node had
	// uploaded more than its share of the image (Config.UploadShare).
	ShareBusy int64 `json:"share_busy"`
	// Spreading: blocks this node answered COMING because it had sent
	// them to SpreadCopies peers; blocks peers answered COMING; and
	// requests sent with FORCE after SpreadWait (Spread, ForceSpread).
	SpreadSent     int64 `json:"spread_sent"`
	SpreadReceived int64 `json:"spread_received"`
	ForcedRequests int64 `json:"forced_requests"`
	// HintsReceived counts the peers COMING answers named as a block's
	// recipients that this node kept as its holders (flagHints).
	HintsReceived int64 `json:"hints_received"`
	// FirstCopyPassed counts ORIGIN requests answered COMING because
	// other askers of the same fetch were picked for the first copies.
	FirstCopyPassed int64 `json:"first_copy_passed"`
	// Fair uploads: requests answered BUSY because their peer held its
	// share of the upload slots (UploadStreamsPerPeer); responses cut
	// for falling behind UploadMinBytesPerSec or past UploadTimeout; and
	// responses whose stalled reader lost its slot to another peer.
	PeerBusy         int64 `json:"peer_busy"`
	UploadsCut       int64 `json:"uploads_cut"`
	UploadsPreempted int64 `json:"uploads_preempted"`
	// Proofs of access (private images): handshakes this node ran as
	// client (ProofsSent), proofs from peers it accepted and refused
	// (ProofsAccepted, ProofsFailed), handshakes it refused because the
	// peer had failed too many (ProofsLimited), and requests it answered
	// DENIED (no proof held) or got DENIED for.
	ProofsSent     int64 `json:"proofs_sent"`
	ProofsAccepted int64 `json:"proofs_accepted"`
	ProofsFailed   int64 `json:"proofs_failed"`
	ProofsLimited  int64 `json:"proofs_limited"`
	DeniedSent     int64 `json:"denied_sent"`
	DeniedReceived int64 `json:"denied_received"`
	// ComingUndelivered counts designated fetchers taken for unreachable
	// because blocks they answered COMING for showed up nowhere within
	// ComingGrace.
	ComingUndelivered int64 `json:"coming_undelivered"`
	// IndexesFetched counts image indexes had from peers (not the registry).
	IndexesFetched int64 `json:"indexes_fetched"`
	// ManifestsFetched counts flat manifests had from peers (not the
	// registry).
	ManifestsFetched int64 `json:"manifests_fetched"`
}

type counters struct {
	bytesUp, bytesDown, blocksServed, blocksFetched, notFound atomic.Int64
	busySent, busyRecv, badBlocks, failedReqs, activeUploads  atomic.Int64
	updatesSent, lookups, provides                            atomic.Int64
	hedged, hedgeWins, originAsked, originGot                 atomic.Int64
	originFetches, originServed, originBusy, originWaiting    atomic.Int64
	indexesFetched, comingRecv, awaitRounds, shareBusy        atomic.Int64
	manifestsFetched, spreadSent, spreadRecv, forced          atomic.Int64
	firstCopyPassed, hintsRecv, unreachable, originReplanned  atomic.Int64
	notMemberSent, notMemberRecv, designatedSlow              atomic.Int64
	proofsSent, proofsAccepted, proofsFailed, proofsLimited   atomic.Int64
	deniedSent, deniedRecv, comingUndelivered                 atomic.Int64
	peerBusy, uploadsCut, uploadsPreempted                    atomic.Int64
}

// Stats returns the node's counters.
func (n *Node) Stats() Stats {
	st := Stats{
		Peers:             len(n.host.Network().Peers()),
		AvoidedPeers:      n.peers.avoided(time.Now()),
		BytesUploaded:     n.st.bytesUp.Load(),
		BytesDownloaded:   n.st.bytesDown.Load(),
		BlocksServed:      n.st.blocksServed.Load(),
		BlocksFetched:     n.st.blocksFetched.Load(),
		NotFoundServed:    n.st.notFound.Load(),
		BusyAnswers:       n.st.busySent.Load(),
		BusyReceived:      n.st.busyRecv.Load(),
		BadBlocks:         n.st.badBlocks.Load(),
		FailedRequests:    n.st.failedReqs.Load(),
		ActiveUploads:     n.st.activeUploads.Load(),
		HaveUpdatesSent:   n.st.updatesSent.Load(),
		DHTLookups:        n.st.lookups.Load(),
		DHTProvides:       n.st.provides.Load(),
		HedgedRequests:    n.st.hedged.Load(),
		HedgeWins:         n.st.hedgeWins.Load(),
		OriginRequests:    n.st.originAsked.Load(),
		OriginBlocks:      n.st.originGot.Load(),
		OriginFetches:     n.st.originFetches.Load(),
		OriginServed:      n.st.originServed.Load(),
		OriginBusy:        n.st.originBusy.Load(),
		OriginWaiting:     n.st.originWaiting.Load(),
		IndexesFetched:    n.st.indexesFetched.Load(),
		ManifestsFetched:  n.st.manifestsFetched.Load(),
		ComingReceived:    n.st.comingRecv.Load(),
		AwaitRounds:       n.st.awaitRounds.Load(),
		ShareBusy:         n.st.shareBusy.Load(),
		SpreadSent:        n.st.spreadSent.Load(),
		SpreadReceived:    n.st.spreadRecv.Load(),
		ForcedRequests:    n.st.forced.Load(),
		FirstCopyPassed:   n.st.firstCopyPassed.Load(),
		HintsReceived:     n.st.hintsRecv.Load(),
		Unreachable:       n.st.unreachable.Load(),
		OriginReplanned:   n.st.originReplanned.Load(),
		NotMemberSent:     n.st.notMemberSent.Load(),
		NotMemberReceived: n.st.notMemberRecv.Load(),
		DesignatedSlow:    n.st.designatedSlow.Load(),
		ProofsSent:        n.st.proofsSent.Load(),
		ProofsAccepted:    n.st.proofsAccepted.Load(),
		ProofsFailed:      n.st.proofsFailed.Load(),
		ProofsLimited:     n.st.proofsLimited.Load(),
		DeniedSent:        n.st.deniedSent.Load(),
		DeniedReceived:    n.st.deniedRecv.Load(),
		ComingUndelivered: n.st.comingUndelivered.Load(),
		PeerBusy:          n.st.peerBusy.Load(),
		UploadsCut:        n.st.uploadsCut.Load(),
		UploadsPreempted:  n.st.uploadsPreempted.Load(),
	}
	for _, s := range n.swarmList() {
		st.Images++
		st.ImagePeers += s.peerCount()
	}
	return st
}

// PeerInfo returns what the node knows about p: labels, latency, penalties.
func (n *Node) PeerInfo(p peer.ID) (PeerInfo, bool) { return n.peers.info(p) }

// dialBound bounds a dial to a peer that is not a designated fetcher
// (DesignatedDial bounds those).
const dialBound = 5 * time.Second

// connect makes sure the host is connected to ai, with a bound on the dial.
func (n *Node) connect(ctx context.Context, ai peer.AddrInfo) error {
	return n.connectWithin(ctx, ai, dialBound)
}

// connectWithin is connect with the dial bounded by bound. A dial that
// fails, or does not finish within bound, while ctx lives marks the peer
// unreachable.
func (n *Node) connectWithin(ctx context.Context, ai peer.AddrInfo, bound time.Duration) error {
	if n.host.Network().Connectedness(ai.ID) == network.Connected {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	err := n.host.Connect(cctx, ai)
	if err != nil && ctx.Err() == nil {
		n.markUnreachable(ai.ID)
	}
	return err
}

// dialHedged connects to ai, a designated fetcher or a provider ImageBlob
// asks, and reports whether a connection is up within DesignatedHedge. A
// dial still running then goes on in the background, up to DesignatedDial
// and the node's life (not ctx's), and marks the peer unreachable if it
// fails (connectWithin); until it ends, the peer is slow, and not
// designated (undesignatable), so that no other read waits on it
// meanwhile.
func (n *Node) dialHedged(ctx context.Context, ai peer.AddrInfo) bool {
	if n.host.Network().Connectedness(ai.ID) == network.Connected {
		return true
	}
	// state: 0 dialing, 1 slow (the waiter gave up on it), 2 ended first.
	var state atomic.Int32
	done := make(chan error, 1)
	if !n.spawn(func() {
		err := n.connectWithin(n.life, ai, DesignatedDial)
		if !state.CompareAndSwap(0, 2) {
			n.markSlow(ai.ID, -1)
		}
		done <- err
	}) {
		return false // closed
	}
	select {
	case err := <-done:
		return err == nil
	case <-n.cfg.Clock.After(DesignatedHedge):
	case <-ctx.Done():
		return false
	}
	n.markSlow(ai.ID, 1) // before the dial can end as slow and unmark it
	if state.CompareAndSwap(0, 1) {
		n.st.designatedSlow.Add(1)
		return false
	}
	n.markSlow(ai.ID, -1) // it ended in between
	return <-done == nil
}

// markSlow counts a dial to p that has gone on longer than DesignatedHedge
// (delta 1), or ended (-1).
func (n *Node) markSlow(p peer.ID, delta int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.slowDials == nil {
		n.slowDials = map[peer.ID]int{}
	}
	if n.slowDials[p] += delta; n.slowDials[p] <= 0 {
		delete(n.slowDials, p)
	}
}

// undesignatable reports, for LiveGroup, the peers this node may not
// designate for image now: not designatable (peerTable.designatable), not
// a member of the image's swarm (they answered NOT_MEMBER within
// NotMemberRest), or slow: a dial to them has gone on longer than
// DesignatedHedge (dialHedged).
func (n *Node) undesignatable(image string) func(peer.ID) bool {
	now := n.cfg.Clock.Now()
	var out []peer.ID
	n.mu.Lock()
	for p, until := range n.notMembers[image] {
		if now.Before(until) {
			out = append(out, p)
		}
	}
	for p := range n.slowDials {
		out = append(out, p)
	}
	n.mu.Unlock()
	return func(p peer.ID) bool { return slices.Contains(out, p) || !n.peers.designatable(p, now) }
}

// markNotMember records that p answered NOT_MEMBER for image: it is left
// out of the image's origin designation for NotMemberRest (LiveGroup).
// Expired entries, of every image, go on the way.
func (n *Node) markNotMember(image string, p peer.ID) {
	n.st.notMemberRecv.Add(1)
	now := n.cfg.Clock.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	for im, m := range n.notMembers {
		for q, until := range m {
			if !now.Before(until) {
				delete(m, q)
			}
		}
		if len(m) == 0 {
			delete(n.notMembers, im)
		}
	}
	if n.notMembers == nil {
		n.notMembers = map[string]map[peer.ID]time.Time{}
	}
	if n.notMembers[image] == nil {
		n.notMembers[image] = map[peer.ID]time.Time{}
	}
	n.notMembers[image][p] = now.Add(NotMemberRest)
}

// markUnreachable records that no connection to p could be made: it is
// left out of origin designation for UnreachableRest (LiveGroup).
func (n *Node) markUnreachable(p peer.ID) {
	n.st.unreachable.Add(1)
	n.peers.unreachable(p, n.cfg.Clock.Now().Add(UnreachableRest))
}
