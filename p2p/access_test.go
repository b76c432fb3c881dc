package p2p

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
)

// The secret and the name come from the manifest bytes alone; the name is
// not the manifest's digest, and proofs are bound to role, both peers and
// both nonces.
func TestAccessDerivation(t *testing.T) {
	t.Parallel()
	manifest := []byte(`{"schemaVersion":2,"annotations":{"dev.shoal.access.salt":"00"}}`)
	name, s := PrivateImage(manifest)
	name2, s2 := PrivateImage(bytes.Clone(manifest))
	if name != name2 || s != s2 {
		t.Fatal("PrivateImage is not deterministic")
	}
	sum := sha256.Sum256(manifest)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if name == digest || !strings.HasPrefix(name, "sha256:") || len(name) != len(digest) {
		t.Errorf("name %s: want a sha256:<hex> name other than the digest %s", name, digest)
	}
	if _, err := ImageKey(name); err != nil {
		t.Errorf("the name is not a DHT key: %v", err)
	}
	other, _ := PrivateImage(append(bytes.Clone(manifest), ' '))
	if other == name {
		t.Error("two manifests, one name")
	}
	if got := fmt.Sprint(s); strings.Contains(got, hex.EncodeToString(s.k[:])) || strings.Contains(fmt.Sprintf("%v %+v", s, s), hex.EncodeToString(s.k[:4])) {
		t.Errorf("a Secret prints itself: %s", got)
	}
	a, b := peer.ID("peer-a"), peer.ID("peer-b")
	n1, n2 := bytes.Repeat([]byte{1}, nonceLen), bytes.Repeat([]byte{2}, nonceLen)
	base := s.proof("client", a, b, n1, n2)
	for what, p := range map[string][]byte{
		"role":    s.proof("server", a, b, n1, n2),
		"from/to": s.proof("client", b, a, n1, n2),
		"to":      s.proof("client", a, "peer-c", n1, n2),
		"nonces":  s.proof("client", a, b, n2, n1),
		"nonceS":  s.proof("client", a, b, n1, n1),
		"secret":  func() []byte { _, o := PrivateImage([]byte("x")); return o.proof("client", a, b, n1, n2) }(),
	} {
		if bytes.Equal(p, base) {
			t.Errorf("changing the %s leaves the proof the same", what)
		}
	}
}

// privateSwarm is a private image shared by two nodes that hold its
// secret: A holds every block and the index, C nothing.
type privateSwarm struct {
	im       *testImage // im.digest is the image's name in the swarm
	digest   string     // the manifest's digest, which outsiders know
	manifest []byte
	secret   Secret
	index    []byte
	a, c     *Node
	aStore   *blobStore
}

