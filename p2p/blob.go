package p2p

// Whole blobs in the swarm, for the registry mirror (package mirror).
//
// A registry blob (a gzip layer, a config, a manifest) is found by its own
// provider record: the blob's digest as a CID, like an image record
// (ImageKey), published once the blob is held whole. A blob has no index, so
// the holder also serves its "recipe" over /shoal/recipe/1 — the ordered
// block IDs the blob is cut into, in a format package mirror defines and
// verifies; here it is opaque bytes of at most MaxRecipeSize. The blocks
// themselves travel over /shoal/block/1 like any image block, under the
// blob's name (the server serves the blocks of that blob's recipe,
// RecipeBlocks, and no others). There are no have bitmaps for blobs: a
// provider holds the whole blob when it publishes its record, and a block
// it lost since is answered NOT_FOUND and asked of the next provider.
// Blob records share the key space of image records (both are sha256
// digests as CIDs); a provider with no recipe for a key answers NOT_FOUND.
//
//	recipe request = frame( str(blob digest) )
//	recipe answer  = frame( status(1 byte) recipe bytes )   status 0 OK, 1 NOT_FOUND
//
// Everything a peer sends here is untrusted: blocks are verified against
// the IDs asked for (request does), and the caller verifies the assembled
// blob against its digest and reports a peer whose recipe led to a wrong
// blob with Strike.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/shoal-project/shoal/flat"
)

// ProtocolRecipe serves blob recipes to peers.
const ProtocolRecipe protocol.ID = "/shoal/recipe/1"

// MaxRecipeSize bounds a recipe on the wire (a 64 GiB blob of 1 MiB blocks
// needs 2 MiB).
const MaxRecipeSize = 4 << 20

// recipeTimeout bounds one recipe exchange, both sides.
const recipeTimeout = 10 * time.Second

// ErrNoRecipe is returned when a peer does not have the recipe asked for.
var ErrNoRecipe = errors.New("p2p: peer has no recipe for the blob")

// RecipeGetter returns the recipe of a blob the node holds whole, or an
// error (the asker is told NOT_FOUND).
type RecipeGetter interface {
	Recipe(ctx context.Context, digest string) ([]byte, error)
}

// ServeRecipes makes the node answer /shoal/recipe/1 requests from g. Until
// it is called, such requests are reset.
func (n *Node) ServeRecipes(g RecipeGetter) {
	n.mu.Lock()
	n.recipes = g
	n.mu.Unlock()
	n.host.SetStreamHandler(ProtocolRecipe, func(st network.Stream) { n.handleRecipe(st, g) })
}

func (n *Node) handleRecipe(st network.Stream, g RecipeGetter) {
	if !n.enter() {
		st.Reset()
		return
	}
	defer n.wg.Done()
	_ = st.SetDeadline(time.Now().Add(recipeTimeout))
	payload, err := readFrame(bufio.NewReaderSize(st, 512), maxDigestLen+8, nil)
	if err != nil {
		st.Reset()
		return
	}
	d := decoder{b: payload}
	digest := string(d.bytes(maxDigestLen))
	if d.err != nil || len(d.b) != 0 {
		st.Reset()
		return
	}
	ctx, cancel := context.WithTimeout(n.life, recipeTimeout)
	defer cancel()
	answer := []byte{statusNotFound}
	// A private blob's recipe goes only to a peer with a proof of access.
	if n.admitted(ctx, st.Conn().RemotePeer(), digest) {
		if r, err := g.Recipe(ctx, digest); err == nil && len(r) <= MaxRecipeSize {
			answer = append([]byte{statusOK}, r...)
		}
	}
	if _, err := st.Write(appendFrame(nil, answer)); err != nil {
		st.Reset()
		return
	}
	_ = st.Close()
}

// ProvideBlob publishes the node's provider record for a blob it now holds
// whole (digest "sha256:<hex>"). Records expire after the DHT's record
// lifetime (48 h); the holder re-provides them.
func (n *Node) ProvideBlob(ctx context.Context, digest string) error {
	key, err := ImageKey(digest)
	if err != nil {
		return err
	}
	return n.Provide(ctx, key)
}

// BlobProviders looks up the providers of a blob and returns up to limit of
// them that this node can reach and may ask, connected: peers avoided after
// bad data are left out; peers resting after BUSY or failures come last,
// but they come. A blob's providers are few (often one), and the caller
// (the mirror) paces its retries of a busy peer; leaving a resting provider
// out sent a whole layer to the registry because the one peer that held it
// had turned away a request for another layer of the same pull a moment
// before.
func (n *Node) BlobProviders(ctx context.Context, digest string, limit int) ([]peer.ID, error) {
	key, err := ImageKey(digest)
	if err != nil {
		return nil, err
	}
	if len(n.host.Network().Peers()) == 0 {
		n.bootstrap(ctx)
	}
	n.waitRoutingTable(ctx, 2*time.Second)
	infos, err := n.FindProviders(ctx, key, limit)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	var out, resting []peer.ID
	for _, ai := range infos {
		if n.peers.isAvoided(ai.ID, now) {
			n.log.Debug("blob provider avoided after bad data", "blob", digest, "peer", ai.ID.String())
			continue
		}
		if err := n.connect(ctx, ai); err != nil {
			n.log.Debug("connect to blob provider", "blob", digest, "peer", ai.ID.String(), "err", err)
			continue
		}
		if n.peers.usable(ai.ID, now) {
			out = append(out, ai.ID)
		} else {
			resting = append(resting, ai.ID)
		}
	}
	return append(out, resting...), nil
}

