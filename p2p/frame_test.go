package p2p

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/memcheck"
)

func TestRequestRoundTrip(t *testing.T) {
	t.Parallel()
	q := request{image: "sha256:" + strings.Repeat("ab", 32)}
	for i := range MaxRequestBlocks {
		q.cids = append(q.cids, flat.Sum([]byte{byte(i), byte(i >> 8)}).CID().Bytes())
	}
	p := q.encode()
	if len(p) > maxRequestFrame {
		t.Fatalf("a full request is %d bytes, over the %d limit", len(p), maxRequestFrame)
	}
	got, err := decodeRequest(p)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, q) {
		t.Fatal("request changed in a round trip")
	}
	q.cids = append(q.cids, q.cids[0])
	if _, err := decodeRequest(q.encode()); !errors.Is(err, ErrMalformed) {
		t.Fatalf("257 blocks: %v, want ErrMalformed", err)
	}
}

// Flags ride after the CIDs; a request without flags is encoded as before
// they existed, and an explicit zero is refused (one encoding per message).
func TestRequestFlags(t *testing.T) {
	t.Parallel()
	plain := request{image: "sha256:" + strings.Repeat("cd", 32), cids: [][]byte{flat.Sum([]byte("x")).CID().Bytes()}}
	old := appendBytes(nil, []byte(plain.image))
	old = binary.AppendUvarint(old, 1)
	old = appendBytes(old, plain.cids[0])
	if !bytes.Equal(plain.encode(), old) {
		t.Fatal("a request without flags is not encoded as before")
	}
	for _, flags := range []uint64{flagOrigin, flagOrigin | 1<<40} {
		q := plain
		q.flags = flags
		p := q.encode()
		if len(p) <= len(old) {
			t.Fatalf("flags %#x not encoded", flags)
		}
		got, err := decodeRequest(p)
		if err != nil || !reflect.DeepEqual(got, q) {
			t.Fatalf("flags %#x: %+v, %v", flags, got, err)
		}
	}
	for name, p := range map[string][]byte{
		"explicit zero":     append(slices.Clone(old), 0),
		"bytes after flags": append(slices.Clone(old), 1, 0),
		"overlong flags":    append(slices.Clone(old), 0x81, 0x00),
		"truncated flags":   append(slices.Clone(old), 0x81),
	} {
		if _, err := decodeRequest(p); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
}

func TestHaveRoundTrip(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 1, 7, 8, 9, 1000} {
		h := hello{image: "sha256:00", zone: "z", rack: "r", nblocks: n, bits: newBitmap(n)}
		for i := 0; i < n; i += 3 {
			h.bits.set(i, true)
		}
		got, err := decodeHello(h.encode())
		if err != nil {
			t.Fatalf("%d blocks: %v", n, err)
		}
		if !reflect.DeepEqual(got, h) {
			t.Fatalf("%d blocks: hello changed in a round trip", n)
		}
		if n%8 != 0 {
			bad := h.encode()
			bad[len(bad)-1] |= 0x80 // a bit past the last block
			if _, err := decodeHello(bad); !errors.Is(err, ErrMalformed) {
				t.Fatalf("%d blocks, stray bit: %v", n, err)
			}
		}
	}
	u := update{set: []int{0, 1, 5, 999}, clear: []int{2, 3}}
	got, err := decodeUpdate(u.encode(), 1000)
	if err != nil || !reflect.DeepEqual(got, u) {
		t.Fatalf("update round trip: %+v, %v", got, err)
	}
	if _, err := decodeUpdate(u.encode(), 999); !errors.Is(err, ErrMalformed) {
		t.Fatalf("position past the image: %v", err)
	}
	var empty update
	if got, err := decodeUpdate(empty.encode(), 0); err != nil || len(got.set)+len(got.clear) != 0 {
		t.Fatalf("keepalive: %+v, %v", got, err)
	}
}

func TestBitmap(t *testing.T) {
	t.Parallel()
	b := newBitmap(20)
	if !b.set(19, true) || b.set(19, true) || !b.has(19) || b.has(18) || b.has(20) || b.has(-1) {
		t.Fatal("set/has")
	}
	b.set(0, true)
	if b.count() != 2 || !b.set(0, false) || b.count() != 1 {
		t.Fatal("count")
	}
}