func startPrivateSwarm(t *testing.T, name string) *privateSwarm {
	t.Helper()
	ps := &privateSwarm{manifest: []byte(`{"private":"` + name + `"}`)}
	sum := sha256.Sum256(ps.manifest)
	ps.digest = "sha256:" + hex.EncodeToString(sum[:])
	var swarmName string
	swarmName, ps.secret = PrivateImage(ps.manifest)
	ps.im = newTestImage(name, 6, 16<<10)
	ps.im.digest = swarmName
	ps.index = testData(99, 8<<10)
	ps.aStore = &blobStore{Store: openStore(t, ps.im, nil)}
	if err := ps.aStore.Put(t.Context(), flat.Sum(ps.index), ps.index); err != nil {
		t.Fatal(err)
	}
	ps.a = startNode(t, Config{Blocks: ps.aStore})
	ps.c = startNode(t, Config{Blocks: openStore(t, nil, nil), BootstrapPeers: ps.a.Addrs()})
	for _, n := range []*Node{ps.a, ps.c} {
		if got := n.AddPrivate(ps.secret); got != swarmName {
			t.Fatalf("AddPrivate: name %s, want %s", got, swarmName)
		}
	}
	ps.a.addImageBlob(swarmName, flat.Sum(ps.index)) // as its ImageIndex did
	for _, n := range []*Node{ps.a, ps.c} {
		if err := n.JoinImage(t.Context(), swarmName, ps.im.index); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []*Node{ps.a, ps.c} {
		eventually(t, 15*time.Second, "the two readers to exchange have bitmaps", func() bool {
			return len(n.ImagePeers(swarmName)) == 1
		})
	}
	return ps
}

// TestPrivateImageReaders: two nodes that can read a private image share
// it as a public one is shared, after one handshake each way; its DHT
// record is keyed by its name, not by its digest.
func TestPrivateImageReaders(t *testing.T) {
	t.Parallel()
	ps := startPrivateSwarm(t, "private-readers")
	a, c, im := ps.a, ps.c, ps.im
	reg := newSlowRegistry(im, 0)
	chain, err := fetch.NewChain(nil, []fetch.Source{c.Source(im.digest), reg})
	if err != nil {
		t.Fatal(err)
	}
	got, err := chain.FetchMany(t.Context(), im.index.Blocks)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("C read %d of %d blocks: %v", len(got), len(im.index.Blocks), err)
	}
	checkBlocks(t, im, got)
	for _, b := range im.index.Blocks {
		if n := reg.count(b.ID); n != 0 {
			t.Errorf("block %s read from the registry %d times", b.ID, n)
		}
	}
	x, err := c.ImageIndex(t.Context(), im.digest, flat.Sum(ps.index), int64(len(ps.index)))
	if err != nil || !bytes.Equal(x, ps.index) {
		t.Errorf("C's index from A: %d bytes, %v", len(x), err)
	}
	as, cs := a.Stats(), c.Stats()
	t.Logf("A: proofs sent %d, accepted %d; C: proofs sent %d, accepted %d, DENIED received %d", as.ProofsSent, as.ProofsAccepted, cs.ProofsSent, cs.ProofsAccepted, cs.DeniedReceived)
	// One handshake verifies both nodes to each other: whichever opened
	// its have session first ran it, and the other needed none — unless
	// both opened theirs at the same moment, each before the other's
	// handshake was done: then one each way, never more.
	sent, accepted := as.ProofsSent+cs.ProofsSent, as.ProofsAccepted+cs.ProofsAccepted
	if sent < 1 || sent > 2 || accepted != sent || as.ProofsSent > 1 || cs.ProofsSent > 1 {
		t.Errorf("handshakes: A sent %d, C sent %d, %d accepted; want one, or one each way, all accepted", as.ProofsSent, cs.ProofsSent, accepted)
	}
	if cs.DeniedReceived != 0 || as.DeniedSent != 0 {
		t.Errorf("DENIED sent %d, received %d; want none between readers", as.DeniedSent, cs.DeniedReceived)
	}

	// Outsiders see the name as a DHT key, never the digest.
	e := startNode(t, Config{BootstrapPeers: a.Addrs()})
	eventually(t, 10*time.Second, "E's routing table", func() bool { return e.dht.RoutingTable().Size() > 0 })
	byDigest, _ := ImageKey(ps.digest)
	byName, _ := ImageKey(im.digest)
	if provs, err := e.FindProviders(t.Context(), byDigest, 10); len(provs) != 0 {
		t.Errorf("providers under the manifest digest: %v, %v; want none", provs, err)
	}
	eventually(t, 10*time.Second, "E to find the readers under the name", func() bool {
		provs, _ := e.FindProviders(t.Context(), byName, 10)
		return len(provs) == 2
	})
}

