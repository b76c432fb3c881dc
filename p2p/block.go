package p2p

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

const (
	// requestTimeout bounds reading a request on the serving side.
	requestTimeout = 10 * time.Second
	// writeTimeout bounds each write of a response (after pacing).
	writeTimeout = 10 * time.Second
	// getTimeout bounds reading one block from the local store.
	getTimeout = 10 * time.Second
	// paceChunk is the unit of upload pacing and of writes.
	paceChunk = 32 << 10
	// minTransferRate sizes the deadline of a block's data: a frame may take
	// FrameTimeout plus one second per MiB.
	minTransferRate = 1 << 20
	// maxRequestBytes bounds the block bytes one request asks for, so that
	// one failure wastes little and the deadlines stay meaningful.
	maxRequestBytes = 32 << 20
)

// handleBlock serves a /shoal/block/1 stream: one request, then one frame
// per CID — COMING for the blocks sent to enough peers already (Spread),
// then the others in the order asked — or a single BUSY or COMING frame.
func (n *Node) handleBlock(st network.Stream) {
	if !n.enter() {
		st.Reset()
		return
	}
	defer n.wg.Done()
	p := st.Conn().RemotePeer()
	q, err := readRequest(st)
	if err != nil {
		n.log.Debug("bad block request", "peer", p.String(), "err", err)
		st.Reset()
		return
	}
	// Once the response holds an upload slot (up), its writes are timed
	// by clock, and a write its reader stalls can cost it the slot
	// (stallWriter, uploader.acquire).
	var (
		up    *upload
		clock *responseClock
	)
	sw := &stallWriter{w: st}
	w := bufio.NewWriterSize(sw, paceChunk+64)
	var sent int64 // to p, frames included: the status page's uploads by peer
	defer func() { n.peers.sent(p, sent) }()
	deadline := func(k int) time.Time {
		if clock != nil {
			return clock.deadline(k)
		}
		return time.Now().Add(writeTimeout)
	}
	write := func(b []byte) error {
		_ = st.SetWriteDeadline(deadline(len(b)))
		k, err := w.Write(b)
		sent += int64(k)
		if clock != nil {
			clock.written += int64(k)
		}
		return err
	}
	// only answers with a single frame of status, and no CID.
	only := func(status byte) {
		if write(appendBlockHeader(nil, status, nil, 0)) == nil && w.Flush() == nil {
			_ = st.Close()
		} else {
			st.Reset()
		}
	}
	refuse := func(status byte) {
		n.st.busySent.Add(1)
		only(status)
	}
	ctx, cancel := context.WithCancel(n.life)
	defer cancel()
	if !n.admitted(ctx, p, q.image) {
		// A private image, and no proof of access from p: it proves
		// (ProtocolAccess), then asks again.
		n.st.deniedSent.Add(1)
		only(statusDenied)
		return
	}
	// Only blocks of images p may read here are answered with data; the
	// others get NOT_FOUND, held or not (written with the answer, below).
	var denied [][]byte
	q.cids, denied = n.servable(ctx, p, q.image, q.cids)
	get := func(c []byte) []byte { return n.lookup(ctx, c) }
	s := n.swarm(q.image)
	if q.flags&flagMember != 0 && s == nil && !n.opening(q.image) &&
		(q.flags&flagOrigin != 0 || len(n.available(ctx, q.cids, nil)) == 0) {
		// Not a member of the image's swarm (it left the image, or this
		// daemon restarted), yet its record still names it: the asker is
		// told so, and designates the next member of the group instead
		// of reading this node's share of blocks from the registry. It
		// fetches for no ORIGIN request; a plain request for blocks it
		// still holds is served.
		n.st.notMemberSent.Add(1)
		only(statusNotMember)
		return
	}
	// The share counts (and limits) the image's blocks, not its manifest
	// or index.
	shared := s != nil && s.inTable(q.cids)
	// hold gives the response an upload slot; from then on its writes
	// keep to the minimum rate and the total deadline (responseClock).
	stop := func() { st.Reset() }
	hold := func(u, preempted *upload) {
		if preempted != nil {
			n.st.uploadsPreempted.Add(1)
		}
		up, sw.up = u, u
		clock = newResponseClock(time.Now(), n.cfg.UploadTimeout, n.cfg.UploadMinBytesPerSec)
	}
	// cids are the blocks to answer with data or NOT_FOUND; spread those
	// answered COMING (sent to enough peers already), hints the peers
	// their copies reached. counted are those of cids whose copies were
	// counted (take, reserve) and have not been sent whole yet: a copy
	// that does not reach p is taken back (unreserve).
	cids, spread, hints := q.cids, [][]byte(nil), [][]peer.ID(nil)
	var counted [][]byte
	if q.flags&flagOrigin != 0 {
		// Wait for the blocks first, without an upload slot: waiting for
		// a fetch costs nothing, and many peers wait for the same one.
		var cancelOrigin context.CancelFunc
		ctx, cancelOrigin = context.WithTimeout(ctx, n.cfg.OriginFetchTimeout)
		defer cancelOrigin()
		fetched, lead, ok := n.originFor(ctx, p, q)
		if !ok {
			n.st.originBusy.Add(1)
			refuse(statusBusy)
			return
		}
		get = func(c []byte) []byte {
			if d, ok := fetched[string(c)]; ok {
				n.st.originServed.Add(1)
				return d
			}
			return n.lookup(ctx, c)
		}
		avail := n.available(ctx, q.cids, fetched)
		switch {
		case len(avail) == 0:
			// Nothing here (no origin, or its fetch failed): NOT_FOUND
			// for each, which needs no slot, and the asker goes to the
			// registry at once.
		case lead != nil && !lead.firstCopy(p):
			// Others that waited for the same fetch were picked for the
			// block's first copies (FirstCopies): COMING, at once.
			n.st.firstCopyPassed.Add(1)
			refuse(statusComing)
			return
		case !n.origin.reserve(avail, n.cfg.MaxUploadStreams):
			// Each block here was sent often enough: it is spreading
			// through the swarm, and the asker takes it from there
			// (COMING). In a swarm starting at once thousands of nodes
			// ask the one designated fetcher; sending to all of them would
			// make it upload every copy.
			refuse(statusComing)
			return
		default:
			// One of the first copies: it must go out, or the block would
			// be nowhere but here (and this node may be over its share
			// for plain requests), so it queues for a slot — for at most
			// OriginWait, which the asker waits anyway.
			wctx, cancelWait := context.WithTimeout(ctx, max(n.cfg.OriginWait, 0))
			u, preempted, err := n.up.acquireWait(wctx, p, stop)
			cancelWait()
			if err != nil {
				n.origin.unreserve(avail)
				refuse(statusComing)
				return
			}
			hold(u, preempted)
			counted = slices.Clone(avail)
		}
	} else {
		if shared && s.overShare(n.cfg.UploadShare) && !s.rare(q.cids) {
			n.st.shareBusy.Add(1)
			refuse(statusBusy)
			return
		}
		if shared {
			// Each block goes to at most SpreadCopies peers (unless the
			// asker forces it); the copies' holders pass it on.
			cids, spread, hints = n.origin.take(q.cids, n.cfg.SpreadCopies, q.flags&flagForce != 0)
			counted = slices.Clone(cids)
		}
		if len(cids) > 0 {
			u, why, preempted := n.up.acquire(p, stop)
			if u == nil {
				n.origin.unreserve(counted)
				if why == peerBusy {
					n.st.peerBusy.Add(1)
				}
				refuse(statusBusy)
				return
			}
			hold(u, preempted)
		}
	}
	if up != nil {
		defer up.release()
		// The response's store reads and pacing end by its deadline too
		// (get reads ctx when it is called).
		var cancelUp context.CancelFunc
		ctx, cancelUp = context.WithDeadline(ctx, clock.end)
		defer cancelUp()
	}
	// uncount drops one c from counted, reporting whether it was there.
	uncount := func(c []byte) bool {
		i := slices.IndexFunc(counted, func(x []byte) bool { return bytes.Equal(x, c) })
		if i >= 0 {
			counted = slices.Delete(counted, i, i+1)
		}
		return i >= 0
	}
	fail := func(err error) {
		n.origin.unreserve(counted) // not sent
		if clock != nil && isTimeout(err) {
			n.st.uploadsCut.Add(1)
		}
		n.log.Debug("serving blocks", "peer", p.String(), "image", q.image, "err", err)
		st.Reset()
	}
	for _, c := range denied {
		n.st.notFound.Add(1)
		if err := write(appendBlockHeader(nil, statusNotFound, c, 0)); err != nil {
			fail(err)
			return
		}
	}
	if len(spread) > 0 {
		n.st.spreadSent.Add(int64(len(spread)))
		for i, c := range spread {
			var data []byte
			if q.flags&flagHints != 0 {
				data = n.hintsFor(hints[i], p)
			}
			if err := write(append(appendBlockHeader(nil, statusComing, c, len(data)), data...)); err != nil {
				fail(err)
				return
			}
		}
		if len(cids) == 0 {
			if w.Flush() == nil {
				_ = st.Close()
			} else {
				st.Reset()
			}
			return
		}
	}
	n.st.activeUploads.Add(1)
	defer n.st.activeUploads.Add(-1)

	var sentBytes int64
	if shared {
		defer func() { s.uploaded.Add(sentBytes) }()
	}
	var written [][]byte // blocks sent with data
	r := response{
		get: func(c []byte) []byte {
			var d []byte
			clock.exclude(func() { d = get(c) })
			if d == nil && uncount(c) {
				n.origin.unreserve([][]byte{c}) // not sent: no copy
			}
			if d != nil {
				written = append(written, c)
			}
			sentBytes += int64(len(d))
			return d
		},
		write: write,
		pace: func(ctx context.Context, k int) (err error) {
			clock.exclude(func() { err = n.up.pace(ctx, k) })
			return err
		},
		sent: func(c []byte) { uncount(c) },
	}
	if err := n.serve(ctx, cids, r); err != nil {
		fail(err)
		return
	}
	_ = st.SetWriteDeadline(deadline(0))
	if err := w.Flush(); err != nil {
		fail(err)
		return
	}
	_ = st.Close()
	if shared {
		// Whole copies only: p holds these blocks now (it verifies them
		// first), and later askers of them may be sent to it.
		n.origin.delivered(written, p)
	}
}