// A length field far beyond the limit is refused before anything is
// allocated for it, by the frame reader and by the block header reader.
func TestOversizedFramesDoNotAllocate(t *testing.T) {
	huge := binary.AppendUvarint(nil, 1<<62)
	r := bytes.NewReader(nil)
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(huge)
		if _, err := readFrame(r, maxHelloFrame, nil); err != ErrFrameTooLarge {
			t.Fatalf("readFrame: %v", err)
		}
	})
	if allocs != 0 {
		t.Errorf("readFrame allocated %v times for an oversized frame", allocs)
	}

	cidBytes := flat.Sum(nil).CID().Bytes()
	hdr := appendBlockHeader(nil, statusOK, cidBytes, 0)
	hdr = append(hdr[:len(hdr)-1], binary.AppendUvarint(nil, 1<<40)...)
	scratch := make([]byte, maxCIDLen)
	allocs = testing.AllocsPerRun(100, func() {
		r.Reset(hdr)
		if _, err := readBlockHeader(r, scratch); err != ErrFrameTooLarge {
			t.Fatalf("readBlockHeader: %v", err)
		}
	})
	if allocs != 0 {
		t.Errorf("readBlockHeader allocated %v times for an oversized block", allocs)
	}

	// A hello claiming more blocks than allowed.
	h := []byte{msgHello, 0, 0, 0}
	h = binary.AppendUvarint(h, maxBitmapBlocks+1)
	if _, err := decodeHello(h); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("decodeHello: %v", err)
	}
}

// FuzzReadFrame feeds arbitrary bytes to every decoder of the wire
// protocols. None may panic, allocate past its limits, or accept what it
// cannot re-encode to the same bytes.
func FuzzReadFrame(f *testing.F) {
	q := request{image: "sha256:" + strings.Repeat("0", 64), cids: [][]byte{flat.Sum([]byte("a")).CID().Bytes()}}
	f.Add(appendFrame(nil, q.encode()))
	qo := q
	qo.flags = flagOrigin
	f.Add(appendFrame(nil, qo.encode()))
	h := hello{image: "sha256:1", zone: "z", nblocks: 10, bits: newBitmap(10)}
	h.bits.set(9, true)
	f.Add(appendFrame(nil, h.encode()))
	u := update{set: []int{1, 2}, clear: []int{7}}
	f.Add(appendFrame(nil, u.encode()))
	f.Add(appendBlockHeader(nil, statusOK, q.cids[0], 3))
	f.Add(appendBlockHeader(nil, statusBusy, nil, 0))
	hint, err := ma.NewMultiaddr("/ip4/127.0.0.1/tcp/4001")
	if err != nil {
		f.Fatal(err)
	}
	hp := encodeHints([]peer.AddrInfo{{ID: peer.ID(flat.Sum([]byte("p")).CID().Hash()), Addrs: []ma.Multiaddr{hint}}})
	f.Add(appendFrame(nil, hp))
	f.Add(append(appendBlockHeader(nil, statusComing, q.cids[0], len(hp)), hp...))
	f.Add(binary.AppendUvarint(nil, 1<<63))
	f.Add([]byte{})
	// A length that fits the limit and nothing behind it: allocated whole
	// before the reader grew frames as their bytes arrive.
	f.Add(binary.AppendUvarint(nil, maxUpdateFrame))

	f.Fuzz(func(t *testing.T, data []byte) {
		frameCeiling.Check(t, len(data), func() { fuzzFrame(t, data) })
	})
}

// frameCeiling bounds what reading and decoding frames of n bytes may
// allocate: the payload (twice, as it grows), what the decoders keep of
// it, and frameChunk and a few small buffers.
var frameCeiling = memcheck.Ceiling{PerByte: 8, Const: 32 << 10}

