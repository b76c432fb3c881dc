package p2p

// Proof of access (/shoal/access/1).
//
// A private image is one whose registry will not give it to just anyone.
// Its name in the swarm (the DHT key, the name in hellos and block
// requests) is derived from a secret, and the secret from the image's
// manifest bytes, which each node reads from the registry with its own
// credentials and never from peers (PrivateImage). Knowing a digest is no
// proof of anything; holding the manifest bytes is. Before two nodes
// exchange anything of a private image — blocks, its index, have bitmaps,
// ORIGIN fetches — they run one handshake on a stream of their own:
//
//	client → server: frame( str(name) nonceC[32] )
//	server → client: frame( status ) with status OK followed by nonceS[32] proofS[32],
//	                 or UNKNOWN (the server does not serve a private image by that name),
//	                 or LIMITED (too many failed proofs from the client lately)
//	client → server: frame( proofC[32] ), then the client closes the stream
//
//	proofS = HMAC-SHA256(secret, "shoal/access/v1 proof server" ‖ lp(server ID) ‖ lp(client ID) ‖ nonceC ‖ nonceS)
//	proofC = HMAC-SHA256(secret, "shoal/access/v1 proof client" ‖ lp(client ID) ‖ lp(server ID) ‖ nonceC ‖ nonceS)
//
// Both proofs cover both peer IDs (which libp2p's handshake authenticates)
// and both fresh nonces, under a role label: a proof cannot be replayed
// (the other side's nonce is new each time), relayed to a third node (its
// ID is not the one proven to), or reflected (the roles differ). The
// client proves only after the server has, so a node that merely squats
// on a private image's DHT key learns nothing but the name it already
// had. A successful handshake verifies each node to the other for the
// image, for AccessLifetime; it costs one round trip per peer and image:
// the client sends its proof and goes on at once, and a request that
// reaches the server before the proof waits for the handshake in flight.
//
// What the server serves once a peer is verified: the blocks of every
// image the peer may read here — public images, and private ones it is
// verified for — and nothing else. Blocks are shared across images, so a
// block may come under any image whose proof the asker holds. A peer that
// fails proofs is refused handshakes for a while (proofPenalty, doubling).

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/shoal-project/shoal/flat"
)

// ProtocolAccess is the proof-of-access handshake for private images.
const ProtocolAccess protocol.ID = "/shoal/access/1"

const (
	// AccessLifetime is how long a handshake keeps two nodes verified to
	// each other for an image.
	AccessLifetime = time.Hour
	// accessTimeout bounds one handshake on either side, and how long a
	// request waits for a handshake in flight from its asker.
	accessTimeout = 5 * time.Second
	// maxAccessImages bounds the images one peer may be verified for (or
	// have a handshake in flight for) at once; the oldest go first.
	maxAccessImages = 64
	// maxAccessPeers bounds the peers the access table keeps; past it,
	// an eighth of them are dropped, the least valuable first
	// (evictLocked), and new handshakes are refused (LIMITED) only while
	// every entry has one in flight.
	maxAccessPeers = 1 << 14
	// proofFailLimit failed proofs within proofFailWindow put a peer in
	// the penalty box: handshakes refused for proofPenalty, doubled at
	// each repeat up to maxProofPenalty.
	proofFailLimit  = 3
	proofFailWindow = time.Minute
	proofPenalty    = time.Minute
	maxProofPenalty = 30 * time.Minute

	nonceLen = 32
	proofLen = sha256.Size
)

// Handshake answer status.
const (
	accessOK      byte = 0
	accessUnknown byte = 1
	accessLimited byte = 2
)

var (
	// ErrDenied is wrapped when a peer refused a request for a private
	// image: it holds no proof of access from this node (it forgot it, or
	// never had one).
	ErrDenied = errors.New("p2p: peer holds no proof of access for the image")
	// ErrBadProof is wrapped when a peer's proof of access did not verify.
	ErrBadProof = errors.New("p2p: proof of access did not verify")

	errAccessUnknown = errors.New("p2p: peer does not serve the private image")
	errAccessLimited = errors.New("p2p: peer refuses proofs of access from this node for now")
)

// Secret is a private image's access secret: whoever can read the image
// from its registry can derive it, and nobody else. It never leaves the
// node; its String does not print it.
type Secret struct{ k [32]byte }

