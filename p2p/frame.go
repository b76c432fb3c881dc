package p2p

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/shoal-project/shoal/flat"
)

// Wire limits. Every length read from the wire is checked against one of
// these before anything is allocated for it.
const (
	// MaxRequestBlocks is the most block CIDs one /shoal/block/1 request may
	// name. Clients split larger batches.
	MaxRequestBlocks = 256
	// MaxBlockFrame is the largest block a response frame may carry.
	MaxBlockFrame = flat.MaxBlockSize

	maxRequestFrame = 16 << 10          // request payload: digest + up to 256 CIDs of ≤ 64 bytes
	maxHelloFrame   = (1 << 20) + 1<<10 // have hello: labels + a bitmap of up to 8 Mi blocks
	maxUpdateFrame  = 64 << 10          // have update: set/clear position lists
	maxCIDLen       = 64                // a CIDv1 sha2-256 is 36 bytes
	maxDigestLen    = 256               // "sha256:" + 64 hex is 71
	maxLabelLen     = 64                // zone and rack labels
	maxBitmapBlocks = 8 << 20           // blocks in one image's have bitmap
	maxUpdateCount  = 8 << 10           // positions in one update message
	maxHintFrame    = 4 << 10           // hints payload of a COMING frame
	maxHintPeerLen  = 128               // a peer ID (an Ed25519 one is 38 bytes)
	maxHintAddrs    = 4                 // addresses per hinted peer
	maxHintAddrLen  = 128               // one binary multiaddr
)

// MaxHints is the most peers a COMING frame names for its block: the
// last MaxHints peers the server's copies of the block reached
// (AddRecipient).
const MaxHints = 4

// Status of a block response frame.
const (
	statusOK       byte = 0
	statusNotFound byte = 1
	statusBusy     byte = 2
	// statusComing, with no CID, answers an ORIGIN request whose blocks
	// the designated fetcher now holds (it fetched them, or had them) but
	// has no upload slot to send: the asker takes them from the swarm as
	// they spread. With a CID it answers that block of a plain request:
	// the server has sent it to enough peers (Spread), and the asker takes
	// it from them. If the request set flagHints, the frame may carry, as
	// its data, the peers the server's copies reached (a hints payload,
	// at most maxHintFrame bytes; see encodeHints).
	statusComing byte = 3
	// statusNotMember, with no CID, is the single frame of an answer from
	// a node that is not a member of the image's swarm (it has neither
	// joined the image nor is opening it: it left, or restarted) to a
	// request that set flagMember: an ORIGIN request, which it will not
	// fetch for, or a plain one for blocks it holds none of. It means
	// NOT_FOUND for every block, and: do not designate this node for the
	// image.
	statusNotMember byte = 4
	// statusDenied, with no CID, is the single frame of an answer to a
	// request for a private image from a peer that holds no proof of
	// access for it here (ProtocolAccess): prove, then ask again.
	statusDenied byte = 5
)

// Have message types.
const (
	msgHello  byte = 1
	msgUpdate byte = 2
)

var (
	// ErrFrameTooLarge is returned when a length field exceeds its limit.
	ErrFrameTooLarge = errors.New("p2p: frame exceeds its size limit")
	// ErrMalformed is returned for a frame that does not decode.
	ErrMalformed = errors.New("p2p: malformed frame")
)

// frameReader is what the decoders read from: a bufio.Reader over a
// stream, or a bytes.Reader in tests.
type frameReader interface {
	io.Reader
	io.ByteReader
}

// frameChunk is the most readFrame allocates for a frame ahead of its
// bytes: a length is only the peer's claim until the bytes are there.
const frameChunk = 4 << 10

// readFrame reads one length-prefixed frame (uvarint length, then that many
// bytes) into buf, growing it if needed, and returns the payload. A length
// above limit is rejected with ErrFrameTooLarge before any byte of the payload
// is read or allocated. A frame larger than buf grows as its bytes arrive,
// doubling from frameChunk, so that a peer that sends a length and then
// nothing (or a little) holds no more memory than it sent, however long
// the read deadline.
func readFrame(r frameReader, limit int, buf []byte) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, err // a clean end between frames
		}
		return nil, ErrMalformed
	}
	if n > uint64(limit) {
		return nil, ErrFrameTooLarge
	}
	if uint64(cap(buf)) >= n {
		buf = buf[:n]
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, io.ErrUnexpectedEOF
		}
		return buf, nil
	}
	buf = buf[:0]
	for uint64(len(buf)) < n {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(n, uint64(max(2*cap(buf), frameChunk))))
			copy(grown, buf)
			buf = grown
		}
		k, err := io.ReadFull(r, buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+k]
		if err != nil {
			return nil, io.ErrUnexpectedEOF
		}
	}
	return buf, nil
}

