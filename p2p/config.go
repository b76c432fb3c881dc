package p2p

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/shoal-project/shoal/flat"
)

// BlockGetter is what a Node serves to its peers: verified, uncompressed
// block bytes by ID. *blockstore.Store satisfies it. Get returns an error
// for a block it does not hold; which error does not matter to the peer, who
// is told NOT_FOUND. If the getter also has Has(ctx, id) (bool, error), as
// the blockstore does, JoinImage uses it to build the node's initial have
// bitmap for the image.
type BlockGetter interface {
	Get(ctx context.Context, id flat.BlockID) ([]byte, error)
}

// hasser is BlockGetter's optional extension.
type hasser interface {
	Has(ctx context.Context, id flat.BlockID) (bool, error)
}

// DefaultListenAddr is the address a Node listens on when Config.ListenAddrs
// is empty: every IPv4 interface, TCP port 4701.
const DefaultListenAddr = "/ip4/0.0.0.0/tcp/4701"

// maxOriginWait caps Config.OriginWait well under lazyfs's one-minute fetch
// timeout: the registry must still have time to serve the block.
const maxOriginWait = 15 * time.Second

// IdentityFile is the name of the private key file in Config.IdentityDir.
const IdentityFile = "identity.key"

// Config configures a Node. Every zero value means the documented default.
type Config struct {
	// ListenAddrs are the TCP multiaddrs to listen on, such as
	// "/ip4/0.0.0.0/tcp/4701". Default: DefaultListenAddr. Tests use
	// "/ip4/127.0.0.1/tcp/0".
	ListenAddrs []string
	// IdentityDir holds the node's libp2p identity, an ed25519 key in
	// IdentityFile (libp2p's protobuf key encoding), created on first start
	// with mode 0600. Default "": a fresh identity every start, which is
	// fine for tests but makes a daemon a stranger to its peers after every
	// restart.
	IdentityDir string
	// BootstrapPeers are multiaddrs ending in /p2p/<peer id> to join the DHT
	// through. Default: none (the node can still be connected to, and can
	// be told of peers with Connect).
	BootstrapPeers []string
	// PSK, if set, makes this a private network (libp2p pnet): only nodes
	// with the same 32-byte key can connect. PSKFile is read instead when
	// PSK is empty; see ParsePSK for the accepted formats. Default: none.
	PSK     []byte
	PSKFile string
	// Zone and Rack label where the node runs. They are sent to peers in the
	// have protocol's hello; peers in the same zone (and rack) are asked
	// first. Default: none (no preference). At most 64 bytes each.
	Zone, Rack string

	// Blocks is what the node serves. Default nil: it serves nothing and
	// answers NOT_FOUND to every request.
	Blocks BlockGetter
	// MaxUploadStreams bounds the block requests served at once; a request
	// beyond it is answered BUSY. Default 4: four blocks in flight fill a
	// gigabit link, and a holder that serves four at a time passes a new
	// block on in a quarter of the time sixteen take, so it spreads
	// through a swarm sooner (simulated, 1,000 nodes starting at once:
	// 2.9 s to ready with 4, 4.2 s with 16) and the first holders do
	// less of the work.
	MaxUploadStreams int
	// UploadStreamsPerPeer bounds the upload slots one peer holds at
	// once: its request beyond them is answered BUSY while the node still
	// has slots for others, so that one peer, however slowly it reads,
	// never holds them all. Default: half of MaxUploadStreams, at least
	// 1 (2 of 4); at most MaxUploadStreams. A reader asks at most 8 peers
	// at once, one request each; a second slot covers its concurrent
	// reads.
	UploadStreamsPerPeer int
	// UploadMinBytesPerSec is the slowest a peer may take a response:
	// from the moment the response holds its slot, the time its writes
	// wait on the reader may run at most 2 s ahead of bytes sent / this
	// rate (waits for UploadBytesPerSec's token bucket and for the block
	// store do not count), else the response is cut (its stream reset)
	// and the slot freed; the reader asks again or elsewhere for what it
	// missed. A write its reader leaves blocked for a second also gives
	// the slot up to a request from another peer that finds none free.
	// Default 256 KiB/s (a 256 KiB block per second; the asker's own
	// frame deadlines give up near 1 MiB/s on large frames), which cut
	// the slow readers of issue 17 (85 KB/s a stream) within 5 s.
	// Negative: no minimum.
	UploadMinBytesPerSec int64
	// UploadTimeout bounds a response from the moment it holds its slot,
	// whatever its rate: a slot is never held longer. Default 60 s: a
	// full request (32 MiB) needs 550 KiB/s on average to finish; a
	// slower one ends at 60 s with the blocks sent so far, and the asker
	// plans the rest again.
	UploadTimeout time.Duration
	// UploadShare bounds how much of an image a node uploads, relative to
	// what it holds of it: a node that has sent peers more than
	// UploadShare × max(held, ShareFloor) bytes of the image's blocks
	// answers further plain requests for them BUSY (OverShare), so the
	// readers go to holders that have done less. In a swarm that starts
	// at once the nodes that are a little ahead get every block first and
	// would otherwise serve most copies of every block (the simulator
	// measured the busiest node at 11× the mean upload when no trace is
	// prefetched). Designated fetchers' ORIGIN answers, image blobs, and
	// blocks fewer than RareHolders of the node's image peers hold (Rare)
	// are not limited by it. Default off (0 or negative): in the simulator
	// (1,000 nodes, no trace) a share of 3 brought the busiest node from
	// 11× to 5.1× the mean, but stalled blocks whose holders were all over
	// their share: readers waited out OriginWait and went to the registry
	// (4.0× the unique bytes instead of 1.0×, 17.6 s to ready instead of
	// 3.2 s; a share of 2: 14×, 20.8 s). A knob to set with care, not a
	// default.
	UploadShare float64
	// SpreadCopies bounds the copies of each of an image's blocks a node
	// sends to peers: once it has sent a block SpreadCopies times (ORIGIN
	// answers included), it answers plain requests for it COMING, per
	// block, and the reader asks the block's other holders; a reader that
	// sees no other holder for SpreadWait asks again with the FORCE flag,
	// which is always served (Spread, ForceSpread). Default 2: in the
	// simulator (nodes starting at once, no trace) the busiest node
	// uploaded 11.5× the mean without a limit at 1,000 nodes, 3.2× with 3
	// and 2.3× with 2 (15.3× before this limit → 2.6× at 10,000), and
	// nodes were ready sooner (p99 3.26 s → 2.74 s at 1,000; 4.06 s →
	// 2.82 s at 10,000), since the blocks spread from many holders instead
	// of queueing at a few. With a trace prefetched at mount it matters
	// less (1,000 nodes: 3.3× without a limit, 3.0× with 2; 10,000 nodes:
	// 4.3× with 2 or 3, 3.8× with 2 once COMING answers named the block's
	// recipients). Negative: no limit.
	SpreadCopies int
	// SpreadWait is how long a reader waits, after a holder answered a
	// block COMING, for another holder before it asks with FORCE. Default
	// 100 ms (at 1,000 nodes without a trace, 50 ms: 3.0× instead of
	// 2.3× busiest, the same p99; with a trace, 400 ms: 2.1× instead of
	// 3.0×, but p99 1.43 s instead of 1.20 s).
	SpreadWait time.Duration
	// UploadBytesPerSec paces the block bytes sent to all peers together
	// (a token bucket). Default 0: unlimited.
	UploadBytesPerSec int64

	// FirstByteTimeout bounds the wait, after a request is sent, for the
	// first byte of the answer; a peer slower than that is skipped and the
	// blocks fall through to the next source. Default 2 s.
	FirstByteTimeout time.Duration
	// FrameTimeout bounds the wait for each later frame (plus one second per
	// MiB of its data). Default 5 s.
	FrameTimeout time.Duration
	// AnnounceInterval is how often newly held and dropped blocks are sent
	// to image peers, batched. Default 10 ms: in a swarm starting at once a
	// block spreads from holder to holder, and every hop waits for the
	// holder's next announcement; with 250 ms the simulator measured most
	// of a 1,000-node start spent waiting for ticks. An update is a few
	// bytes per changed block, sent only when something changed.
	AnnounceInterval time.Duration
	// RefreshInterval is how often the node looks for more peers of the
	// images it has joined when it has few, reconnects to the bootstrap
	// peers when it has none, and re-provides image records that are due.
	// Default 5 min.
	RefreshInterval time.Duration
	// MaxImagePeers is the number of providers JoinImage connects to per
	// image; twice as many may connect to it. Default 32.
	MaxImagePeers int
	// DiscoveryPool is how many providers one lookup collects before
	// MaxImagePeers of them are picked at random (SampleProviders) and the
	// origin group is chosen from them (OriginGroup). Default 512 ×
	// MaxImagePeers (16,384): one GET_PROVIDERS answer holds all of a DHT
	// server's records (about 100 bytes each; kad-dht's 4 MiB message
	// limit holds some 40,000), so a large pool costs no extra round
	// trips. A pool that holds every provider lets every node agree on the
	// origin group and spreads have sessions over the whole swarm; a pool
	// of the first 2,048 (the earlier default) left 10,000-node swarms
	// with 20 sessions per node, all on the same 2,048 nodes.
	DiscoveryPool int
	// BadBlockStrikes is the number of wrong blocks after which a peer is
	// avoided for PenaltyCoolDown. Default 3.
	BadBlockStrikes int
	// PenaltyCoolDown is how long a peer with BadBlockStrikes strikes is
	// avoided. Default 10 min.
	PenaltyCoolDown time.Duration
	// BusyBackoff is how long a peer that answered BUSY is not asked again.
	// Default 30 ms: a slot frees in about the time one block takes to
	// send; resting a busy holder for a second made readers in a swarm
	// starting at once run out of holders and wait (simulated: 3.7 s to
	// ready at 1,000 nodes with 1 s, 1.0 s with 30 ms, prefetching the
	// trace).
	BusyBackoff time.Duration

	// HedgeDelay bounds how long a request may go without its first byte
	// before its blocks are asked of the next holder too (hedging): the
	// delay is twice the peer's latency EWMA, at least 50 ms and at most
	// HedgeDelay, and HedgeDelay for a peer never measured (see
	// HedgeDelay the function). Default 300 ms; negative turns hedging off.
	// FirstByteTimeout stays the bound for a dead peer.
	HedgeDelay time.Duration
	// OriginWait bounds how long a node waits for a block nobody holds
	// from the block's designated fetcher (origin coalescing) before it
	// fetches the block from the registry itself. It must stay well under
	// the mount's fetch timeout (lazyfs: one minute). Default 3 s; negative
	// turns asking designated fetchers off (every such block goes straight
	// to the registry).
	OriginWait time.Duration
	// Origin fetches blocks from their origin (the registry) for peers
	// that ask this node as the blocks' designated fetcher, and for the
	// blocks this node is designated for itself; see OriginFetcher for its
	// contract. Default nil: per image, what ServeOrigin set (the daemon
	// hands it each image's cache-backed registry chain, so blocks are
	// fetched once, cached and announced); for an image without one, the
	// node answers ORIGIN requests with the blocks it holds, NOT_FOUND for
	// the rest, and the askers go to the registry at once.
	Origin OriginFetcher
	// MaxOriginFetches bounds the origin fetches this node starts for
	// peers and runs at once; a request that would start one more is
	// answered BUSY (a request for blocks already being fetched joins the
	// fetch instead). Default 8.
	MaxOriginFetches int
	// OriginFetchTimeout bounds each origin fetch run for peers. It may
	// outlast the askers' OriginWait: the block is then cached and
	// announced for later readers. Default 10 s.
	OriginFetchTimeout time.Duration

	// Limits are libp2p's resource-manager limits: the connections,
	// streams and memory peers may take of the node (see Limits).
	Limits Limits

	// Clock is the time the hedge delay is waited for. Default: the real
	// clock. (Network deadlines always use the real clock.)
	Clock Clock

	// Logger receives the node's logs, with component=p2p. Default:
	// slog.Default().
	Logger *slog.Logger
}