func (Secret) String() string { return "p2p.Secret(redacted)" }

// PrivateImage derives a private flat image's secret from its manifest
// bytes (as the registry serves them), and the image's name in the swarm
// from the secret: "sha256:<64 hex>", like a digest, but of nothing a
// registry or a DHT server ever sees. The flat converter salts its
// manifests with a value derived from the index (flat.AnnotationAccessSalt),
// so the bytes cannot be rebuilt from the digests they name.
func PrivateImage(manifest []byte) (name string, secret Secret) {
	m := hmac.New(sha256.New, []byte("shoal/access/v1 image secret"))
	m.Write(manifest)
	copy(secret.k[:], m.Sum(nil))
	return secret.name(), secret
}

// PrivateBlob derives the secret and the swarm name of a registry blob
// of a private repository (the mirror's blobs) from its digest and window,
// a stretch of its bytes that only a reader of the blob holds: the asker
// reads it from the registry with its own credentials, the holder from its
// copy. The window must be high in entropy (from a compressed layer) for
// the proof to mean anything; the caller chooses where it lies.
func PrivateBlob(digest string, window []byte) (name string, secret Secret) {
	m := hmac.New(sha256.New, []byte("shoal/access/v1 blob secret"))
	writeLP(m, []byte(digest))
	m.Write(window)
	copy(secret.k[:], m.Sum(nil))
	return secret.name(), secret
}

func (s Secret) name() string {
	m := hmac.New(sha256.New, s.k[:])
	m.Write([]byte("shoal/access/v1 name"))
	return "sha256:" + hex.EncodeToString(m.Sum(nil))
}

// proof is what role ("server" or "client") sends to prove knowledge of
// the secret, bound to both peers and both nonces.
func (s Secret) proof(role string, from, to peer.ID, nonceC, nonceS []byte) []byte {
	m := hmac.New(sha256.New, s.k[:])
	m.Write([]byte("shoal/access/v1 proof " + role))
	writeLP(m, []byte(from))
	writeLP(m, []byte(to))
	m.Write(nonceC)
	m.Write(nonceS)
	return m.Sum(nil)
}

func writeLP(h hash.Hash, b []byte) {
	h.Write(binary.AppendUvarint(nil, uint64(len(b))))
	h.Write(b)
}

// access is the node's table of private images and of who is verified
// for which.
type access struct {
	mu      sync.Mutex
	secrets map[string]Secret // private images, by name
	peers   map[peer.ID]*peerAccess
	calls   map[accessKey]*accessCall // handshakes this node runs as client
}

type accessKey struct {
	p     peer.ID
	image string
}

// peerAccess is what the node knows of one peer's access.
type peerAccess struct {
	verified map[string]time.Time     // image → until
	pending  map[string]chan struct{} // image → closed when the server side of a handshake ends
	fails    int                      // failed proofs since failStart
	failAt   time.Time
	penalty  time.Duration // the last one given
	blocked  time.Time     // handshakes refused until
}

// accessCall is one client handshake in flight; others wanting the same
// wait for it.
type accessCall struct {
	done chan struct{}
	err  error
}

func newAccess() *access {
	return &access{secrets: map[string]Secret{}, peers: map[peer.ID]*peerAccess{}, calls: map[accessKey]*accessCall{}}
}

func (a *access) secret(image string) (Secret, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.secrets[image]
	return s, ok
}

// private reports whether image is a private image of this node.
func (a *access) private(image string) bool {
	_, ok := a.secret(image)
	return ok
}

// peerLocked returns p's entry, making one if there is room; a.mu held.
// A full table first drops an eighth of its entries (evictLocked); only
// if every entry has a handshake in flight is there no room.
func (a *access) peerLocked(p peer.ID, now time.Time) *peerAccess {
	if pa := a.peers[p]; pa != nil {
		return pa
	}
	if len(a.peers) >= maxAccessPeers {
		a.evictLocked(now)
		if len(a.peers) >= maxAccessPeers {
			return nil
		}
	}
	pa := &peerAccess{verified: map[string]time.Time{}, pending: map[string]chan struct{}{}}
	a.peers[p] = pa
	return pa
}