// appendFrame appends payload to dst as one length-prefixed frame.
func appendFrame(dst, payload []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(payload)))
	return append(dst, payload...)
}

// decoder walks a payload; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = ErrMalformed
	}
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	// Overlong encodings are refused, so every message has one encoding.
	if n <= 0 || n != uvarintLen(v) {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func uvarintLen(v uint64) int {
	n := 1
	for ; v >= 0x80; v >>= 7 {
		n++
	}
	return n
}

// bytes returns the next length-prefixed field, at most max bytes long. It
// aliases the payload.
func (d *decoder) bytes(max int) []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(max) || n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func appendBytes(dst, v []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(v)))
	return append(dst, v...)
}

// Request flags: an optional uvarint after the CIDs. A request without
// flags is encoded exactly as before they existed; a flags field of zero is
// not a valid encoding (every message has one encoding). Unknown bits are
// kept and ignored.
const (
	// flagOrigin asks the server, as the blocks' designated fetcher, to
	// fetch the blocks it does not hold from their origin (through its
	// OriginFetcher) and then serve them.
	flagOrigin uint64 = 1 << 0
	// flagForce asks the server to send the blocks even if it has sent
	// them to enough peers already (Spread): the asker answered COMING
	// for them waited SpreadWait and sees no other holder (ForceSpread).
	flagForce uint64 = 1 << 1
	// flagHints says the asker reads hints: the server may name, in the
	// COMING frame of each block it has sent to enough peers, the peers
	// its copies reached, so that the asker can ask them even when they
	// are not among its have sessions. A server that does not know the
	// flag ignores it, and an asker that does not set it gets COMING
	// frames without data, as before.
	flagHints uint64 = 1 << 2
	// flagMember says the asker reads NOT_MEMBER: a server that is not a
	// member of the image's swarm may answer with that single frame
	// (statusNotMember). A server that does not know the flag ignores it
	// and answers NOT_FOUND, and an asker that does not set it gets
	// NOT_FOUND frames, as before.
	flagMember uint64 = 1 << 3
)

// request is a /shoal/block/1 request: the image the blocks are wanted for
// (its name in the swarm: an ORIGIN request needs it to find the blocks in
// the image's index, and the server serves only blocks of images the asker
// may read there), their CIDs in binary form, and flags.
type request struct {
	image string
	cids  [][]byte
	flags uint64
}

func (q *request) encode() []byte {
	p := appendBytes(nil, []byte(q.image))
	p = binary.AppendUvarint(p, uint64(len(q.cids)))
	for _, c := range q.cids {
		p = appendBytes(p, c)
	}
	if q.flags != 0 {
		p = binary.AppendUvarint(p, q.flags)
	}
	return p
}