// withDefaults returns c with defaults filled in, or an error for a value
// that cannot be right.
func (c Config) withDefaults() (Config, error) {
	if len(c.ListenAddrs) == 0 {
		c.ListenAddrs = []string{DefaultListenAddr}
	}
	if c.UploadShare == 0 {
		c.UploadShare = -1 // off unless set: see UploadShare
	}
	if c.MaxUploadStreams == 0 {
		c.MaxUploadStreams = 4
	}
	if c.SpreadCopies == 0 {
		c.SpreadCopies = 2
	}
	c.UploadStreamsPerPeer = perPeerSlots(c.MaxUploadStreams, c.UploadStreamsPerPeer)
	if c.UploadMinBytesPerSec == 0 {
		c.UploadMinBytesPerSec = 256 << 10
	}
	setDur := func(d *time.Duration, def time.Duration) {
		if *d == 0 {
			*d = def
		}
	}
	setDur(&c.FirstByteTimeout, 2*time.Second)
	setDur(&c.FrameTimeout, 5*time.Second)
	setDur(&c.AnnounceInterval, 10*time.Millisecond)
	setDur(&c.RefreshInterval, 5*time.Minute)
	setDur(&c.PenaltyCoolDown, 10*time.Minute)
	setDur(&c.BusyBackoff, 30*time.Millisecond)
	setDur(&c.SpreadWait, 100*time.Millisecond)
	setDur(&c.UploadTimeout, time.Minute)
	if c.MaxImagePeers == 0 {
		c.MaxImagePeers = 32
	}
	if c.DiscoveryPool == 0 {
		c.DiscoveryPool = 512 * c.MaxImagePeers
	}
	if c.BadBlockStrikes == 0 {
		c.BadBlockStrikes = 3
	}
	setDur(&c.HedgeDelay, 300*time.Millisecond)
	setDur(&c.OriginWait, 3*time.Second)
	setDur(&c.OriginFetchTimeout, 10*time.Second)
	if c.MaxOriginFetches == 0 {
		c.MaxOriginFetches = 8
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	limits, limitsErr := c.Limits.withDefaults()
	c.Limits = limits
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	errs := []error{limitsErr}
	if c.MaxUploadStreams < 0 {
		errs = append(errs, fmt.Errorf("max upload streams %d: must not be negative", c.MaxUploadStreams))
	}
	if c.UploadStreamsPerPeer < 0 {
		errs = append(errs, fmt.Errorf("upload streams per peer %d: must not be negative", c.UploadStreamsPerPeer))
	}
	if c.UploadBytesPerSec < 0 {
		errs = append(errs, fmt.Errorf("upload bytes/s %d: must not be negative", c.UploadBytesPerSec))
	}
	for name, d := range map[string]time.Duration{
		"first byte timeout": c.FirstByteTimeout, "frame timeout": c.FrameTimeout,
		"announce interval": c.AnnounceInterval, "refresh interval": c.RefreshInterval,
		"penalty cool-down": c.PenaltyCoolDown, "busy backoff": c.BusyBackoff,
		"origin fetch timeout": c.OriginFetchTimeout, "spread wait": c.SpreadWait,
		"upload timeout": c.UploadTimeout,
	} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s %v: must not be negative", name, d))
		}
	}
	if c.MaxImagePeers < 0 || c.DiscoveryPool < 0 || c.BadBlockStrikes < 0 || c.MaxOriginFetches < 0 {
		errs = append(errs, errors.New("max image peers, bad block strikes and max origin fetches must not be negative"))
	}
	if c.OriginWait > maxOriginWait {
		errs = append(errs, fmt.Errorf("origin wait %v: at most %v (a read must not wait on a peer anywhere near the mount's fetch timeout)", c.OriginWait, maxOriginWait))
	}
	if len(c.Zone) > maxLabelLen || len(c.Rack) > maxLabelLen {
		errs = append(errs, fmt.Errorf("zone and rack labels: at most %d bytes", maxLabelLen))
	}
	for _, a := range c.ListenAddrs {
		if _, err := ma.NewMultiaddr(a); err != nil {
			errs = append(errs, fmt.Errorf("listen address %q: %w", a, err))
		}
	}
	return c, errors.Join(errs...)
}