// evictLocked drops entries until the table holds 7/8 of maxAccessPeers,
// those that matter least first: peers with nothing verified, pending or
// penalised; then peers verified only (the earliest verified first: a
// peer that finds itself forgotten proves again, one round trip); then
// penalised ones (the oldest penalty first). Entries with a handshake in
// flight stay. Peers that can fill the table know a private image's name,
// and can each be verified for an hour: refusing newcomers then (LIMITED)
// would let them lock every other reader out.
func (a *access) evictLocked(now time.Time) {
	type cand struct {
		p     peer.ID
		class int
		at    time.Time
	}
	var cands []cand
	for q, pa := range a.peers {
		pa.expire(now)
		if len(pa.pending) > 0 {
			continue
		}
		penalised := now.Before(pa.blocked) || now.Sub(pa.failAt) <= proofFailWindow
		c := cand{p: q}
		switch {
		case penalised:
			c.class, c.at = 2, pa.failAt
		case len(pa.verified) > 0:
			c.class = 1
			for _, until := range pa.verified {
				if c.at.IsZero() || until.After(c.at) {
					c.at = until
				}
			}
		}
		cands = append(cands, c)
	}
	slices.SortFunc(cands, func(x, y cand) int {
		if x.class != y.class {
			return x.class - y.class
		}
		return x.at.Compare(y.at)
	})
	excess := len(a.peers) - maxAccessPeers*7/8
	for _, c := range cands[:min(max(excess, 0), len(cands))] {
		delete(a.peers, c.p)
	}
}

// expire drops lapsed verifications.
func (pa *peerAccess) expire(now time.Time) {
	for im, until := range pa.verified {
		if !now.Before(until) {
			delete(pa.verified, im)
		}
	}
}

// verify records that p proved (or was proven to) for image.
func (a *access) verify(p peer.ID, image string, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	pa := a.peerLocked(p, now)
	if pa == nil {
		return
	}
	pa.expire(now)
	if _, ok := pa.verified[image]; !ok && len(pa.verified) >= maxAccessImages {
		var oldest string
		for im, until := range pa.verified {
			if oldest == "" || until.Before(pa.verified[oldest]) {
				oldest = im
			}
		}
		delete(pa.verified, oldest)
	}
	pa.verified[image] = now.Add(AccessLifetime)
}

// verified reports whether p is verified for image now.
func (a *access) verified(p peer.ID, image string, now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	pa := a.peers[p]
	return pa != nil && now.Before(pa.verified[image])
}

// forget drops p's verification for image (it answered DENIED: it no
// longer holds ours).
func (a *access) forget(p peer.ID, image string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if pa := a.peers[p]; pa != nil {
		delete(pa.verified, image)
	}
}

// drop forgets a private image and every verification for it.
func (a *access) drop(image string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.secrets, image)
	for _, pa := range a.peers {
		delete(pa.verified, image)
	}
}

// AddPrivate makes an image private on this node: the node serves it
// (blocks, blobs, have bitmaps, ORIGIN fetches) only to peers that prove
// knowledge of its secret, and proves its own before it asks peers for
// anything of it or tells them what it holds. It returns the image's name
// in the swarm, which every other method takes in the image's place.
// LeaveImage (or RemovePrivate) undoes it.
func (n *Node) AddPrivate(s Secret) string {
	name := s.name()
	n.access.mu.Lock()
	n.access.secrets[name] = s
	n.access.mu.Unlock()
	return name
}

// RemovePrivate forgets a private image's secret, and who was verified for
// it: the node no longer serves it, nor asks for it.
func (n *Node) RemovePrivate(image string) { n.access.drop(image) }

// Private reports whether image is a private image of this node.
func (n *Node) Private(image string) bool { return n.access.private(image) }

// admitted reports whether p may be served image by this node: a public
// image (not private here) to anyone, a private one to a peer verified
// for it. A handshake from p for image in flight is waited for (it ends
// within accessTimeout): a client sends its proof and its request at
// once.
func (n *Node) admitted(ctx context.Context, p peer.ID, image string) bool {
	a := n.access
	if !a.private(image) {
		return true
	}
	now := n.cfg.Clock.Now()
	a.mu.Lock()
	pa := a.peers[p]
	if pa == nil {
		a.mu.Unlock()
		return false
	}
	if now.Before(pa.verified[image]) {
		a.mu.Unlock()
		return true
	}
	wait := pa.pending[image]
	a.mu.Unlock()
	if wait == nil {
		return false
	}
	t := time.NewTimer(accessTimeout)
	defer t.Stop()
	select {
	case <-wait:
	case <-t.C:
	case <-ctx.Done():
	}
	return a.verified(p, image, n.cfg.Clock.Now())
}