// readRequest reads a /shoal/block/1 request, within requestTimeout.
func readRequest(st network.Stream) (request, error) {
	_ = st.SetReadDeadline(time.Now().Add(requestTimeout))
	payload, err := readFrame(bufio.NewReaderSize(st, 1024), maxRequestFrame, nil)
	if err != nil {
		return request{}, err
	}
	return decodeRequest(payload)
}

// hintsFor is the hints payload naming the peers in to (but not the
// asker) with the addresses this node knows for them: a COMING frame's
// data, or nil if it names nobody.
func (n *Node) hintsFor(to []peer.ID, asker peer.ID) []byte {
	var infos []peer.AddrInfo
	for _, id := range to {
		if id != asker {
			infos = append(infos, peer.AddrInfo{ID: id, Addrs: n.host.Peerstore().Addrs(id)})
		}
	}
	if len(infos) == 0 {
		return nil
	}
	return encodeHints(infos)
}

// available returns those of cids the node can send now: fetched for the
// request, or in its store.
func (n *Node) available(ctx context.Context, cids [][]byte, fetched map[string][]byte) [][]byte {
	var out [][]byte
	for _, c := range cids {
		if _, ok := fetched[string(c)]; ok {
			out = append(out, c)
		} else if id, ok := blockIDOf(c); ok && n.holds(ctx, id, c) {
			out = append(out, c)
		}
	}
	return out
}