// FetchRecipe asks p for the recipe of a blob. The bytes are untrusted.
func (n *Node) FetchRecipe(ctx context.Context, p peer.ID, digest string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, recipeTimeout)
	defer cancel()
	if _, err := n.prove(ctx, p, digest); err != nil {
		if errors.Is(err, errAccessUnknown) || errors.Is(err, ErrBadProof) {
			err = fmt.Errorf("%w: %w", ErrNoRecipe, err)
		}
		return nil, fmt.Errorf("recipe of %s from %s: %w", digest, p, err)
	}
	st, err := n.host.NewStream(ctx, p, ProtocolRecipe)
	if err != nil {
		return nil, fmt.Errorf("recipe of %s from %s: open stream: %w", digest, p, err)
	}
	stop := context.AfterFunc(ctx, func() { st.Reset() })
	defer stop()
	dl, _ := ctx.Deadline()
	_ = st.SetDeadline(dl)
	if _, err := st.Write(appendFrame(nil, appendBytes(nil, []byte(digest)))); err != nil {
		st.Reset()
		return nil, fmt.Errorf("recipe of %s from %s: send: %w", digest, p, err)
	}
	_ = st.CloseWrite()
	payload, err := readFrame(bufio.NewReaderSize(st, 64<<10), MaxRecipeSize+1, nil)
	if err != nil {
		st.Reset()
		return nil, fmt.Errorf("recipe of %s from %s: read: %w", digest, p, err)
	}
	_ = st.Close()
	switch {
	case len(payload) == 0:
		return nil, fmt.Errorf("recipe of %s from %s: %w", digest, p, ErrMalformed)
	case payload[0] == statusNotFound:
		return nil, fmt.Errorf("recipe of %s from %s: %w", digest, p, ErrNoRecipe)
	case payload[0] != statusOK:
		return nil, fmt.Errorf("recipe of %s from %s: status %d: %w", digest, p, payload[0], ErrMalformed)
	}
	return payload[1:], nil
}

// FetchBlobBlocks asks p for blocks of a blob (at most MaxRequestBlocks, IDs
// distinct, ULen set) and returns those it delivered, each verified against
// its ID. A wrong block is a strike against p (ErrBadBlock); a BUSY answer
// wraps ErrBusy. Blocks p does not hold are simply missing from the result,
// with a nil error.
func (n *Node) FetchBlobBlocks(ctx context.Context, p peer.ID, digest string, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	if len(blocks) > MaxRequestBlocks {
		return nil, fmt.Errorf("blob %s: %d blocks in one request, at most %d", digest, len(blocks), MaxRequestBlocks)
	}
	got, _, err := n.fetchBlob(ctx, p, digest, blocks, 0)
	return got, err
}

// fetchBlob is FetchBlobBlocks with request flags; it also reports
// whether p answered NOT_MEMBER (flags with flagMember only).
func (n *Node) fetchBlob(ctx context.Context, p peer.ID, digest string, blocks []flat.Block, flags uint64) (map[flat.BlockID][]byte, bool, error) {
	o := n.request(ctx, p, digest, blocks, reqOpts{flags: flags})
	now := time.Now()
	switch {
	case o.bad:
		n.Strike(p)
	case o.busy:
		n.st.busyRecv.Add(1)
		n.peers.busy(p, now.Add(n.cfg.BusyBackoff))
	case o.err != nil:
		n.st.failedReqs.Add(1)
		if ctx.Err() == nil {
			n.peers.failure(p, n.cfg.FirstByteTimeout, now)
		}
	default:
		n.peers.success(p, o.firstByte, len(o.got))
	}
	if o.err != nil {
		return o.got, o.notMember, fmt.Errorf("blob %s from %s: %w", digest, p, o.err)
	}
	return o.got, o.notMember, nil
}

// Strike counts bad data from p: a wrong block, or a recipe that assembled
// into a blob that does not match its digest. After BadBlockStrikes strikes
// p is avoided for PenaltyCoolDown.
func (n *Node) Strike(p peer.ID) {
	n.st.badBlocks.Add(1)
	avoided := n.peers.strike(p, n.cfg.BadBlockStrikes, n.cfg.PenaltyCoolDown, time.Now())
	n.log.Warn("peer sent bad blob data", "peer", p.String(), "avoided", avoided)
}
