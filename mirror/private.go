package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
)

// PrivatePeers is an optional extension of Peers, found by type
// assertion, for private and shared blobs. A blob registered with
// AddPrivate travels under the name it returns — in Providers, Recipe,
// Blocks and Provide, which take the name where a public blob's digest
// would go — and only between nodes that proved to each other that they
// know the blob's window (p2p's proof of access). SwarmPeers has it.
// Without it, private and shared blobs come from upstream only.
type PrivatePeers interface {
	// AddPrivate registers a private blob by its digest and window and
	// returns its name in the swarm.
	AddPrivate(digest string, window []byte) (name string)
	// RemovePrivate forgets a name AddPrivate returned.
	RemovePrivate(name string)
}

// The window rule (doc.go, "Private blobs in the swarm"). Both sides apply
// it to the same digest and size, so they agree on which blobs have names
// and on where each window lies.
const (
	// windowLen is how many bytes of a private blob its window holds.
	windowLen = 4 << 10
	// minNamedSize: smaller private blobs (configs, tiny layers) get no
	// name and always come from upstream, as manifests do.
	minNamedSize = 1 << 20
	// maxNames bounds the private blobs a node holds names for; past it,
	// newly kept private blobs are not shared.
	maxNames = 1 << 16
)

// errUnnamed: the window rule gives the blob no name.
var errUnnamed = errors.New("mirror: the blob gets no swarm name (under 1 MiB, or not gzip or zstd)")

// windowOffset is where the window of a blob of size bytes lies: a hash of
// its digest and size, modulo the offsets at which a whole window fits.
// Spread over the whole blob, the window rarely falls in the head, the
// part of a layer whose compressed bytes an outsider could most easily
// rebuild (gzip header, first tar entries of well-known files).
func windowOffset(digest string, size int64) int64 {
	h := sha256.New()
	h.Write([]byte("shoal/mirror window v1\x00"))
	h.Write([]byte(digest))
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(size)))
	return int64(binary.BigEndian.Uint64(h.Sum(nil)[:8]) % uint64(size-windowLen+1))
}

// compressed reports whether a blob's first bytes are gzip's or zstd's
// magic. A window of an uncompressed tar may fall in bytes an outsider
// knows (zero padding, a file from a public package).
func compressed(head []byte) bool {
	return bytes.HasPrefix(head, []byte{0x1f, 0x8b}) || bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd})
}

// windowOf reads the window of a blob of size bytes held whole (and
// verified) in src, or errUnnamed if the rule gives it no name.
func windowOf(src io.ReaderAt, digest string, size int64) ([]byte, error) {
	if size < minNamedSize {
		return nil, errUnnamed
	}
	head := make([]byte, 4)
	if _, err := src.ReadAt(head, 0); err != nil {
		return nil, err
	}
	if !compressed(head) {
		return nil, errUnnamed
	}
	w := make([]byte, windowLen)
	if _, err := src.ReadAt(w, windowOffset(digest, size)); err != nil {
		return nil, err
	}
	return w, nil
}

// names are the swarm names of the private and shared blobs this node
// holds, and the names registered for fetches in progress. mu also
// orders every AddPrivate and RemovePrivate, so that a name in byName is
// always registered with the swarm: a name the swarm no longer knows as
// private would be served to anyone.
type names struct {
	mu       sync.Mutex
	byName   map[string]string // name → digest
	byDigest map[string]string // digest → name
}

func newNames() *names {
	return &names{byName: map[string]string{}, byDigest: map[string]string{}}
}

func (n *names) digest(name string) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	d, ok := n.byName[name]
	return d, ok
}

func (n *names) named(digest string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.byDigest[digest]
	return ok
}

func (n *names) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]string, 0, len(n.byName))
	for name := range n.byName {
		out = append(out, name)
	}
	return out
}

func (n *names) len() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.byName)
}

func (m *Mirror) privatePeers() PrivatePeers {
	pp, _ := m.cfg.Peers.(PrivatePeers)
	return pp
}

// hold gives a kept private or shared blob, read from src, its swarm
// name, which the caller announces (never the digest). ok is false for a
// blob the window rule gives no name, one already named, or without a
// swarm that carries private blobs.
func (m *Mirror) hold(digest string, size int64, src io.ReaderAt) (name string, ok bool) {
	pp := m.privatePeers()
	if pp == nil || m.names.named(digest) {
		return "", false
	}
	w, err := windowOf(src, digest, size)
	if err != nil {
		if !errors.Is(err, errUnnamed) {
			m.log.Warn("could not read a private blob's window; it is not shared", "blob", digest, "err", err)
		}
		return "", false
	}
	n := m.names
	n.mu.Lock()
	defer n.mu.Unlock()
	name = pp.AddPrivate(digest, w)
	if _, held := n.byName[name]; held {
		return "", false
	}
	if len(n.byName) >= maxNames {
		pp.RemovePrivate(name)
		m.log.Warn("too many private blobs named; this one is not shared", "blob", digest, "limit", maxNames)
		return "", false
	}
	n.byName[name], n.byDigest[digest] = digest, name
	return name, true
}