func fuzzFrame(t *testing.T, data []byte) {
	r := bytes.NewReader(data)
	if p, err := readFrame(r, maxUpdateFrame, nil); err == nil {
		if len(p) > maxUpdateFrame {
			t.Fatalf("frame of %d bytes passed a %d limit", len(p), maxUpdateFrame)
		}
		if q, err := decodeRequest(p); err == nil {
			if len(q.cids) > MaxRequestBlocks {
				t.Fatalf("%d cids", len(q.cids))
			}
			if !bytes.Equal(q.encode(), p) {
				t.Fatal("request does not re-encode to its bytes")
			}
		}
		if h, err := decodeHello(p); err == nil {
			if !bytes.Equal(h.encode(), p) {
				t.Fatal("hello does not re-encode to its bytes")
			}
		}
		if u, err := decodeUpdate(p, 1<<20); err == nil {
			if !bytes.Equal(u.encode(), p) {
				t.Fatal("update does not re-encode to its bytes")
			}
		}
		if hs, err := decodeHints(p); err == nil {
			if len(hs) > MaxHints || len(p) > maxHintFrame {
				t.Fatalf("%d hints in %d bytes passed the limits", len(hs), len(p))
			}
			if !bytes.Equal(encodeHints(hs), p) {
				t.Fatal("hints do not re-encode to their bytes")
			}
		}
	} else if !errors.Is(err, ErrFrameTooLarge) && !errors.Is(err, ErrMalformed) &&
		!errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("readFrame: unexpected error %v", err)
	}

	r.Reset(data)
	scratch := make([]byte, maxCIDLen)
	for range 4 {
		hd, err := readBlockHeader(r, scratch)
		if err != nil {
			break
		}
		if hd.dataLen > MaxBlockFrame || len(hd.cid) > maxCIDLen {
			t.Fatalf("header past limits: %d data bytes, %d cid bytes", hd.dataLen, len(hd.cid))
		}
		if _, err := io.CopyN(io.Discard, r, int64(hd.dataLen)); err != nil {
			break
		}
	}
}

func TestImageKey(t *testing.T) {
	t.Parallel()
	digest := "sha256:" + strings.Repeat("0123456789abcdef", 4)
	c, err := ImageKey(digest)
	if err != nil {
		t.Fatal(err)
	}
	if c.Version() != 1 || c.Type() != cid.Raw {
		t.Fatalf("%s: want CIDv1 raw", c)
	}
	dec, err := multihash.Decode(c.Hash())
	if err != nil || dec.Code != multihash.SHA2_256 || "sha256:"+bytesHex(dec.Digest) != digest {
		t.Fatalf("%s does not carry the digest", c)
	}
	for _, bad := range []string{"", "sha256:", "sha512:" + strings.Repeat("0", 128), "sha256:" + strings.Repeat("G", 64), "sha256:" + strings.Repeat("A", 64)} {
		if _, err := ImageKey(bad); !errors.Is(err, ErrBadDigest) {
			t.Errorf("ImageKey(%q): %v", bad, err)
		}
	}
}

func bytesHex(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, x := range b {
		out = append(out, digits[x>>4], digits[x&15])
	}
	return string(out)
}

func TestParsePSK(t *testing.T) {
	t.Parallel()
	key := bytes.Repeat([]byte{0xa5}, 32)
	hexKey := bytesHex(key)
	tests := []struct {
		name string
		in   string
		ok   bool
	}{
		{"v1 base16", "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey + "\n", true},
		{"v1 base64", "/key/swarm/psk/1.0.0/\n/base64/\npaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaU=\n", true},
		{"v1 bin", "/key/swarm/psk/1.0.0/\n/bin/\n" + string(key), true},
		{"raw hex", "  " + hexKey + "\n", true},
		{"short hex", hexKey[:62], false},
		{"not hex", strings.Repeat("x", 64), false},
		{"unknown encoding", "/key/swarm/psk/1.0.0/\n/base58/\nabc\n", false},
		{"empty", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, err := ParsePSK([]byte(tc.in))
			if tc.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if tc.ok && !bytes.Equal(k, key) {
				t.Fatalf("key = %x", []byte(k))
			}
		})
	}
}