func decodeRequest(p []byte) (request, error) {
	d := decoder{b: p}
	var q request
	q.image = string(d.bytes(maxDigestLen))
	n := d.uvarint()
	if n > MaxRequestBlocks {
		return request{}, fmt.Errorf("%w: %d blocks in one request (limit %d)", ErrMalformed, n, MaxRequestBlocks)
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		q.cids = append(q.cids, d.bytes(maxCIDLen))
	}
	if d.err == nil && len(d.b) != 0 {
		if q.flags = d.uvarint(); q.flags == 0 {
			d.fail() // an explicit zero is a second encoding of "no flags"
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail()
	}
	if d.err != nil {
		return request{}, d.err
	}
	return q, nil
}

// appendBlockHeader appends the header of a response frame: status, CID,
// and the length of the data that follows it.
func appendBlockHeader(dst []byte, status byte, c []byte, dataLen int) []byte {
	dst = append(dst, status)
	dst = appendBytes(dst, c)
	return binary.AppendUvarint(dst, uint64(dataLen))
}

// blockHeader is a response frame's header. cid aliases the caller's
// scratch buffer.
type blockHeader struct {
	status  byte
	cid     []byte
	dataLen int
}

// readBlockHeader reads a response frame's header into scratch (which must
// have room for maxCIDLen bytes). The data (dataLen bytes) follows on r. A
// CID or data length over its limit is rejected before anything is read
// into memory for it.
func readBlockHeader(r frameReader, scratch []byte) (blockHeader, error) {
	var h blockHeader
	st, err := r.ReadByte()
	if err != nil {
		return h, err // io.EOF: the server is done
	}
	if st > statusDenied {
		return h, fmt.Errorf("%w: status %d", ErrMalformed, st)
	}
	h.status = st
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return h, ErrMalformed
	}
	if n > maxCIDLen {
		return h, ErrFrameTooLarge
	}
	h.cid = scratch[:n]
	if _, err := io.ReadFull(r, h.cid); err != nil {
		return h, io.ErrUnexpectedEOF
	}
	dl, err := binary.ReadUvarint(r)
	if err != nil {
		return h, ErrMalformed
	}
	if dl > MaxBlockFrame {
		return h, ErrFrameTooLarge
	}
	if st == statusComing && n > 0 && dl > maxHintFrame {
		return h, ErrFrameTooLarge
	}
	if st != statusOK && dl != 0 && (st != statusComing || n == 0) {
		return h, fmt.Errorf("%w: %d data bytes with status %d", ErrMalformed, dl, st)
	}
	h.dataLen = int(dl)
	return h, nil
}

// encodeHints is the data of a COMING frame with hints: a count, then for
// each peer its ID and up to maxHintAddrs of its addresses (binary
// multiaddrs), each a length-prefixed byte string. Peers or addresses
// over the limits are left out, so the payload stays under maxHintFrame.
func encodeHints(hints []peer.AddrInfo) []byte {
	var keep []peer.AddrInfo
	for _, h := range hints {
		if len(keep) < MaxHints && len(h.ID) > 0 && len(h.ID) <= maxHintPeerLen {
			keep = append(keep, h)
		}
	}
	p := binary.AppendUvarint(nil, uint64(len(keep)))
	for _, h := range keep {
		p = appendBytes(p, []byte(h.ID))
		var addrs [][]byte
		for _, a := range h.Addrs {
			if b := a.Bytes(); len(addrs) < maxHintAddrs && len(b) > 0 && len(b) <= maxHintAddrLen {
				addrs = append(addrs, b)
			}
		}
		p = binary.AppendUvarint(p, uint64(len(addrs)))
		for _, b := range addrs {
			p = appendBytes(p, b)
		}
	}
	return p
}

// decodeHints decodes encodeHints' payload. A peer ID or address that
// does not parse, or a count over its limit, makes the whole payload
// malformed: it comes from a peer that does not speak the protocol.
func decodeHints(p []byte) ([]peer.AddrInfo, error) {
	d := decoder{b: p}
	n := d.uvarint()
	if d.err == nil && n > MaxHints {
		return nil, fmt.Errorf("%w: %d hints (limit %d)", ErrMalformed, n, MaxHints)
	}
	var out []peer.AddrInfo
	for i := uint64(0); i < n && d.err == nil; i++ {
		id, err := peer.IDFromBytes(d.bytes(maxHintPeerLen))
		if d.err == nil && err != nil {
			return nil, fmt.Errorf("%w: hinted peer: %v", ErrMalformed, err)
		}
		k := d.uvarint()
		if d.err == nil && k > maxHintAddrs {
			return nil, fmt.Errorf("%w: %d addresses for one hinted peer (limit %d)", ErrMalformed, k, maxHintAddrs)
		}
		h := peer.AddrInfo{ID: id}
		for j := uint64(0); j < k && d.err == nil; j++ {
			b := d.bytes(maxHintAddrLen)
			if d.err != nil {
				break
			}
			a, err := ma.NewMultiaddrBytes(b)
			if err != nil {
				return nil, fmt.Errorf("%w: hinted address: %v", ErrMalformed, err)
			}
			h.Addrs = append(h.Addrs, a)
		}
		out = append(out, h)
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail()
	}
	if d.err != nil {
		return nil, d.err
	}
	return out, nil
}

// hello opens a have stream: who the sender is (labels), which image, and
// which of its blocks (by position in the block table) it holds.
type hello struct {
	image   string
	zone    string
	rack    string
	nblocks int
	bits    bitmap
}