// holds reports whether the store has block id (binary CID c): by Has
// when the store has it, else by reading the block.
func (n *Node) holds(ctx context.Context, id flat.BlockID, c []byte) bool {
	if h, ok := n.cfg.Blocks.(hasser); ok {
		has, err := h.Has(ctx, id)
		return err == nil && has
	}
	return n.cfg.Blocks != nil && n.lookup(ctx, c) != nil
}

// blockIDOf returns the block ID a binary CID names, if it names one.
func blockIDOf(c []byte) (flat.BlockID, bool) {
	cc, err := castCID(c)
	if err != nil {
		return flat.BlockID{}, false
	}
	id, err := flat.IDFromCID(cc)
	return id, err == nil
}

// response is how serve answers: get returns a block's bytes (nil:
// NOT_FOUND), write writes to the stream, pace waits for the token
// bucket, and sent is told of each block whose bytes are all written.
type response struct {
	get   func(c []byte) []byte
	write func([]byte) error
	pace  func(ctx context.Context, n int) error
	sent  func(c []byte)
}

// serve writes one frame per requested CID, with the bytes r.get returns.
func (n *Node) serve(ctx context.Context, cids [][]byte, r response) error {
	for _, c := range cids {
		data := r.get(c)
		if data == nil {
			n.st.notFound.Add(1)
			if err := r.write(appendBlockHeader(nil, statusNotFound, c, 0)); err != nil {
				return err
			}
			continue
		}
		if err := r.write(appendBlockHeader(nil, statusOK, c, len(data))); err != nil {
			return err
		}
		for off := 0; off < len(data); off += paceChunk {
			chunk := data[off:min(off+paceChunk, len(data))]
			if err := r.pace(ctx, len(chunk)); err != nil {
				return err
			}
			if err := r.write(chunk); err != nil {
				return err
			}
			n.st.bytesUp.Add(int64(len(chunk)))
		}
		r.sent(c)
		n.st.blocksServed.Add(1)
	}
	return nil
}