// prove makes sure that p and this node are verified to each other for
// image, by a handshake unless one is still valid; for a public image it
// does nothing. fresh says whether a handshake ran now (a DENIED answer
// after a cached one means the peer forgot it: prove again). Concurrent
// calls for the same peer and image share one handshake, which runs on
// the node's goroutine, bounded by accessTimeout and the node's life, not
// by the caller that started it: a hedged request cancelled a moment later
// must not fail every request waiting on the same proof. It returns
// errAccessUnknown if p does not serve the image, an error wrapping
// ErrBadProof if p's proof did not verify (p is struck), errAccessLimited
// if p refuses this node's proofs for now, or ctx's error if ctx ends
// first.
func (n *Node) prove(ctx context.Context, p peer.ID, image string) (fresh bool, err error) {
	a := n.access
	s, private := a.secret(image)
	if !private {
		return true, nil
	}
	if a.verified(p, image, n.cfg.Clock.Now()) {
		return false, nil
	}
	k := accessKey{p, image}
	a.mu.Lock()
	c := a.calls[k]
	if c == nil {
		c = &accessCall{done: make(chan struct{})}
		a.calls[k] = c
		a.mu.Unlock()
		run := func() {
			hctx, cancel := context.WithTimeout(n.life, accessTimeout)
			defer cancel()
			c.err = n.handshake(hctx, p, image, s)
			a.mu.Lock()
			delete(a.calls, k)
			a.mu.Unlock()
			close(c.done)
		}
		if !n.spawn(run) {
			a.mu.Lock()
			delete(a.calls, k)
			a.mu.Unlock()
			c.err = ErrClosed
			close(c.done)
		}
	} else {
		a.mu.Unlock()
	}
	select {
	case <-c.done:
		return true, c.err
	case <-ctx.Done():
		return true, ctx.Err()
	}
}

// handshake is the client side of /shoal/access/1.
func (n *Node) handshake(ctx context.Context, p peer.ID, image string, s Secret) error {
	n.st.proofsSent.Add(1)
	ctx, cancel := context.WithTimeout(ctx, accessTimeout)
	defer cancel()
	st, err := n.host.NewStream(ctx, p, ProtocolAccess)
	if err != nil {
		return fmt.Errorf("proof of access to %s: open stream: %w", p, err)
	}
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	dl, _ := ctx.Deadline()
	_ = st.SetDeadline(dl)
	nonceC := make([]byte, nonceLen)
	_, _ = rand.Read(nonceC)
	if _, err := st.Write(appendFrame(nil, append(appendBytes(nil, []byte(image)), nonceC...))); err != nil {
		st.Reset()
		return fmt.Errorf("proof of access to %s: send: %w", p, err)
	}
	ans, err := readFrame(bufio.NewReaderSize(st, 128), 1+nonceLen+proofLen, nil)
	if err != nil {
		st.Reset()
		return fmt.Errorf("proof of access to %s: read: %w", p, err)
	}
	switch {
	case len(ans) == 1 && ans[0] == accessUnknown:
		_ = st.Close()
		return errAccessUnknown
	case len(ans) == 1 && ans[0] == accessLimited:
		_ = st.Close()
		return errAccessLimited
	case len(ans) != 1+nonceLen+proofLen || ans[0] != accessOK:
		st.Reset()
		return fmt.Errorf("proof of access to %s: %w: answer of %d bytes", p, ErrMalformed, len(ans))
	}
	nonceS, proofS := ans[1:1+nonceLen], ans[1+nonceLen:]
	if !hmac.Equal(proofS, s.proof("server", p, n.ID(), nonceC, nonceS)) {
		// It claims the image and cannot prove it: a node squatting on
		// the image's name, or a broken one. Nothing of ours went to it.
		st.Reset()
		avoided := n.peers.strike(p, n.cfg.BadBlockStrikes, n.cfg.PenaltyCoolDown, time.Now())
		n.log.Warn("peer failed to prove access to a private image it claims", "peer", p.String(), "image", image, "avoided", avoided)
		return fmt.Errorf("proof of access from %s: %w", p, ErrBadProof)
	}
	if _, err := st.Write(appendFrame(nil, s.proof("client", n.ID(), p, nonceC, nonceS))); err != nil {
		st.Reset()
		return fmt.Errorf("proof of access to %s: send proof: %w", p, err)
	}
	// The server has nothing more to say: it records the proof (a request
	// sent now waits for that) and closes its side.
	_ = st.Close()
	n.access.verify(p, image, n.cfg.Clock.Now())
	return nil
}

