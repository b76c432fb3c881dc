package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/node"
	"github.com/shoal-project/shoal/p2p"
)

// swarm adapts p2p.Node to node.Peers (p2p does not import fetch). It is
// also a node.OriginServer, through p2p.Node.ServeOrigin: every image the
// node resolves hands the swarm its cache-backed registry chain, through
// which the node fetches, once, the blocks it is the designated fetcher of
// — for its own reads and for the peers that ask it (origin coalescing).
type swarm struct{ *p2p.Node }

var (
	_ node.Peers           = swarm{}
	_ node.OriginServer    = swarm{}
	_ fetch.IndexSource    = swarm{}
	_ fetch.ManifestSource = swarm{}
)

func (s swarm) PeerSource(image string) fetch.Source { return s.Source(image) }

// ImageName implements node.Peers: a public image is named by its
// manifest digest; a private one by what its manifest's bytes derive
// (p2p.PrivateImage), and made private in the swarm, which then shares it
// only with nodes that prove they hold those bytes too.
func (s swarm) ImageName(m fetch.Manifest) string {
	if m.Public {
		return m.Desc.Digest.String()
	}
	_, secret := p2p.PrivateImage(m.Raw)
	return s.AddPrivate(secret)
}

// FetchIndex implements fetch.IndexSource: the index blob from the image's
// peers, which keep it in their block caches (node.Resolve puts it there).
func (s swarm) FetchIndex(ctx context.Context, m fetch.Manifest, index v1.Descriptor) ([]byte, error) {
	raw, err := hex.DecodeString(index.Digest.Hex)
	if index.Digest.Algorithm != "sha256" || err != nil || len(raw) != len(flat.BlockID{}) {
		return nil, fmt.Errorf("index digest %s: not sha256", index.Digest)
	}
	return s.ImageIndex(ctx, s.ImageName(m), flat.BlockID(raw), index.Size)
}

// FetchManifest implements fetch.ManifestSource: the flat manifest from
// the image's peers, which keep it in their block caches (node.Resolve
// puts it there as soon as it has it). Its digest is the image's.
func (s swarm) FetchManifest(ctx context.Context, desc v1.Descriptor) ([]byte, error) {
	if desc.Digest.Algorithm != "sha256" {
		return nil, fmt.Errorf("manifest digest %s: not sha256", desc.Digest)
	}
	return s.ImageManifest(ctx, desc.Digest.String(), desc.Size)
}

// lateStore serves peers from the block cache, which exists only once the
// node is open — after the p2p host that the node needs is made.
type lateStore struct {
	p atomic.Pointer[blockstore.Store]
}

var errNotReady = errors.New("block cache not open yet")

func (l *lateStore) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	s := l.p.Load()
	if s == nil {
		return nil, errNotReady
	}
	return s.Get(ctx, id)
}

func (l *lateStore) Has(ctx context.Context, id flat.BlockID) (bool, error) {
	s := l.p.Load()
	if s == nil {
		return false, nil
	}
	return s.Has(ctx, id)
}

// newSwarm makes the libp2p node from the config; it starts nothing.
func (d *Daemon) newSwarm(ctx context.Context, blocks *lateStore) (*p2p.Node, error) {
	return p2p.New(ctx, d.p2pConfig(blocks))
}

// p2pConfig is the swarm's configuration, from the daemon's.
func (d *Daemon) p2pConfig(blocks p2p.BlockGetter) p2p.Config {
	c := d.cfg.P2P
	return p2p.Config{
		ListenAddrs:          c.Listen,
		IdentityDir:          filepath.Join(d.cfg.StateDir, "identity"),
		BootstrapPeers:       c.Bootstrap,
		PSK:                  d.swarmKey,
		Zone:                 d.cfg.Labels["zone"],
		Rack:                 d.cfg.Labels["rack"],
		Blocks:               blocks,
		MaxUploadStreams:     c.UploadStreams,
		UploadStreamsPerPeer: c.UploadStreamsPerPeer,
		UploadMinBytesPerSec: c.UploadMinBytesPerSec,
		UploadTimeout:        c.UploadTimeout,
		UploadShare:          c.UploadShare,
		UploadBytesPerSec:    c.UploadBytesPerSec,
		Limits:               c.Limits.p2p(),
		Logger:               d.base,
	}
}

