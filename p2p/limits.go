package p2p

import (
	"errors"
	"fmt"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
)

// Limits are the libp2p resource manager's limits (go-libp2p's rcmgr),
// which scopes every connection, stream and byte of stream buffer to a
// peer and a protocol. A connection or stream beyond a limit is refused
// (the stream is reset as it opens; the asker counts a failed request),
// so the limits sit well above what honest peers use, and bound what a
// hostile one can make the node hold. Every zero value means the default;
// what they leave out (libp2p's own protocols, file descriptors) keeps
// libp2p's defaults, scaled to the machine.
//
// Stream memory is what binds first: yamux reserves 256 KiB for each
// stream as it opens (the window a peer may fill before the node reads),
// and more as a fast stream's window grows (up to 16 MiB, only while the
// scope is under half full), so Memory / 256 KiB bounds the streams open
// at once.
type Limits struct {
	// Conns bounds the node's connections, inbound and outbound; Default
	// 4096. ConnsInbound bounds those peers open; Default 3072, so that
	// peers cannot take the room the node's own dials need. In a swarm
	// starting at once, every reader dials the few designated fetchers
	// of the blocks nobody holds yet: libp2p's scaled default (64 + 64
	// per GiB of an eighth of RAM: 576 on a 64 GB node) would refuse
	// most of a 10,000-node swarm's readers, which would then count the
	// fetcher as gone. (An idle connection costs tens of KiB; the
	// connection manager trims unused ones past 192.)
	Conns, ConnsInbound int
	// ConnsPerPeer bounds the connections with one peer. Default 8
	// (libp2p's: the dials it may race to one peer; one stays).
	ConnsPerPeer int
	// StreamsPerPeer bounds the streams one peer has open to this node,
	// all protocols together. Default 256.
	StreamsPerPeer int
	// BlockStreams bounds the block requests (/shoal/block/1) peers have
	// open at once; BlockStreamsPerPeer, those of one peer. An ORIGIN
	// request waits for its fetch on its stream, without an upload slot,
	// and in a swarm starting at once thousands ask one designated
	// fetcher; a plain one beyond the upload slots is answered BUSY at
	// once. Default 2048 and 32: a reader asks a peer once per read in
	// flight (a FUSE mount runs a dozen, prefetch a few more).
	BlockStreams, BlockStreamsPerPeer int
	// HaveStreams bounds the have sessions (/shoal/have/1) peers have
	// open to this node; HaveStreamsPerPeer, one peer's: one per image
	// both have joined. Default 2048 (about 40 images at the 43 sessions
	// an image has per node in a 10,000-node swarm; an image takes at
	// most 2 × MaxImagePeers) and 64.
	HaveStreams, HaveStreamsPerPeer int
	// Memory bounds the stream buffers of all peers together, and
	// MemoryPerPeer those of one peer. Default 1 GiB (4096 streams at
	// 256 KiB) and 64 MiB.
	Memory, MemoryPerPeer int64
}

// withDefaults returns l with defaults filled in, or an error.
func (l Limits) withDefaults() (Limits, error) {
	setI := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setI(&l.Conns, 4096)
	setI(&l.ConnsInbound, min(3072, l.Conns))
	setI(&l.ConnsPerPeer, 8)
	setI(&l.StreamsPerPeer, 256)
	setI(&l.BlockStreams, 2048)
	setI(&l.BlockStreamsPerPeer, 32)
	setI(&l.HaveStreams, 2048)
	setI(&l.HaveStreamsPerPeer, 64)
	if l.Memory == 0 {
		l.Memory = 1 << 30
	}
	if l.MemoryPerPeer == 0 {
		l.MemoryPerPeer = 64 << 20
	}
	if l.Conns < 0 || l.ConnsInbound < 0 || l.ConnsPerPeer < 0 || l.StreamsPerPeer < 0 ||
		l.BlockStreams < 0 || l.BlockStreamsPerPeer < 0 || l.HaveStreams < 0 || l.HaveStreamsPerPeer < 0 ||
		l.Memory < 0 || l.MemoryPerPeer < 0 {
		return l, errors.New("resource limits must not be negative")
	}
	return l, nil
}