// lookup returns the bytes of the block named by binary CID c, or nil if
// c is not a block ID or the store does not have it.
func (n *Node) lookup(ctx context.Context, c []byte) []byte {
	if n.cfg.Blocks == nil {
		return nil
	}
	id, ok := blockIDOf(c)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, getTimeout)
	defer cancel()
	data, err := n.cfg.Blocks.Get(ctx, id)
	if err != nil || len(data) > flat.MaxBlockSize {
		return nil
	}
	return data
}

// outcome is what one request to one peer produced.
type outcome struct {
	got       map[flat.BlockID][]byte
	notFound  []flat.Block
	firstByte time.Duration // 0 if no byte arrived
	busy      bool
	coming    bool         // the designated fetcher holds the blocks, has no slot
	spread    []flat.Block // answered COMING: sent to enough peers, ask those
	bad       bool         // a wrong block or an unrequested one: penalise
	err       error        // why the request ended early; nil if every block was answered
	// unreachable: no connection to the peer could be made (it is gone),
	// at the stream's opening or, for an ORIGIN request whose connection
	// broke before any answer, when dialed again (lost).
	unreachable bool
	// notMember: the server answered NOT_MEMBER (statusNotMember), which
	// is NOT_FOUND for every block (all are in notFound).
	notMember bool
	// denied: the server answered DENIED (statusDenied): it holds no
	// proof of access from this node for the image.
	denied bool
	// hints are, for blocks of spread, the peers the server's copies
	// reached (flagHints), not including this node or the server.
	hints map[flat.BlockID][]peer.AddrInfo
}

// reqOpts are the optional parts of a request.
type reqOpts struct {
	flags uint64
	// firstByte bounds the wait for the first answer; 0 means
	// Config.FirstByteTimeout.
	firstByte time.Duration
	// onAnswer, if set, is called once, when the first answer header has
	// arrived intact: the peer is alive and serving.
	onAnswer func()
	// deliver, if set, is called with each verified block as it arrives.
	deliver func(flat.BlockID, []byte)
}

// lost reports, after an ORIGIN request to p broke before any answer,
// whether p is gone: its connection is down and a new one cannot be made
// within DesignatedDial; it is then marked unreachable. A peer that only
// dropped the connection (its connection manager trimmed it) is connected
// again, and is not.
func (n *Node) lost(ctx context.Context, p peer.ID) bool {
	if ctx.Err() != nil || n.host.Network().Connectedness(p) == network.Connected {
		return false
	}
	return n.connectWithin(ctx, peer.AddrInfo{ID: p}, DesignatedDial) != nil && ctx.Err() == nil
}

