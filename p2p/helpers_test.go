package p2p

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	lpswarm "github.com/libp2p/go-libp2p/p2p/net/swarm"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// PeerSource goes into the fetch chain; asserted here so that the package
// itself need not import fetch.
var _ fetch.Source = (*PeerSource)(nil)

// safeWriter forwards to the test's output until the test ends, then drops:
// libp2p goroutines may outlive a test by a moment.
type safeWriter struct {
	mu   sync.Mutex
	w    io.Writer
	done bool
}

func (s *safeWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return len(p), nil
	}
	return s.w.Write(p)
}

// testLogger returns a node's logger: at debug level into a buffer that is
// printed only if the test fails (testenv.Logger), so that a flaky failure
// comes with the nodes' logs; with SHOAL_TEST_DEBUG set, at debug level to
// the test's output as it happens.
func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("SHOAL_TEST_DEBUG") == "" {
		return testenv.Logger(t, "node")
	}
	w := &safeWriter{w: t.Output()}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testData returns size pseudo-random bytes determined by seed.
func testData(seed uint64, size int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	data := make([]byte, size)
	_, _ = rand.NewChaCha8(key).Read(data) // never fails
	return data
}

// testImage is a made-up flat image: a digest, an index whose block table
// is all that matters here, and the blocks' bytes.
type testImage struct {
	digest string
	index  *flat.Index
	data   map[flat.BlockID][]byte
}

func newTestImage(name string, n, size int) *testImage {
	sum := sha256.Sum256([]byte(name))
	im := &testImage{digest: "sha256:" + hex.EncodeToString(sum[:]), index: &flat.Index{}, data: map[flat.BlockID][]byte{}}
	seed := binary.LittleEndian.Uint64(sum[:8])
	for i := range n {
		d := testData(seed+uint64(i), size)
		id := flat.Sum(d)
		im.index.Blocks = append(im.index.Blocks, flat.Block{ID: id, ULen: uint32(len(d)), CLen: uint32(len(d))})
		im.data[id] = d
	}
	return im
}

func (im *testImage) ids() []flat.BlockID {
	out := make([]flat.BlockID, len(im.index.Blocks))
	for i, b := range im.index.Blocks {
		out[i] = b.ID
	}
	return out
}

// openStore opens a blockstore in a temporary directory holding blocks of im
// (all of them if which is nil).
func openStore(t testing.TB, im *testImage, which []int) *blockstore.Store {
	t.Helper()
	s, err := blockstore.Open(t.Context(), t.TempDir(),
		blockstore.WithLogger(testLogger(t)),
		blockstore.WithMemTableSize(4<<20),
		blockstore.WithValueLogFileSize(32<<20),
		blockstore.WithGCInterval(0),
		blockstore.WithMinFreeSpace(0))
	if err != nil {
		t.Fatalf("open blockstore: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if im != nil {
		if which == nil {
			which = make([]int, len(im.index.Blocks))
			for i := range which {
				which[i] = i
			}
		}
		var bs []blockstore.Block
		for _, i := range which {
			b := im.index.Blocks[i]
			bs = append(bs, blockstore.Block{ID: b.ID, Data: im.data[b.ID]})
		}
		if err := s.PutMany(t.Context(), bs); err != nil {
			t.Fatalf("put blocks: %v", err)
		}
	}
	return s
}

// startNode makes a node on 127.0.0.1 and runs it until the test ends.
func startNode(t testing.TB, cfg Config) *Node {
	t.Helper()
	cfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0"}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	if cfg.RefreshInterval == 0 {
		cfg.RefreshInterval = 300 * time.Millisecond
	}
	if cfg.AnnounceInterval == 0 {
		cfg.AnnounceInterval = 50 * time.Millisecond
	}
	n, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
		if err := n.Close(); err != nil {
			t.Logf("Close: %v", err) // a host may already be closed by the test
		}
	})
	return n
}