const (
	// accessStreams and accessStreamsPerPeer bound the proof-of-access
	// handshakes (/shoal/access/1) peers run with this node at once: one
	// per peer and private image, a round trip each.
	accessStreams, accessStreamsPerPeer = 1024, 8
	// otherStreams and otherStreamsPerPeer bound the inbound streams of
	// each protocol not named here or by libp2p (the DHT's): kad-dht
	// keeps one stream per peer and asks a peer a few things at once.
	otherStreams, otherStreamsPerPeer = 2048, 32
)

// resourceManager makes the libp2p resource manager that enforces l
// (with defaults filled in): libp2p's defaults scaled to the machine,
// with l and the node's own protocols' limits over them.
func (l Limits) resourceManager() (network.ResourceManager, error) {
	base := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&base) // identify, ping, ...
	in := func(n int) rcmgr.ResourceLimits {
		return rcmgr.ResourceLimits{StreamsInbound: rcmgr.LimitVal(n)}
	}
	partial := rcmgr.PartialLimitConfig{
		System: rcmgr.ResourceLimits{
			Conns:           rcmgr.LimitVal(l.Conns),
			ConnsInbound:    rcmgr.LimitVal(l.ConnsInbound),
			ConnsOutbound:   rcmgr.LimitVal(l.Conns),
			Streams:         rcmgr.LimitVal(l.Memory / yamuxWindow),
			StreamsInbound:  rcmgr.LimitVal(l.Memory / yamuxWindow),
			StreamsOutbound: rcmgr.LimitVal(l.Memory / yamuxWindow),
			Memory:          rcmgr.LimitVal64(l.Memory),
		},
		// Connections in their handshake, and streams before their
		// protocol is known.
		Transient: rcmgr.ResourceLimits{
			Conns:           rcmgr.LimitVal(max(1, l.Conns/4)),
			ConnsInbound:    rcmgr.LimitVal(max(1, l.ConnsInbound/4)),
			ConnsOutbound:   rcmgr.LimitVal(max(1, l.Conns/4)),
			Streams:         rcmgr.LimitVal(otherStreams),
			StreamsInbound:  rcmgr.LimitVal(otherStreams),
			StreamsOutbound: rcmgr.LimitVal(otherStreams),
			Memory:          rcmgr.LimitVal64(max(1, l.Memory/4)),
		},
		PeerDefault: rcmgr.ResourceLimits{
			Conns:           rcmgr.LimitVal(l.ConnsPerPeer),
			ConnsInbound:    rcmgr.LimitVal(l.ConnsPerPeer),
			ConnsOutbound:   rcmgr.LimitVal(l.ConnsPerPeer),
			Streams:         rcmgr.LimitVal(2 * l.StreamsPerPeer),
			StreamsInbound:  rcmgr.LimitVal(l.StreamsPerPeer),
			StreamsOutbound: rcmgr.LimitVal(l.StreamsPerPeer),
			Memory:          rcmgr.LimitVal64(l.MemoryPerPeer),
		},
		ProtocolDefault:     in(otherStreams),
		ProtocolPeerDefault: in(otherStreamsPerPeer),
		Protocol: map[protocol.ID]rcmgr.ResourceLimits{
			ProtocolBlock:  in(l.BlockStreams),
			ProtocolHave:   in(l.HaveStreams),
			ProtocolAccess: in(accessStreams),
		},
		ProtocolPeer: map[protocol.ID]rcmgr.ResourceLimits{
			ProtocolBlock:  in(l.BlockStreamsPerPeer),
			ProtocolHave:   in(l.HaveStreamsPerPeer),
			ProtocolAccess: in(accessStreamsPerPeer),
		},
	}
	// libp2p's metrics would register on the global registry once per
	// host (see New).
	m, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(partial.Build(base.AutoScale())), rcmgr.WithMetricsDisabled())
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	return m, nil
}

// yamuxWindow is what yamux reserves for each stream as it opens.
const yamuxWindow = 256 << 10