// perPeerSlots is Config.UploadStreamsPerPeer with its default applied:
// perPeer if set, else half of streams, at least 1; at most streams. A
// negative perPeer is left for withDefaults to refuse.
func perPeerSlots(streams, perPeer int) int {
	if perPeer == 0 {
		perPeer = max(1, streams/2)
	}
	return min(perPeer, streams)
}

// parseBootstrap turns /p2p/ multiaddrs into peer infos, merging addresses
// of the same peer.
func parseBootstrap(addrs []string) ([]peer.AddrInfo, error) {
	var mas []ma.Multiaddr
	for _, a := range addrs {
		m, err := ma.NewMultiaddr(a)
		if err != nil {
			return nil, fmt.Errorf("bootstrap peer %q: %w", a, err)
		}
		mas = append(mas, m)
	}
	infos, err := peer.AddrInfosFromP2pAddrs(mas...)
	if err != nil {
		return nil, fmt.Errorf("bootstrap peers (each needs /p2p/<peer id>): %w", err)
	}
	return infos, nil
}

// loadIdentity reads the key in dir/IdentityFile, creating it (and dir) if
// it does not exist. An empty dir gives a fresh key that is not saved.
func loadIdentity(dir string, log *slog.Logger) (crypto.PrivKey, error) {
	if dir == "" {
		k, _, err := crypto.GenerateEd25519Key(rand.Reader)
		return k, err
	}
	path := filepath.Join(dir, IdentityFile)
	for range 2 {
		data, err := os.ReadFile(path)
		if err == nil {
			if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
				log.Warn("identity key file is readable by others; it should be mode 0600", "path", path, "mode", fi.Mode().Perm())
			}
			k, err := crypto.UnmarshalPrivateKey(data)
			if err != nil {
				return nil, fmt.Errorf("identity %s: %w", path, err)
			}
			return k, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("identity: %w", err)
		}
		if err := createIdentity(dir, path); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, err
		}
		// Created, or another process won the race: read what is there.
	}
	return nil, fmt.Errorf("identity %s: could not create", path)
}