// eventually polls cond every 20 ms until it holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pollClock is the real clock, counting await's polls: await asks it for
// After(awaitPoll) each time it goes to sleep with blocks still wanted
// from the swarm, so a poll is the event "this node is still awaiting the
// swarm, not gone to the next source". (The node's other waits on its
// Clock are of other durations: the hedge delay, DesignatedHedge,
// ImageBlob's back-off.)
type pollClock struct {
	realClock
	polls atomic.Int64
}

func (c *pollClock) After(d time.Duration) <-chan time.Time {
	if d == awaitPoll {
		c.polls.Add(1)
	}
	return c.realClock.After(d)
}

// awaitPolls waits until the node with clock c has gone to sleep in await
// n more times, still wanting its blocks.
func awaitPolls(t testing.TB, c *pollClock, n int64) {
	t.Helper()
	want := c.polls.Load() + n
	eventually(t, 10*time.Second, "the reader to await the swarm", func() bool { return c.polls.Load() >= want })
}

func holds(n *Node, digest string, pos int, p peer.ID) bool {
	return slices.Contains(n.Holders(digest, pos), p)
}

// allHeld reports whether p holds every block of im according to n.
func allHeld(n *Node, im *testImage, p peer.ID) bool {
	for i := range im.index.Blocks {
		if !holds(n, im.digest, i, p) {
			return false
		}
	}
	return true
}

// checkBlocks fails the test for any block in got whose bytes are not im's.
func checkBlocks(t testing.TB, im *testImage, got map[flat.BlockID][]byte) {
	t.Helper()
	for id, d := range got {
		want, ok := im.data[id]
		if !ok || string(d) != string(want) {
			t.Fatalf("block %s: wrong bytes returned", id)
		}
	}
}

// corruptGetter serves every block with one byte flipped (and, through the
// embedded store, answers Has truthfully).
type corruptGetter struct{ *blockstore.Store }

func (c corruptGetter) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	d, err := c.Store.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	d[len(d)/2] ^= 0xff
	return d, nil
}

// gatedGetter blocks every Get until open is closed.
type gatedGetter struct {
	*blockstore.Store
	open chan struct{}
}

func (g gatedGetter) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	select {
	case <-g.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.Store.Get(ctx, id)
}

// mapSource is a stand-in registry for the fetch chain.
type mapSource struct {
	data map[flat.BlockID][]byte
}

func (m mapSource) Name() string { return fetch.RegistryName }

func (m mapSource) FetchMany(_ context.Context, blocks []flat.Block) (map[flat.BlockID][]byte, error) {
	out := map[flat.BlockID][]byte{}
	for _, b := range blocks {
		if d, ok := m.data[b.ID]; ok {
			out[b.ID] = slices.Clone(d)
		}
	}
	if len(out) < len(blocks) {
		return out, errors.New("not in the stand-in registry")
	}
	return out, nil
}

// silence closes x and takes its TCP address with a listener that accepts
// connections and says nothing, as a drained node's reassigned or
// firewalled address may: a dial to x then hangs until its bound. It
// returns once observers see x's connections closed, with their dial
// backoffs for x cleared (a dial then reaches the listener). If the port
// cannot be taken again (another process took it meanwhile) the test is
// skipped, or fails when CI is set: there it must not pass untested.
func silence(t *testing.T, x *Node, observers []*Node) {
	t.Helper()
	xi, err := peer.AddrInfoFromString(x.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	hostPort, err := manet.ToNetAddr(xi.Addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := x.Close(); err != nil {
		t.Logf("close %s: %v", x.ID(), err)
	}
	ln, err := net.Listen("tcp", hostPort.String())
	if err != nil {
		testenv.SkipOrFatal(t, "cannot take %s's port for a silent listener: %v", x.ID(), err)
	}
	t.Cleanup(func() { ln.Close() })
	eventually(t, 10*time.Second, "the others to see the silenced node's connections close", func() bool {
		for _, o := range observers {
			if o.host.Network().Connectedness(x.ID()) == network.Connected {
				return false
			}
		}
		return true
	})
	for _, o := range observers {
		if sw, ok := o.host.Network().(*lpswarm.Swarm); ok {
			sw.Backoff().Clear(x.ID())
		}
	}
}