// handleAccess is the server side of /shoal/access/1.
func (n *Node) handleAccess(st network.Stream) {
	if !n.enter() {
		st.Reset()
		return
	}
	defer n.wg.Done()
	p := st.Conn().RemotePeer()
	_ = st.SetDeadline(time.Now().Add(accessTimeout))
	r := bufio.NewReaderSize(st, 128)
	payload, err := readFrame(r, 1+maxDigestLen+nonceLen+2, nil)
	if err != nil {
		st.Reset()
		return
	}
	d := decoder{b: payload}
	image := string(d.bytes(maxDigestLen))
	if d.err != nil || len(d.b) != nonceLen {
		st.Reset()
		return
	}
	nonceC := d.b
	answer := func(status byte) {
		if _, err := st.Write(appendFrame(nil, []byte{status})); err != nil {
			st.Reset()
			return
		}
		_ = st.Close()
	}
	a := n.access
	now := n.cfg.Clock.Now()
	a.mu.Lock()
	s, private := a.secrets[image]
	var pa *peerAccess
	if private { // an entry only for a handshake that will run
		pa = a.peerLocked(p, now)
	}
	switch {
	case private && (pa == nil || now.Before(pa.blocked) || len(pa.pending) >= maxAccessImages):
		a.mu.Unlock()
		n.st.proofsLimited.Add(1)
		answer(accessLimited)
		return
	case !private:
		a.mu.Unlock()
		answer(accessUnknown)
		return
	}
	done := make(chan struct{})
	if prev := pa.pending[image]; prev != nil {
		close(prev) // a new handshake replaces it; its waiters check again
	}
	pa.pending[image] = done
	a.mu.Unlock()
	ok := false
	defer func() {
		a.mu.Lock()
		if pa.pending[image] == done {
			delete(pa.pending, image)
			close(done)
		}
		a.mu.Unlock()
		if !ok {
			st.Reset()
		}
	}()

	nonceS := make([]byte, nonceLen)
	_, _ = rand.Read(nonceS)
	msg := append([]byte{accessOK}, nonceS...)
	if _, err := st.Write(appendFrame(nil, append(msg, s.proof("server", n.ID(), p, nonceC, nonceS)...))); err != nil {
		return
	}
	proofC, err := readFrame(r, proofLen, nil)
	if err != nil {
		if !errors.Is(err, io.EOF) && !isTimeout(err) {
			n.failedProof(p, image, fmt.Errorf("read proof: %w", err))
		}
		return
	}
	if len(proofC) != proofLen || !hmac.Equal(proofC, s.proof("client", p, n.ID(), nonceC, nonceS)) {
		n.failedProof(p, image, ErrBadProof)
		return
	}
	a.verify(p, image, n.cfg.Clock.Now())
	n.st.proofsAccepted.Add(1)
	ok = true
	_ = st.Close()
}

// failedProof counts a proof from p that did not verify; proofFailLimit
// of them within proofFailWindow refuse p's handshakes for a penalty that
// doubles each time.
func (n *Node) failedProof(p peer.ID, image string, err error) {
	n.st.proofsFailed.Add(1)
	now := n.cfg.Clock.Now()
	a := n.access
	a.mu.Lock()
	pa := a.peerLocked(p, now)
	var until time.Time
	if pa != nil {
		if now.Sub(pa.failAt) > proofFailWindow {
			pa.fails, pa.failAt = 0, now
		}
		if pa.fails++; pa.fails >= proofFailLimit {
			pa.penalty = min(max(2*pa.penalty, proofPenalty), maxProofPenalty)
			pa.blocked = now.Add(pa.penalty)
			pa.fails = 0
			until = pa.blocked
		}
	}
	a.mu.Unlock()
	if !until.IsZero() {
		n.log.Warn("peer keeps failing proofs of access; refusing its handshakes for a while", "peer", p.String(), "until", until.Format(time.RFC3339))
		return
	}
	n.log.Info("peer failed a proof of access", "peer", p.String(), "image", image, "err", err)
}