// unhold forgets a blob's swarm name (forgotten, or now public).
func (m *Mirror) unhold(digest string) {
	pp := m.privatePeers()
	if pp == nil {
		return
	}
	n := m.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if name, ok := n.byDigest[digest]; ok {
		delete(n.byDigest, digest)
		delete(n.byName, name)
		pp.RemovePrivate(name)
	}
}

// holdKept names the kept private and shared blobs whose blocks are all
// cached, from their kept copies: at start, so that names survive
// restarts without being stored. Run announces them.
func (m *Mirror) holdKept(ctx context.Context) {
	if m.privatePeers() == nil {
		return
	}
	for _, d := range m.keep.keptDigests(classPrivate) {
		if ctx.Err() != nil {
			return
		}
		if m.keep.class(d) == classPublic || m.names.named(d) {
			continue
		}
		r, _, ok := m.keep.recipe(ctx, d, m.cfg.MaxBlobSize)
		if !ok || r.size < minNamedSize {
			continue
		}
		m.hold(d, r.size, &keptReaderAt{ctx: ctx, blocks: m.cfg.Blocks, r: r})
	}
}

// keptReaderAt reads a kept blob from the block cache at any offset.
type keptReaderAt struct {
	ctx    context.Context
	blocks Blocks
	r      *recipe
}

func (k *keptReaderAt) ReadAt(p []byte, off int64) (int, error) {
	return io.ReadFull(&blockReader{ctx: k.ctx, blocks: k.blocks, r: k.r, off: off, cur: -1}, p)
}

// askName reads a private or shared blob's window upstream as a's client
// (which also proves the client may read it) and registers the blob's
// name with the swarm, to ask peers for it under that name. The caller
// calls release when the fetch is over.
func (m *Mirror) askName(ctx context.Context, a *access, digest string) (string, error) {
	pp := m.privatePeers()
	if pp == nil {
		return "", ErrNoPeers
	}
	w, err := m.readWindow(ctx, a, digest)
	if err != nil {
		return "", err
	}
	m.names.mu.Lock()
	defer m.names.mu.Unlock()
	return pp.AddPrivate(digest, w), nil
}

// release forgets a name askName registered, unless the node now holds
// the blob under it.
func (m *Mirror) release(name string) {
	n := m.names
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, held := n.byName[name]; !held {
		m.privatePeers().RemovePrivate(name)
	}
}

// readWindow reads a blob's window from upstream as a's client: one
// Range GET of windowLen bytes at windowOffset. The size comes from the
// access check's HEAD (or a HEAD now). errUnnamed for a blob under
// minNamedSize; the magic bytes are not read (the window is the one read),
// so a large uncompressed blob gets a window and finds no holder, since
// holders name compressed blobs only.
func (m *Mirror) readWindow(ctx context.Context, a *access, digest string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.TagTimeout)
	defer cancel()
	size, ok := m.checks.size(digest)
	if !ok {
		if err := m.head(ctx, a, "blobs", digest); err != nil {
			return nil, err
		}
		if size, ok = m.checks.size(digest); !ok {
			return nil, fmt.Errorf("upstream %s: no size for %s", a.repo.RegistryStr(), digest)
		}
	}
	if size < minNamedSize {
		return nil, errUnnamed
	}
	off := windowOffset(digest, size)
	end := off + windowLen - 1
	m.st.windows.Add(1)
	resp, err := m.send(ctx, http.MethodGet, a, "blobs", digest, "", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(end, 10))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	want := fmt.Sprintf("bytes %d-%d/%d", off, end, size)
	if got := resp.Header.Get("Content-Range"); resp.StatusCode != http.StatusPartialContent || got != want {
		return nil, fmt.Errorf("upstream %s: window of %s: %s, Content-Range %q, want 206 and %q", a.repo.RegistryStr(), digest, resp.Status, got, want)
	}
	w, err := io.ReadAll(io.LimitReader(resp.Body, windowLen+1))
	if err != nil {
		return nil, &upstreamError{err: fmt.Errorf("upstream %s: reading the window of %s: %w", a.repo.RegistryStr(), digest, err)}
	}
	m.st.windowBytes.Add(int64(len(w)))
	if len(w) != windowLen {
		return nil, fmt.Errorf("upstream %s: window of %s: %d bytes, want %d", a.repo.RegistryStr(), digest, len(w), windowLen)
	}
	return w, nil
}