// request asks p for blocks (at most MaxRequestBlocks) of image and reads
// the answers, verifying each block against its ID. For a private image it
// proves access first (prove), and once more if p answers DENIED to a
// proof made earlier (p forgot it: it restarted, or its table was full).
// It returns when every block is answered, the peer ends the stream, a
// deadline passes, a block fails verification, or ctx ends.
func (n *Node) request(ctx context.Context, p peer.ID, image string, blocks []flat.Block, o reqOpts) outcome {
	fresh, err := n.prove(ctx, p, image)
	if err != nil {
		return n.accessOutcome(p, blocks, err)
	}
	out := n.requestOnce(ctx, p, image, blocks, o)
	if out.denied && !fresh && ctx.Err() == nil {
		n.access.forget(p, image)
		if _, err := n.prove(ctx, p, image); err != nil {
			return n.accessOutcome(p, blocks, err)
		}
		out = n.requestOnce(ctx, p, image, blocks, o)
	}
	return out
}

// requestOnce is one request of request, with access proven (or not
// needed).
func (n *Node) requestOnce(ctx context.Context, p peer.ID, image string, blocks []flat.Block, o reqOpts) (out outcome) {
	n.peers.begin(p)
	defer n.peers.end(p)
	firstByte := cmp.Or(o.firstByte, n.cfg.FirstByteTimeout)
	out.got = make(map[flat.BlockID][]byte, len(blocks))
	q := request{image: image, cids: make([][]byte, len(blocks)), flags: o.flags}
	idx := make(map[string]int, len(blocks))
	for i, b := range blocks {
		q.cids[i] = b.ID.CID().Bytes()
		idx[string(q.cids[i])] = i
	}
	answered := make([]bool, len(blocks))

	// Opening the stream (a dial, if need be) is bounded by the dead-peer
	// budget even when the answer may take longer.
	origin := o.flags&flagOrigin != 0
	dial := min(firstByte, n.cfg.FirstByteTimeout)
	if origin && n.host.Network().Connectedness(p) != network.Connected {
		dial = min(dial, DesignatedDial)
	}
	octx, cancel := context.WithTimeout(ctx, dial)
	st, err := n.host.NewStream(octx, p, ProtocolBlock)
	if err != nil && origin && octx.Err() == nil {
		// The connection may have died under the stream (the designated
		// fetcher went away a moment ago): once more, which dials afresh
		// if it did, so that a gone fetcher is found unreachable below.
		// (A plain request just goes to another holder.)
		st, err = n.host.NewStream(octx, p, ProtocolBlock)
	}
	cancel()
	if err != nil {
		out.err = fmt.Errorf("open stream: %w", err)
		if ctx.Err() == nil && n.host.Network().Connectedness(p) != network.Connected {
			// No connection could be made: the peer is gone (or cut
			// off). It is not designated for a while (LiveGroup).
			out.unreachable = true
			n.markUnreachable(p)
		}
		return out
	}
	// The caller giving up resets the stream, which unblocks any read.
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	ok := false
	defer func() {
		if ok {
			_ = st.Close()
		} else {
			st.Reset()
		}
	}()

	start := time.Now()
	_ = st.SetWriteDeadline(start.Add(n.cfg.FirstByteTimeout))
	if _, err := st.Write(appendFrame(nil, q.encode())); err != nil {
		out.err = fmt.Errorf("send request: %w", err)
		out.unreachable = origin && n.lost(ctx, p)
		return out
	}
	_ = st.CloseWrite()
	_ = st.SetReadDeadline(start.Add(firstByte))
	r := bufio.NewReaderSize(st, 64<<10)
	scratch := make([]byte, maxCIDLen)
	left := len(blocks)
	for left > 0 {
		h, err := readBlockHeader(r, scratch)
		if out.firstByte == 0 && (err == nil || !isTimeout(err)) {
			out.firstByte = max(time.Since(start), time.Nanosecond)
		}
		switch {
		case err == nil:
			if o.onAnswer != nil {
				o.onAnswer()
				o.onAnswer = nil
			}
		case errors.Is(err, io.EOF):
			out.err = fmt.Errorf("peer ended the answer with %d of %d blocks unanswered", left, len(blocks))
			return out
		case ctx.Err() != nil:
			out.err = ctx.Err()
			return out
		default:
			out.err = fmt.Errorf("read answer: %w", err)
			if origin && left == len(blocks) && !isTimeout(err) {
				// Broken before any answer: the connection died under
				// the stream (the designated fetcher went away?).
				out.unreachable = n.lost(ctx, p)
			}
			return out
		}
		if h.status == statusNotMember {
			// NOT_FOUND for every block, and: the server is not a member
			// of the image's swarm (do not designate it).
			if len(h.cid) != 0 || o.flags&flagMember == 0 || left != len(blocks) {
				out.err = fmt.Errorf("%w: NOT_MEMBER frame out of place", ErrMalformed)
				return out
			}
			out.notMember = true
			out.notFound = append(out.notFound, blocks...)
			ok = true
			return out
		}
		if h.status == statusDenied {
			if len(h.cid) != 0 || left != len(blocks) {
				out.err = fmt.Errorf("%w: DENIED frame out of place", ErrMalformed)
				return out
			}
			n.st.deniedRecv.Add(1)
			n.access.forget(p, image)
			out.denied = true
			out.err = fmt.Errorf("%w (%s)", ErrDenied, image)
			return out
		}
		if h.status == statusBusy || (h.status == statusComing && len(h.cid) == 0) {
			// A COMING with no CID answers ORIGIN requests only; to any
			// other it means what BUSY does.
			out.busy = true
			out.coming = h.status == statusComing && o.flags&flagOrigin != 0
			out.err = ErrBusy
			if out.coming {
				out.err = ErrComing
			}
			return out
		}
		i, known := idx[string(h.cid)]
		if !known || answered[i] {
			out.bad = true
			out.err = fmt.Errorf("%w: answer for a block not asked for", ErrBadBlock)
			return out
		}
		answered[i] = true
		left--
		b := blocks[i]
		if h.status == statusComing {
			out.spread = append(out.spread, b)
			if h.dataLen > 0 {
				raw := make([]byte, h.dataLen)
				if _, err := io.ReadFull(r, raw); err != nil {
					out.err = fmt.Errorf("read hints for block %s: %w", b.ID, err)
					return out
				}
				hs, err := decodeHints(raw)
				if err != nil {
					out.bad = true
					out.err = fmt.Errorf("%w: hints for block %s: %v", ErrBadBlock, b.ID, err)
					return out
				}
				hs = slices.DeleteFunc(hs, func(h peer.AddrInfo) bool { return h.ID == n.ID() || h.ID == p })
				if len(hs) > 0 {
					if out.hints == nil {
						out.hints = map[flat.BlockID][]peer.AddrInfo{}
					}
					out.hints[b.ID] = hs
				}
			}
			_ = st.SetReadDeadline(time.Now().Add(n.cfg.FrameTimeout))
			continue
		}
		if h.status == statusNotFound {
			out.notFound = append(out.notFound, b)
			_ = st.SetReadDeadline(time.Now().Add(n.cfg.FrameTimeout))
			continue
		}
		if h.dataLen != int(b.ULen) {
			out.bad = true
			out.err = fmt.Errorf("%w: block %s of %d bytes, want %d", ErrBadBlock, b.ID, h.dataLen, b.ULen)
			return out
		}
		_ = st.SetReadDeadline(time.Now().Add(n.cfg.FrameTimeout + time.Duration(h.dataLen/minTransferRate)*time.Second))
		data := make([]byte, h.dataLen)
		if _, err := io.ReadFull(r, data); err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			out.err = fmt.Errorf("read block %s: %w", b.ID, err)
			return out
		}
		if !b.ID.Verify(data) {
			out.bad = true
			out.err = fmt.Errorf("%w: block %s", ErrBadBlock, b.ID)
			return out
		}
		out.got[b.ID] = data
		if o.deliver != nil {
			o.deliver(b.ID, data)
		}
		n.st.bytesDown.Add(int64(len(data)))
		n.st.blocksFetched.Add(1)
		_ = st.SetReadDeadline(time.Now().Add(n.cfg.FrameTimeout))
	}
	ok = true
	return out
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}