// rawHandshake speaks /shoal/access/1 to p by hand, as an attacker would:
// it sends name and nonceC, and, if p answers OK, the proof proofFor makes
// from p's nonce and proof. It returns p's status.
func rawHandshake(t *testing.T, from *Node, p peer.ID, name string, nonceC []byte, proofFor func(nonceS, proofS []byte) []byte) byte {
	t.Helper()
	st, err := from.host.NewStream(t.Context(), p, ProtocolAccess)
	if err != nil {
		t.Fatalf("open access stream: %v", err)
	}
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := st.Write(appendFrame(nil, append(appendBytes(nil, []byte(name)), nonceC...))); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(st)
	ans, err := readFrame(r, 1+nonceLen+proofLen, nil)
	if err != nil {
		t.Fatalf("read the server's answer: %v", err)
	}
	if ans[0] != accessOK {
		return ans[0]
	}
	if _, err := st.Write(appendFrame(nil, proofFor(ans[1:1+nonceLen], ans[1+nonceLen:]))); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseWrite()
	_, _ = io.Copy(io.Discard, r) // until the server closes or resets
	return accessOK
}

func nonce() []byte {
	b := make([]byte, nonceLen)
	_, _ = rand.Read(b)
	return b
}

// TestPrivateImageOutsiders: a peer that knows every digest of a private
// image — its manifest's, its index's, every block's — and its name, but
// not the manifest bytes, gets nothing from a reader: not by digest, not
// by name, not with ORIGIN, not with a forged, replayed or relayed proof,
// not through a have session. Failed proofs get it rate-limited.
func TestPrivateImageOutsiders(t *testing.T) {
	t.Parallel()
	ps := startPrivateSwarm(t, "private-outsiders")
	a, c, im := ps.a, ps.c, ps.im
	indexBlock := flat.Block{ID: flat.Sum(ps.index), ULen: uint32(len(ps.index))}
	wanted := append([]flat.Block{indexBlock}, im.index.Blocks...)
	outsider := func() *Node {
		e := startNode(t, Config{Blocks: openStore(t, nil, nil)})
		if err := e.Connect(t.Context(), a.Addrs()[0]); err != nil {
			t.Fatal(err)
		}
		return e
	}
	nothing := func(e *Node, what string, o outcome, want func(outcome) bool) {
		t.Helper()
		if len(o.got) != 0 || !want(o) {
			t.Errorf("%s: %d blocks, not found %d, not member %v, denied %v, busy %v, err %v", what, len(o.got), len(o.notFound), o.notMember, o.denied, o.busy, o.err)
		}
	}
	notFound := func(o outcome) bool { return len(o.notFound) == len(wanted) }
	notMember := func(o outcome) bool { return o.notMember }
	denied := func(o outcome) bool { return o.denied }

	e := outsider()
	nothing(e, "by digest", e.request(t.Context(), a.ID(), ps.digest, wanted, reqOpts{}), notFound)
	nothing(e, "by digest, ORIGIN", e.request(t.Context(), a.ID(), ps.digest, wanted[1:], reqOpts{flags: flagOrigin | flagMember}), notMember)
	nothing(e, "by digest, index as ImageBlob asks", e.request(t.Context(), a.ID(), ps.digest, wanted[:1], reqOpts{flags: flagMember}), notMember)
	nothing(e, "by name", e.request(t.Context(), a.ID(), im.digest, wanted, reqOpts{}), denied)
	nothing(e, "by name, ORIGIN", e.request(t.Context(), a.ID(), im.digest, wanted[1:], reqOpts{flags: flagOrigin | flagMember}), denied)
	// Under another image the outsider may read here (a public one A
	// holds), the private image's blocks are still not served.
	pub := newTestImage("public-beside", 2, 4<<10)
	if err := a.JoinImage(t.Context(), pub.digest, pub.index); err != nil {
		t.Fatal(err)
	}
	nothing(e, "under a public image", e.request(t.Context(), a.ID(), pub.digest, wanted, reqOpts{}), notFound)

	// A have session: A resets it at the hello, and sends no bitmap.
	st, err := e.host.NewStream(t.Context(), a.ID(), ProtocolHave)
	if err != nil {
		t.Fatal(err)
	}
	h := hello{image: im.digest, nblocks: len(im.index.Blocks), bits: newBitmap(len(im.index.Blocks))}
	if _, err := st.Write(appendFrame(nil, h.encode())); err != nil {
		t.Fatal(err)
	}
	_ = st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := st.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("A kept the outsider's have stream open: %v", err)
	}
	st.Reset()

	// Forged proofs: refused, and after proofFailLimit the peer is
	// rate-limited.
	forged := outsider()
	for i := range proofFailLimit {
		status := rawHandshake(t, forged, a.ID(), im.digest, nonce(), func(_, _ []byte) []byte { return nonce() })
		if status != accessOK {
			t.Fatalf("forged proof %d: status %d before any proof was sent", i, status)
		}
		nothing(forged, "after a forged proof", forged.requestOnce(t.Context(), a.ID(), im.digest, wanted, reqOpts{}), denied)
	}
	if status := rawHandshake(t, forged, a.ID(), im.digest, nonce(), func(_, _ []byte) []byte { return nonce() }); status != accessLimited {
		t.Errorf("handshake after %d failed proofs: status %d, want LIMITED", proofFailLimit, status)
	}

	// Replayed: a genuine proof C once sent A, with C's nonce and A's
	// nonce of that day, sent again by an outsider (A's nonce is new).
	replay := outsider()
	oldC, oldS := nonce(), nonce()
	genuine := ps.secret.proof("client", c.ID(), a.ID(), oldC, oldS)
	rawHandshake(t, replay, a.ID(), im.digest, oldC, func(_, _ []byte) []byte { return genuine })
	nothing(replay, "after a replayed proof", replay.requestOnce(t.Context(), a.ID(), im.digest, wanted, reqOpts{}), denied)

	// Relayed: an outsider runs A's challenge past C, a reader — C's
	// proof, as a server to the outsider over A's nonces, sent to A as the
	// outsider's own.
	relay := outsider()
	if err := relay.Connect(t.Context(), c.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	nc := nonce()
	rawHandshake(t, relay, a.ID(), im.digest, nc, func(nonceS, _ []byte) []byte {
		var fromC []byte
		rawHandshake(t, relay, c.ID(), im.digest, nc, func(_, proofS []byte) []byte {
			fromC = proofS
			return nonce()
		})
		return fromC
	})
	nothing(relay, "after a relayed proof", relay.requestOnce(t.Context(), a.ID(), im.digest, wanted, reqOpts{}), denied)

	for name, n := range map[string]*Node{"E": e, "forger": forged, "replayer": replay, "relay": relay} {
		if st := n.Stats(); st.BytesDownloaded != 0 || st.BlocksFetched != 0 {
			t.Errorf("%s got %d bytes (%d blocks) of the private image", name, st.BytesDownloaded, st.BlocksFetched)
		}
	}
	if st := a.Stats(); st.ProofsFailed < proofFailLimit+2 || st.ProofsLimited < 1 {
		t.Errorf("A: %d failed proofs, %d handshakes refused; want at least %d and 1", st.ProofsFailed, st.ProofsLimited, proofFailLimit+2)
	}
}