func (h *hello) encode() []byte {
	p := []byte{msgHello}
	p = appendBytes(p, []byte(h.image))
	p = appendBytes(p, []byte(h.zone))
	p = appendBytes(p, []byte(h.rack))
	p = binary.AppendUvarint(p, uint64(h.nblocks))
	return append(p, h.bits...)
}

func decodeHello(p []byte) (hello, error) {
	d := decoder{b: p}
	if d.byte() != msgHello {
		return hello{}, fmt.Errorf("%w: not a hello", ErrMalformed)
	}
	var h hello
	h.image = string(d.bytes(maxDigestLen))
	h.zone = string(d.bytes(maxLabelLen))
	h.rack = string(d.bytes(maxLabelLen))
	n := d.uvarint()
	if d.err != nil {
		return hello{}, d.err
	}
	if n > maxBitmapBlocks {
		return hello{}, fmt.Errorf("%w: %d blocks (limit %d)", ErrFrameTooLarge, n, maxBitmapBlocks)
	}
	h.nblocks = int(n)
	if len(d.b) != bitmapLen(h.nblocks) {
		return hello{}, fmt.Errorf("%w: bitmap of %d bytes for %d blocks", ErrMalformed, len(d.b), n)
	}
	h.bits = newBitmap(h.nblocks)
	copy(h.bits, d.b)
	if !h.bits.clean(h.nblocks) {
		return hello{}, fmt.Errorf("%w: bits set past block %d", ErrMalformed, n)
	}
	return h, nil
}

// update changes a have bitmap: positions newly held and positions dropped,
// each strictly increasing. An empty update is a keepalive.
type update struct {
	set, clear []int
}

func appendPositions(p []byte, pos []int) []byte {
	p = binary.AppendUvarint(p, uint64(len(pos)))
	prev := -1
	for _, v := range pos {
		p = binary.AppendUvarint(p, uint64(v-prev-1))
		prev = v
	}
	return p
}

func (u *update) encode() []byte {
	p := []byte{msgUpdate}
	p = appendPositions(p, u.set)
	return appendPositions(p, u.clear)
}

func (d *decoder) positions(nblocks int) []int {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	// Each position takes at least one byte, which bounds the allocation.
	if n > maxUpdateCount || n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	out := make([]int, 0, n)
	prev := -1
	for i := uint64(0); i < n; i++ {
		delta := d.uvarint()
		if d.err != nil || delta >= uint64(nblocks) {
			d.fail()
			return nil
		}
		v := prev + 1 + int(delta)
		if v >= nblocks {
			d.fail()
			return nil
		}
		out = append(out, v)
		prev = v
	}
	return out
}

// decodeUpdate decodes an update for an image of nblocks blocks; positions
// outside it are an error.
func decodeUpdate(p []byte, nblocks int) (update, error) {
	d := decoder{b: p}
	if d.byte() != msgUpdate {
		return update{}, fmt.Errorf("%w: not an update", ErrMalformed)
	}
	var u update
	u.set = d.positions(nblocks)
	u.clear = d.positions(nblocks)
	if d.err == nil && len(d.b) != 0 {
		d.fail()
	}
	if d.err != nil {
		return update{}, d.err
	}
	return u, nil
}

// bitmap is a set of block positions, bit i%8 of byte i/8.
type bitmap []byte

func bitmapLen(n int) int { return (n + 7) / 8 }

func newBitmap(n int) bitmap { return make(bitmap, bitmapLen(n)) }

func (b bitmap) has(i int) bool {
	return i >= 0 && i/8 < len(b) && b[i/8]&(1<<(i%8)) != 0
}

// set sets or clears bit i and reports whether it changed.
func (b bitmap) set(i int, v bool) bool {
	if b.has(i) == v {
		return false
	}
	b[i/8] ^= 1 << (i % 8)
	return true
}

func (b bitmap) count() int {
	n := 0
	for _, x := range b {
		for ; x != 0; x &= x - 1 {
			n++
		}
	}
	return n
}

// clean reports whether no bit at or past n is set.
func (b bitmap) clean(n int) bool {
	if n%8 == 0 {
		return true
	}
	return b[len(b)-1]>>(n%8) == 0
}

// castCID parses a CID from its binary form without accepting trailing
// bytes.
func castCID(b []byte) (cid.Cid, error) {
	n, c, err := cid.CidFromBytes(b)
	if err != nil {
		return cid.Undef, err
	}
	if n != len(b) {
		return cid.Undef, ErrMalformed
	}
	return c, nil
}