// watchSwarm exports the swarm's counters, read at scrape time.
func (m *metrics) watchSwarm(n *p2p.Node) {
	gauge := func(name, help string, f func(p2p.Stats) float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(n.Stats()) }))
	}
	counter := func(name, help string, f func(p2p.Stats) float64) {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return f(n.Stats()) }))
	}
	gauge("shoal_peers", "Connected libp2p peers.", func(s p2p.Stats) float64 { return float64(s.Peers) })
	gauge("shoal_image_peers", "Peers with a have-bitmap, summed over joined images.", func(s p2p.Stats) float64 { return float64(s.ImagePeers) })
	gauge("shoal_provider_records", "Image provider records this node publishes (one per joined image).", func(s p2p.Stats) float64 { return float64(s.Images) })
	counter("shoal_uploaded_bytes_total", "Block bytes sent to peers.", func(s p2p.Stats) float64 { return float64(s.BytesUploaded) })
	counter("shoal_peer_downloaded_bytes_total", "Verified block bytes received from peers.", func(s p2p.Stats) float64 { return float64(s.BytesDownloaded) })
	counter("shoal_dht_lookups_total", "DHT provider lookups (one per image joined, plus refreshes).", func(s p2p.Stats) float64 { return float64(s.DHTLookups) })
	counter("shoal_busy_answers_total", "Block requests answered BUSY (upload limit).", func(s p2p.Stats) float64 { return float64(s.BusyAnswers) })
	counter("shoal_peer_busy_total", "Block requests answered BUSY because the peer held its share of the upload slots.", func(s p2p.Stats) float64 { return float64(s.PeerBusy) })
	counter("shoal_uploads_cut_total", "Uploads cut because the peer took them slower than the minimum rate, or past the upload timeout.", func(s p2p.Stats) float64 { return float64(s.UploadsCut) })
	counter("shoal_uploads_preempted_total", "Uploads whose stalled reader lost its slot to another peer's request.", func(s p2p.Stats) float64 { return float64(s.UploadsPreempted) })
	counter("shoal_bad_peer_blocks_total", "Blocks from peers that failed verification.", func(s p2p.Stats) float64 { return float64(s.BadBlocks) })
	counter("shoal_hedged_requests_total", "Block requests sent to a second holder because the first was slow to answer.", func(s p2p.Stats) float64 { return float64(s.HedgedRequests) })
	counter("shoal_hedge_wins_total", "Hedged requests that delivered a block first.", func(s p2p.Stats) float64 { return float64(s.HedgeWins) })
	counter("shoal_origin_requests_total", "Requests to a block's designated fetcher for blocks nobody held.", func(s p2p.Stats) float64 { return float64(s.OriginRequests) })
	counter("shoal_origin_blocks_total", "Blocks received from designated fetchers.", func(s p2p.Stats) float64 { return float64(s.OriginBlocks) })
	counter("shoal_origin_fetches_total", "Registry fetches run as the designated fetcher (for this node and its peers).", func(s p2p.Stats) float64 { return float64(s.OriginFetches) })
	gauge("shoal_origin_waiting", "Requests from peers waiting for an origin fetch this node runs for them.", func(s p2p.Stats) float64 { return float64(s.OriginWaiting) })
	counter("shoal_origin_served_total", "Blocks served to peers from fetches run as their designated fetcher.", func(s p2p.Stats) float64 { return float64(s.OriginServed) })
	counter("shoal_coming_received_total", "ORIGIN requests answered COMING: the designated fetcher holds the blocks and they spread through the swarm.", func(s p2p.Stats) float64 { return float64(s.ComingReceived) })
	counter("shoal_await_rounds_total", "Request rounds run while awaiting blocks the swarm was about to have.", func(s p2p.Stats) float64 { return float64(s.AwaitRounds) })
	counter("shoal_share_busy_total", "Block requests answered BUSY because this node had uploaded its share of the image.", func(s p2p.Stats) float64 { return float64(s.ShareBusy) })
	counter("shoal_spread_sent_total", "Blocks answered COMING because this node had sent them to enough peers (SpreadCopies).", func(s p2p.Stats) float64 { return float64(s.SpreadSent) })
	counter("shoal_hints_received_total", "Peers COMING answers named as a block's recipients, kept as its holders.", func(s p2p.Stats) float64 { return float64(s.HintsReceived) })
	counter("shoal_peer_unreachable_total", "Connections and block requests that failed because no connection to the peer could be made.", func(s p2p.Stats) float64 { return float64(s.Unreachable) })
	counter("shoal_origin_replanned_blocks_total", "Blocks whose designated fetcher was unreachable, slow to connect or not a member, planned again for the next member of the origin group.", func(s p2p.Stats) float64 { return float64(s.OriginReplanned) })
	counter("shoal_designated_slow_total", "Dials to designated fetchers and image-blob candidates not connected within 200 ms (DesignatedHedge): the peer was left out of the designation until its dial ended.", func(s p2p.Stats) float64 { return float64(s.DesignatedSlow) })
	counter("shoal_not_member_sent_total", "Block requests answered NOT_MEMBER: this node was asked about an image it is not a member of (left, or not opened since a restart).", func(s p2p.Stats) float64 { return float64(s.NotMemberSent) })
	counter("shoal_not_member_received_total", "NOT_MEMBER answers received: a peer named by the image's records had left it; it is not designated for the image for a while.", func(s p2p.Stats) float64 { return float64(s.NotMemberReceived) })
	counter("shoal_access_proofs_sent_total", "Proof-of-access handshakes for private images this node ran with peers (one per peer and image, then valid an hour).", func(s p2p.Stats) float64 { return float64(s.ProofsSent) })
	counter("shoal_access_proofs_accepted_total", "Proofs of access for private images that peers sent this node and that verified.", func(s p2p.Stats) float64 { return float64(s.ProofsAccepted) })
	counter("shoal_access_proofs_failed_total", "Proofs of access from peers that did not verify (forged, replayed, relayed or cut short).", func(s p2p.Stats) float64 { return float64(s.ProofsFailed) })
	counter("shoal_access_proofs_limited_total", "Handshakes refused because the peer had failed too many proofs lately.", func(s p2p.Stats) float64 { return float64(s.ProofsLimited) })
	counter("shoal_access_denied_sent_total", "Requests for a private image refused because the asker held no proof of access.", func(s p2p.Stats) float64 { return float64(s.DeniedSent) })
	counter("shoal_access_denied_received_total", "Requests of this node refused by a peer that held no proof of access from it.", func(s p2p.Stats) float64 { return float64(s.DeniedReceived) })
	counter("shoal_spread_received_total", "Blocks peers answered COMING because they had sent them to enough peers.", func(s p2p.Stats) float64 { return float64(s.SpreadReceived) })
	counter("shoal_forced_requests_total", "Block requests sent with FORCE: only holders that had answered COMING were left.", func(s p2p.Stats) float64 { return float64(s.ForcedRequests) })
	counter("shoal_first_copy_passed_total", "ORIGIN requests answered COMING because other askers of the same fetch got its first copies.", func(s p2p.Stats) float64 { return float64(s.FirstCopyPassed) })
	counter("shoal_manifests_from_peers_total", "Flat image manifests had from peers instead of the registry.", func(s p2p.Stats) float64 { return float64(s.ManifestsFetched) })
	counter("shoal_indexes_from_peers_total", "Flat image indexes had from peers instead of the registry.", func(s p2p.Stats) float64 { return float64(s.IndexesFetched) })
}