// TestPrivateImageSquatter: a node that provides a private image's name
// and claims the image but cannot prove it gets no request from a reader:
// the reader strikes it and reads from the real holder.
func TestPrivateImageSquatter(t *testing.T) {
	t.Parallel()
	ps := startPrivateSwarm(t, "private-squatter")
	im := ps.im
	squatter := startNode(t, Config{BootstrapPeers: ps.a.Addrs()})
	var asked atomic.Int32
	squatter.host.SetStreamHandler(ProtocolAccess, func(st network.Stream) {
		defer st.Close()
		if _, err := readFrame(bufio.NewReader(st), 1+maxDigestLen+nonceLen+2, nil); err != nil {
			return
		}
		_, _ = st.Write(appendFrame(nil, append([]byte{accessOK}, append(nonce(), nonce()...)...)))
		_, _ = io.Copy(io.Discard, st)
	})
	squatter.host.SetStreamHandler(ProtocolBlock, func(st network.Stream) { asked.Add(1); st.Reset() })
	squatter.host.SetStreamHandler(ProtocolHave, func(st network.Stream) { asked.Add(1); st.Reset() })
	key, _ := ImageKey(im.digest)
	if err := squatter.Provide(t.Context(), key); err != nil {
		t.Logf("squatter's provide (held locally): %v", err)
	}

	d := startNode(t, Config{Blocks: openStore(t, nil, nil), BootstrapPeers: ps.a.Addrs()})
	d.AddPrivate(ps.secret)
	if err := d.Connect(t.Context(), squatter.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	if err := d.JoinImage(t.Context(), im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	reg := newSlowRegistry(im, 0)
	chain, err := fetch.NewChain(nil, []fetch.Source{d.Source(im.digest), reg})
	if err != nil {
		t.Fatal(err)
	}
	got, err := chain.FetchMany(t.Context(), im.index.Blocks)
	if err != nil || len(got) != len(im.index.Blocks) {
		t.Fatalf("D read %d of %d blocks: %v", len(got), len(im.index.Blocks), err)
	}
	checkBlocks(t, im, got)
	// The squatter is struck when D meets it: D's discovery found it
	// among the providers (kad-dht may also have answered before the
	// squatter's record was out, so it is asked here, as a have session
	// or an ORIGIN request would).
	if o := d.request(t.Context(), squatter.ID(), im.digest, im.index.Blocks[:1], reqOpts{flags: flagMember}); !o.notMember {
		t.Errorf("request to the squatter: %+v, want NOT_MEMBER", o)
	}
	if info, _ := d.PeerInfo(squatter.ID()); info.BadBlocks < 1 {
		t.Errorf("the squatter was not struck: %+v", info)
	}
	if n := asked.Load(); n != 0 {
		t.Errorf("the squatter got %d block or have streams; want none", n)
	}
}

// TestPrivateImageSharedBlocks: blocks are shared across images, and a
// block may come under any image whose proof the asker holds. C reads
// private image X; the only holder, A, holds private image Y, which has
// the same blocks, and not X. C, verified with A for Y, has X's blocks from
// A under Y's name.
func TestPrivateImageSharedBlocks(t *testing.T) {
	t.Parallel()
	x := startPrivateSwarm(t, "shared-blocks-y") // A holds Y; C joined Y
	a, c := x.a, x.c
	_, sx := PrivateImage([]byte(`{"private":"shared-blocks-x"}`))
	nameX := c.AddPrivate(sx)
	imX := &testImage{digest: nameX, index: x.im.index, data: x.im.data}
	if err := c.JoinImage(t.Context(), nameX, imX.index); err != nil {
		t.Fatal(err)
	}
	reg := newSlowRegistry(imX, 0)
	chain, err := fetch.NewChain(nil, []fetch.Source{c.Source(nameX), reg})
	if err != nil {
		t.Fatal(err)
	}
	got, err := chain.FetchMany(t.Context(), imX.index.Blocks)
	if err != nil || len(got) != len(imX.index.Blocks) {
		t.Fatalf("C read %d of %d blocks of X: %v", len(got), len(imX.index.Blocks), err)
	}
	checkBlocks(t, imX, got)
	for _, b := range imX.index.Blocks {
		if n := reg.count(b.ID); n != 0 {
			t.Errorf("block %s of X read from the registry %d times; want it from A under Y", b.ID, n)
		}
	}
	if st := a.Stats(); st.BlocksServed < int64(len(imX.index.Blocks)) || st.DeniedSent != 0 {
		t.Errorf("A served %d blocks, DENIED %d", st.BlocksServed, st.DeniedSent)
	}
}
