package p2p

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
)

// The node's libp2p resource manager enforces Config.Limits: their
// defaults are the limits in force, and a peer that opens more block
// streams than BlockStreamsPerPeer has the extra ones refused.
func TestResourceLimits(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	d := startNode(t, Config{})
	want := Defaults().Limits
	rm := d.host.Network().ResourceManager()
	limit := func(s any) rcmgr.Limit { return s.(rcmgr.ResourceScopeLimiter).Limit() }
	_ = rm.ViewSystem(func(s network.ResourceScope) error {
		l := limit(s)
		if l.GetConnTotalLimit() != want.Conns || l.GetConnLimit(network.DirInbound) != want.ConnsInbound || l.GetMemoryLimit() != want.Memory {
			t.Errorf("system: %d connections, %d inbound, %d bytes; want %d, %d, %d",
				l.GetConnTotalLimit(), l.GetConnLimit(network.DirInbound), l.GetMemoryLimit(), want.Conns, want.ConnsInbound, want.Memory)
		}
		return nil
	})
	for proto, n := range map[protocol.ID]int{ProtocolBlock: want.BlockStreams, ProtocolHave: want.HaveStreams} {
		_ = rm.ViewProtocol(proto, func(s network.ProtocolScope) error {
			if got := limit(s).GetStreamLimit(network.DirInbound); got != n {
				t.Errorf("%s: %d inbound streams, want %d", proto, got, n)
			}
			return nil
		})
	}
	_ = rm.ViewPeer(d.ID(), func(s network.PeerScope) error {
		l := limit(s)
		if l.GetConnTotalLimit() != want.ConnsPerPeer || l.GetStreamLimit(network.DirInbound) != want.StreamsPerPeer || l.GetMemoryLimit() != want.MemoryPerPeer {
			t.Errorf("per peer: %d connections, %d inbound streams, %d bytes; want %d, %d, %d",
				l.GetConnTotalLimit(), l.GetStreamLimit(network.DirInbound), l.GetMemoryLimit(), want.ConnsPerPeer, want.StreamsPerPeer, want.MemoryPerPeer)
		}
		return nil
	})

	const perPeer = 3
	s := startNode(t, Config{Limits: Limits{BlockStreamsPerPeer: perPeer}})
	a := startNode(t, Config{})
	if err := a.Connect(ctx, s.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	// Each stream sends the first byte of a request's length and no more:
	// the server waits for the rest (up to requestTimeout), holding the
	// stream open.
	open, refused := 0, 0
	for range perPeer + 2 {
		st, err := a.host.NewStream(ctx, s.ID(), ProtocolBlock)
		if err != nil {
			refused++
			continue
		}
		defer st.Reset()
		if _, err := st.Write([]byte{0x80}); err != nil {
			refused++
			continue
		}
		_ = st.SetReadDeadline(time.Now().Add(time.Second))
		_, err = st.Read(make([]byte, 1))
		if isTimeout(err) {
			open++ // still waited on by the server
		} else {
			refused++
		}
	}
	t.Logf("%d block streams open, %d refused (BlockStreamsPerPeer %d)", open, refused, perPeer)
	if open != perPeer || refused != 2 {
		t.Errorf("%d streams open and %d refused; want %d and 2", open, refused, perPeer)
	}
}