// accessOutcome is what a request that could not prove access comes to:
// NOT_MEMBER for a peer that does not serve the image privately (or whose
// proof was wrong: handshake struck it), BUSY for one that refuses this
// node's proofs for now, a failed request otherwise.
func (n *Node) accessOutcome(p peer.ID, blocks []flat.Block, err error) outcome {
	var out outcome
	switch {
	case errors.Is(err, errAccessUnknown):
		out.notMember = true
		out.notFound = blocks
	case errors.Is(err, ErrBadProof):
		out.notMember = true
		out.notFound = blocks
	case errors.Is(err, errAccessLimited):
		out.busy = true
		out.err = fmt.Errorf("%w: %w", ErrBusy, err)
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		out.err = err // the caller gave up (or the handshake timed out): a failed request
	default:
		out.err = err
		if n.host.Network().Connectedness(p) != network.Connected {
			out.unreachable = true
			n.markUnreachable(p)
		}
	}
	return out
}

// RecipeBlocks is an optional extension of the RecipeGetter given to
// ServeRecipes: the blocks a blob the node keeps whole is cut into, so
// that a request naming the blob is served those blocks and no others.
type RecipeBlocks interface {
	BlobBlocks(ctx context.Context, digest string) ([]flat.BlockID, bool)
}

// servable splits cids into those p may have from this node and the rest,
// which are answered NOT_FOUND whether or not the node holds them. A CID
// is servable when it names a block of an image p is admitted to here (a
// public image, or a private one p is verified for, see admitted): in the
// image's block table once the node has joined it, or one of the image's
// blobs ImageBlob fetched while the node opens or holds the image (its
// manifest and index), or, for the blob a request names, one of the
// blocks of that blob's recipe (the mirror's blobs). The image the request
// names comes first; blocks are shared across images, so the images the
// node has joined follow.
func (n *Node) servable(ctx context.Context, p peer.ID, image string, cids [][]byte) (ok, no [][]byte) {
	now := n.cfg.Clock.Now()
	type scope struct {
		pos   map[flat.BlockID]int
		blobs []flat.BlockID
	}
	var scopes []scope
	add := func(name string) {
		s := n.swarm(name)
		blobs := n.imageBlobs(name)
		if s == nil && (len(blobs) == 0 || !n.opening(name)) {
			return
		}
		if n.access.private(name) && !n.access.verified(p, name, now) {
			return
		}
		sc := scope{blobs: blobs}
		if s != nil {
			sc.pos = s.pos
		}
		scopes = append(scopes, sc)
	}
	add(image)
	admittedHere := !n.access.private(image) || n.access.verified(p, image, now)
	if rb, isRB := n.recipeGetter().(RecipeBlocks); isRB && admittedHere && n.swarm(image) == nil {
		if ids, found := rb.BlobBlocks(ctx, image); found {
			pos := make(map[flat.BlockID]int, len(ids))
			for i, id := range ids {
				pos[id] = i
			}
			scopes = append(scopes, scope{pos: pos})
		}
	}
	others := false
	in := func(id flat.BlockID) bool {
		for _, sc := range scopes {
			if _, ok := sc.pos[id]; ok || slices.Contains(sc.blobs, id) {
				return true
			}
		}
		return false
	}
	for _, c := range cids {
		id, isID := blockIDOf(c)
		if isID && !in(id) && !others {
			others = true
			for _, s := range n.swarmList() {
				if s.digest != image {
					add(s.digest)
				}
			}
		}
		if isID && in(id) {
			ok = append(ok, c)
		} else {
			no = append(no, c)
		}
	}
	return ok, no
}

// imageBlobs returns the blobs ImageBlob fetched for image.
func (n *Node) imageBlobs(image string) []flat.BlockID {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.blobs[image]
}

// maxImageBlobs bounds the blobs kept per image: its manifest and index.
const maxImageBlobs = 4

// addImageBlob records that the node has (or is about to have) blob id of
// image, to serve it under the image.
func (n *Node) addImageBlob(image string, id flat.BlockID) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.blobs == nil {
		n.blobs = map[string][]flat.BlockID{}
	}
	if b := n.blobs[image]; !slices.Contains(b, id) && len(b) < maxImageBlobs {
		n.blobs[image] = append(b, id)
	}
}

func (n *Node) recipeGetter() RecipeGetter {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.recipes
}
