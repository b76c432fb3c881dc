package p2p

// Byzantine behaviours, for the adversarial tests and the chaos rollout.
// A hostile node keeps everything that makes it look like a member — its
// DHT records, its have sessions, its proofs of access — and misbehaves
// in one way when asked for blocks. The honest code paths are not
// touched: hostility replaces the node's /shoal/block/1 handler.

import (
	"bufio"
	"context"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// hostility is how a hostile node answers block requests.
type hostility string

const (
	// hostileComingLiar answers every ORIGIN request COMING (it holds the
	// blocks and passes them on, it says) and every plain request
	// NOT_FOUND, and sends nothing.
	hostileComingLiar hostility = "coming-liar"
	// hostileCorrupt serves the blocks it holds with one byte flipped.
	hostileCorrupt hostility = "corrupt"
	// hostileBusy answers every request BUSY.
	hostileBusy hostility = "busy"
	// hostileSilent reads each request and never answers it.
	hostileSilent hostility = "silent"
)

// hostilities are the modes setHostile takes.
var hostilities = []hostility{hostileComingLiar, hostileCorrupt, hostileBusy, hostileSilent}

// setHostile makes the node answer block requests as mode says.
func (n *Node) setHostile(mode hostility) error {
	var answer func(st network.Stream, q request)
	switch mode {
	case hostileComingLiar:
		answer = func(st network.Stream, q request) {
			if q.flags&flagOrigin != 0 {
				_, _ = st.Write(appendBlockHeader(nil, statusComing, nil, 0))
				return
			}
			var out []byte
			for _, c := range q.cids {
				out = appendBlockHeader(out, statusNotFound, c, 0)
			}
			_, _ = st.Write(out)
		}
	case hostileCorrupt:
		answer = func(st network.Stream, q request) {
			w := bufio.NewWriter(st)
			for _, c := range q.cids {
				data := n.lookup(n.life, c)
				if data == nil {
					_, _ = w.Write(appendBlockHeader(nil, statusNotFound, c, 0))
					continue
				}
				data[len(data)/2] ^= 0xff
				_, _ = w.Write(append(appendBlockHeader(nil, statusOK, c, len(data)), data...))
			}
			_ = w.Flush()
		}
	case hostileBusy:
		answer = func(st network.Stream, _ request) { _, _ = st.Write(appendBlockHeader(nil, statusBusy, nil, 0)) }
	case hostileSilent:
		answer = func(network.Stream, request) {
			select {
			case <-n.life.Done():
			case <-time.After(time.Minute):
			}
		}
	default:
		return fmt.Errorf("p2p: hostile mode %q: want one of %v", mode, hostilities)
	}
	n.host.SetStreamHandler(ProtocolBlock, func(st network.Stream) {
		if !n.enter() {
			st.Reset()
			return
		}
		defer n.wg.Done()
		defer st.Close()
		q, err := readRequest(st)
		if err != nil {
			st.Reset()
			return
		}
		_ = st.SetWriteDeadline(time.Now().Add(writeTimeout))
		answer(st, q)
	})
	n.log.Warn("this node is hostile (adversarial harness)", "mode", string(mode))
	return nil
}

// grindIdentity returns a key whose peer ID ranks in image's origin group
// ahead of all but about one in rank of the IDs there may be (OriginGroup
// orders members by sha256(image ‖ peer ID)): what a peer that wants to be
// designated for an image's blocks does, in a few thousand key
// generations. It gives up with an error when ctx ends.
func grindIdentity(ctx context.Context, image string, rank int) (crypto.PrivKey, error) {
	id, err := imageID(image)
	if err != nil {
		return nil, err
	}
	for ctx.Err() == nil {
		key, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			return nil, err
		}
		p, err := peer.IDFromPrivateKey(key)
		if err != nil {
			return nil, err
		}
		// The first two bytes below 65536/rank: about one ID in rank.
		if sum := hrwScore(id, p); int(sum[0])<<8|int(sum[1]) < (1<<16)/rank {
			return key, nil
		}
	}
	return nil, ctx.Err()
}