// The identity is created once, with mode 0600, and reused.
func TestIdentityPersists(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	log := testLogger(t)
	k1, err := loadIdentity(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, IdentityFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("identity file mode %v, want 0600", fi.Mode().Perm())
	}
	k2, err := loadIdentity(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if !k1.Equals(k2) {
		t.Fatal("a second start made a new identity")
	}
	n := startNode(t, Config{IdentityDir: dir})
	if id, _ := peer.IDFromPrivateKey(k1); n.ID() != id {
		t.Errorf("node ID %s, want %s from the identity file", n.ID(), id)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("state dir holds %d files, want only the key", len(entries))
	}
}

// A COMING frame's hints name up to MaxHints peers with up to
// maxHintAddrs addresses each; what is over the limits is left out when
// encoding and refused when decoding, and the payload fits maxHintFrame.
func TestHintsRoundTrip(t *testing.T) {
	t.Parallel()
	addr := func(port int) ma.Multiaddr {
		a, err := ma.NewMultiaddr(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	ids := testPeerIDs(t, 1, MaxHints+3)
	var in []peer.AddrInfo
	for i := range MaxHints + 2 {
		h := peer.AddrInfo{ID: ids[i]}
		for j := range i + 1 {
			h.Addrs = append(h.Addrs, addr(4000+j))
		}
		in = append(in, h)
	}
	p := encodeHints(in)
	got, err := decodeHints(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != MaxHints {
		t.Fatalf("%d hints decoded, want the first %d", len(got), MaxHints)
	}
	for i, h := range got {
		if h.ID != in[i].ID || len(h.Addrs) != min(i+1, maxHintAddrs) || !h.Addrs[0].Equal(in[i].Addrs[0]) {
			t.Errorf("hint %d: %v with %d addresses, want %v with %d", i, h.ID, len(h.Addrs), in[i].ID, min(i+1, maxHintAddrs))
		}
	}
	// The largest payload the limits allow fits the frame limit.
	worst := binary.AppendUvarint(nil, MaxHints)
	for range MaxHints {
		worst = appendBytes(worst, make([]byte, maxHintPeerLen))
		worst = binary.AppendUvarint(worst, maxHintAddrs)
		for range maxHintAddrs {
			worst = appendBytes(worst, make([]byte, maxHintAddrLen))
		}
	}
	if len(worst) > maxHintFrame {
		t.Errorf("the largest hints payload is %d bytes, over maxHintFrame (%d)", len(worst), maxHintFrame)
	}
	if p := encodeHints(nil); len(p) != 1 {
		t.Errorf("no hints: %d bytes", len(p))
	}

	id := []byte(ids[MaxHints+2])
	one := func(peerID []byte, addrs ...[]byte) []byte {
		p := binary.AppendUvarint(nil, 1)
		p = appendBytes(p, peerID)
		p = binary.AppendUvarint(p, uint64(len(addrs)))
		for _, a := range addrs {
			p = appendBytes(p, a)
		}
		return p
	}
	if _, err := decodeHints(one(id, addr(1).Bytes())); err != nil {
		t.Fatalf("one hint: %v", err)
	}
	for name, p := range map[string][]byte{
		"empty":            nil,
		"too many peers":   binary.AppendUvarint(nil, MaxHints+1),
		"count over data":  binary.AppendUvarint(nil, 2),
		"bad peer ID":      one([]byte("not a peer")),
		"bad address":      one(id, []byte{0xff, 0xff}),
		"too many addrs":   one(id, addr(1).Bytes(), addr(2).Bytes(), addr(3).Bytes(), addr(4).Bytes(), addr(5).Bytes()),
		"trailing bytes":   append(one(id), 0),
		"peer ID too long": one(make([]byte, maxHintPeerLen+1)),
	} {
		if _, err := decodeHints(p); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
}

// A COMING frame may carry data (hints) only with a CID, and no more
// than maxHintFrame bytes of it; other statuses but OK carry none.
func TestBlockHeaderHints(t *testing.T) {
	t.Parallel()
	c := flat.Sum([]byte("x")).CID().Bytes()
	read := func(b []byte) (blockHeader, error) {
		return readBlockHeader(bytes.NewReader(b), make([]byte, maxCIDLen))
	}
	if h, err := read(appendBlockHeader(nil, statusComing, c, 100)); err != nil || h.dataLen != 100 {
		t.Errorf("COMING with a CID and 100 bytes of hints: %+v, %v", h, err)
	}
	if h, err := read(appendBlockHeader(nil, statusNotMember, nil, 0)); err != nil || h.status != statusNotMember {
		t.Errorf("NOT_MEMBER: %+v, %v", h, err)
	}
	if h, err := read(appendBlockHeader(nil, statusDenied, nil, 0)); err != nil || h.status != statusDenied {
		t.Errorf("DENIED: %+v, %v", h, err)
	}
	if _, err := read(appendBlockHeader(nil, statusComing, c, maxHintFrame+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("COMING with %d bytes: %v, want ErrFrameTooLarge", maxHintFrame+1, err)
	}
	for name, b := range map[string][]byte{
		"COMING without a CID": appendBlockHeader(nil, statusComing, nil, 10),
		"NOT_FOUND with data":  appendBlockHeader(nil, statusNotFound, c, 10),
		"BUSY with data":       appendBlockHeader(nil, statusBusy, nil, 10),
		"NOT_MEMBER with data": appendBlockHeader(nil, statusNotMember, nil, 10),
		"DENIED with data":     appendBlockHeader(nil, statusDenied, nil, 10),
		"status 6":             appendBlockHeader(nil, statusDenied+1, nil, 0),
	} {
		if _, err := read(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
}