// createIdentity writes a new key to path atomically: a temporary file,
// then a hard link, which fails if path appeared meanwhile.
func createIdentity(dir, path string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return fmt.Errorf("identity: generate key: %w", err)
	}
	data, err := crypto.MarshalPrivateKey(k)
	if err != nil {
		return fmt.Errorf("identity: encode key: %w", err)
	}
	f, err := os.CreateTemp(dir, ".identity-*")
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, werr := f.Write(data)
	if err := errors.Join(werr, f.Chmod(0o600), f.Sync(), f.Close()); err != nil {
		return fmt.Errorf("identity: write %s: %w", tmp, err)
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return err
		}
		return fmt.Errorf("identity: %w", err)
	}
	return nil
}

// pskV1Header starts libp2p's swarm key file.
var pskV1Header = []byte("/key/swarm/psk/1.0.0/")

// ParsePSK decodes a pre-shared key for a private network. Two formats are
// accepted:
//
//   - libp2p's swarm key file (as written by ipfs-swarm-key-gen), three
//     lines: "/key/swarm/psk/1.0.0/", then "/base16/", "/base64/" or
//     "/bin/", then the 32-byte key in that encoding;
//   - the key alone as 64 hexadecimal digits (surrounding white space is
//     ignored), for example from `openssl rand -hex 32`.
func ParsePSK(data []byte) (pnet.PSK, error) {
	if bytes.HasPrefix(data, pskV1Header) {
		k, err := pnet.DecodeV1PSK(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("pre-shared key (swarm key v1): %w", err)
		}
		return k, nil
	}
	s := bytes.TrimSpace(data)
	if len(s) != 64 {
		return nil, fmt.Errorf("pre-shared key: want a swarm key file or 64 hex digits, got %d bytes", len(s))
	}
	k := make([]byte, 32)
	if _, err := hex.Decode(k, s); err != nil {
		return nil, fmt.Errorf("pre-shared key: %w", err)
	}
	return k, nil
}

// LoadPSK reads and decodes a pre-shared key file (see ParsePSK).
func LoadPSK(path string) (pnet.PSK, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pre-shared key: %w", err)
	}
	k, err := ParsePSK(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}
