package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// Peers is the swarm as the mirror uses it: provider records per blob,
// recipes and blocks from a given peer. A blob goes by its key: a public
// blob's digest, or a private blob's swarm name (PrivatePeers). Peer IDs
// are opaque strings. SwarmPeers adapts a *p2p.Node.
type Peers interface {
	// Providers returns peers that announced they hold the blob.
	Providers(ctx context.Context, key string) ([]string, error)
	// Recipe returns a peer's (untrusted) recipe of the blob.
	Recipe(ctx context.Context, peer, key string) ([]byte, error)
	// Blocks returns the blocks the peer delivered, each verified against
	// its ID; a missing block is not an error.
	Blocks(ctx context.Context, peer, key string, blocks []flat.Block) (map[flat.BlockID][]byte, error)
	// Strike counts bad data from a peer.
	Strike(peer string)
	// Provide announces that this node holds the blob.
	Provide(ctx context.Context, key string) error
}

// local returns the recipe of a kept blob whose blocks are all cached, if
// a request allowed by g may be served it: with upstream unreachable and
// only a declaration of the repository as public (grantPublicOnly), only a
// blob kept as public may. A blob served to a request whose repository is
// known public becomes public (and is announced).
func (m *Mirror) local(ctx context.Context, a *access, g grant, digest string, maxSize int64) (*recipe, bool) {
	r, _, ok := m.keep.recipe(ctx, digest, maxSize)
	if !ok {
		return nil, false
	}
	c := m.keep.class(digest)
	if g == grantPublicOnly && c != classPublic {
		return nil, false
	}
	if c != classPublic && g == grantChecked && m.knownPublic(a) {
		if raised, err := m.keep.raise(digest, classPublic); err != nil {
			m.log.Warn("could not record blob as public", "blob", digest, "err", err)
		} else if raised {
			m.unhold(digest)
			m.announce(digest, classPublic)
		}
	}
	return r, true
}

// knownPublic reports whether a's repository is known to serve anonymous
// reads (a's own anonymous check counts), or is declared public.
func (m *Mirror) knownPublic(a *access) bool {
	if a.cred.anonymous() || a.up.public.match(a.repo.RepositoryStr()) {
		return true
	}
	public, known := m.checks.isPublic(a.repoKey(), m.cfg.CheckTTL, time.Now())
	return known && public
}

// join returns the flight for digest, starting the fetch if there is none,
// with a reference the caller releases. A fetch started here acts as a's
// client upstream, asks peers for a public blob (c) by digest and for a
// private or shared one by its swarm name, and keeps the blob as c.
func (m *Mirror) join(digest string, a *access, manifest bool, c class) (*flight, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f := m.flights[digest]; f != nil {
		f.attach()
		return f, nil
	}
	if m.closed {
		return nil, context.Canceled
	}
	file, err := m.keep.spool()
	if err != nil {
		return nil, err
	}
	f := newFlight(digest, &spool{file: file, b: m.budget})
	f.refs++ // the caller's
	m.flights[digest] = f
	m.st.fetches.Add(1)
	m.wg.Go(func() { m.fetch(f, a, manifest, c) })
	return f, nil
}

// fetch fills f: peers first, then upstream as a's client; keeps the
// verified blob as class c and announces it: a public blob by its digest,
// a private or shared one that the window rule names by its name. Peers
// are asked for a public blob under its digest, for a private or shared
// blob (not a manifest) under the name its window, read upstream as a's
// client, gives it. It runs to the end even if the requests that started
// it are gone, so what was fetched is kept. When the size the upstream
// stated at the access check is known, the spool is reserved for it before
// anything else, and a blob that does not fit fails the fetch at once
// (ErrSpoolFull): its requests then stream it from upstream.
func (m *Mirror) fetch(f *flight, a *access, manifest bool, c class) {
	ctx, cancel := context.WithTimeout(m.life, m.cfg.FetchTimeout)
	defer cancel()
	limit := m.cfg.MaxBlobSize
	if manifest {
		limit = maxManifestSize
	}
	size := int64(-1)
	if n, ok := m.checks.size(f.digest); ok && n <= limit {
		size = n
	}
	r, err := (*recipe)(nil), error(ErrNoPeers)
	if size >= 0 {
		if rerr := f.sp.reserve(size); rerr != nil {
			err = rerr
		}
	}
	switch {
	case errors.Is(err, ErrSpoolFull):
	case c == classPublic:
		r, err = m.fromPeers(ctx, f, f.digest, size, limit)
		if errors.Is(err, ErrNoPeers) && !manifest && size >= 0 {
			r, err = m.fromSwarm(ctx, f, a, f.digest, size)
		}
	case !manifest && m.privatePeers() != nil:
		name, nerr := m.askName(ctx, a, f.digest)
		if nerr != nil {
			if !errors.Is(nerr, errUnnamed) {
				m.log.Info("could not read a private blob's window; asking upstream", "blob", f.digest, "err", nerr)
			}
			break
		}
		defer m.release(name)
		r, err = m.fromPeers(ctx, f, name, size, limit)
		if errors.Is(err, ErrNoPeers) && size >= 0 {
			r, err = m.fromSwarm(ctx, f, a, name, size)
		}
	}
	if err != nil && !errors.Is(err, ErrSpoolFull) {
		if !errors.Is(err, ErrNoPeers) {
			m.log.Info("swarm could not serve blob; asking upstream", "blob", f.digest, "err", err)
		}
		if rerr := f.restart(); rerr != nil {
			err = rerr
		} else {
			r, err = m.fromUpstream(ctx, f, a, manifest, limit)
		}
	}
	if err == nil {
		if kept, kerr := m.keep.keep(ctx, r, f.file, c); kerr != nil {
			m.log.Warn("could not keep blob", "blob", f.digest, "err", kerr)
		} else if kept == classPublic {
			m.unhold(f.digest) // kept before as private, public now
			m.announce(f.digest, kept)
		} else if !manifest {
			if name, ok := m.hold(f.digest, r.size, f.file); ok {
				m.spawn(func() { m.provide(m.life, name) })
			}
		}
	} else if errors.Is(err, ErrNotFound) {
		m.log.Info("blob not found", "blob", f.digest, "err", err)
	} else if errors.Is(err, ErrSpoolFull) {
		m.st.spoolRefused.Add(1)
		m.log.Warn("blob not spooled: streaming it from upstream to each request, not kept", "blob", f.digest, "err", err)
	} else {
		m.log.Warn("blob fetch failed", "blob", f.digest, "err", err)
	}
	m.mu.Lock()
	delete(m.flights, f.digest)
	m.mu.Unlock()
	f.finish(err)
}

// fromPeers assembles the blob from peers that announced it under key
// (its digest, or its swarm name), into f's file, and verifies it against
// its digest. Nothing is readable before it is verified. A recipe must
// agree with the blob's size when it is known (size ≥ 0), or its sender is
// struck before anything is asked of it or written; one that does not fit
// in the spool is passed over.
func (m *Mirror) fromPeers(ctx context.Context, f *flight, key string, size, limit int64) (*recipe, error) {
	if m.cfg.Peers == nil {
		return nil, ErrNoPeers
	}
	pctx, cancel := context.WithTimeout(ctx, m.cfg.PeerTimeout)
	provs, err := m.cfg.Peers.Providers(pctx, key)
	cancel()
	if len(provs) == 0 {
		m.log.Debug("no peer announced blob", "blob", f.digest, "key", key, "err", err)
		if err == nil {
			return nil, ErrNoPeers
		}
		return nil, fmt.Errorf("%w: %w", ErrNoPeers, err)
	}
	var errs []error
	for i, p := range provs {
		if i == 3 {
			break
		}
		pctx, cancel := context.WithTimeout(ctx, m.cfg.PeerTimeout)
		raw, err := m.cfg.Peers.Recipe(pctx, p, key)
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		r, err := decodeRecipe(raw, f.digest, size, limit)
		if err != nil {
			m.st.badPeer.Add(1)
			m.cfg.Peers.Strike(p)
			errs = append(errs, fmt.Errorf("peer %s: %w", p, err))
			continue
		}
		if err := f.sp.reserve(r.size); err != nil {
			// Not ErrSpoolFull for the fetch: with the size unknown, the
			// upstream's may fit where this recipe's does not.
			errs = append(errs, fmt.Errorf("peer %s: recipe of a %d-byte blob: %v", p, r.size, err))
			continue
		}
		// Ask the recipe's sender first, then the others.
		order := append([]string{p}, provs[:i]...)
		order = append(order, provs[i+1:]...)
		if err := m.assemble(ctx, &assembly{f: f, r: r, key: key, peers: order}); err != nil {
			return nil, err
		}
		if err := verifyFile(f, r.digestString(), r.size); err != nil {
			m.st.badPeer.Add(1)
			m.cfg.Peers.Strike(p)
			return nil, fmt.Errorf("recipe from peer %s: %w", p, err)
		}
		m.st.fetchedPeers.Add(r.size)
		f.verify(r.size, SourcePeers)
		return r, nil
	}
	return nil, fmt.Errorf("no usable recipe from %d peers: %w", len(provs), errors.Join(errs...))
}

const (
	peerBatch    = 8 // blocks per request (8 MiB of 1 MiB blocks)
	peerParallel = 4 // requests in flight per blob
)

// assembly is one blob being assembled from peers.
type assembly struct {
	f     *flight
	r     *recipe
	key   string   // what peers are asked under: the digest, or the swarm name
	peers []string // in the order asked
	where map[flat.BlockID][]int

	mu  sync.Mutex
	bad map[string]bool // peers that sent bad blocks
}

// assemble fetches the recipe's blocks from the peers in order (each
// batch starting with a different one) and writes them into the flight's
// file.
func (m *Mirror) assemble(ctx context.Context, as *assembly) error {
	f, r := as.f, as.r
	// One request per distinct block; a block may sit at several offsets.
	as.where, as.bad = map[flat.BlockID][]int{}, map[string]bool{}
	var uniq []flat.Block
	for i := range r.ids {
		id, _, n := r.block(i)
		if as.where[id] == nil {
			uniq = append(uniq, flat.Block{ID: id, ULen: uint32(n)})
		}
		as.where[id] = append(as.where[id], i)
	}
	if err := f.sp.truncate(r.size); err != nil {
		return err
	}
	batches := make(chan []flat.Block)
	errc := make(chan error, peerParallel)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for range peerParallel {
		wg.Go(func() {
			for batch := range batches {
				if err := m.fetchBatch(ctx, as, batch); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		})
	}
	func() {
		defer close(batches)
		for i := 0; i < len(uniq); i += peerBatch {
			select {
			case batches <- uniq[i:min(i+peerBatch, len(uniq))]:
			case <-ctx.Done():
				return
			}
		}
	}()
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return err
	}
	return ctx.Err()
}

// busyBudget bounds how long fetchBatch goes over the peers again while
// some of them answered BUSY; busyPause is the pause before each pass
// (times the pass number, at most busyPauseMax): a peer's upload slots
// (four by default) free within a block's transfer time, so a busy peer is
// asked again rather than the blob read from upstream. Two seconds were
// too few on a loaded machine: a small blob (an image config) waited
// behind the same pull's layer batches, 8 MiB each, and went upstream.
const (
	busyBudget   = 6 * time.Second
	busyPause    = 30 * time.Millisecond
	busyPauseMax = 250 * time.Millisecond
)

// fetchBatch gets one batch of blocks, asking peer after peer for what is
// still missing, and writes each block at its offsets. Peers that answered
// BUSY are asked again in later passes.
func (m *Mirror) fetchBatch(ctx context.Context, as *assembly, batch []flat.Block) error {
	want := batch
	var errs []error
	deadline := time.Now().Add(busyBudget)
	for pass := 0; len(want) > 0 && (pass == 0 || time.Now().Before(deadline)); pass++ {
		if pass > 0 {
			select {
			case <-time.After(min(time.Duration(pass)*busyPause, busyPauseMax)):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		busy := false
		var err error
		if want, busy, err = m.passBatch(ctx, as, want, &errs); err != nil {
			return err
		}
		if !busy {
			break
		}
	}
	if len(want) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		if len(errs) == 0 {
			return fmt.Errorf("%d blocks of %s held by no peer asked", len(want), as.f.digest)
		}
		return fmt.Errorf("%d blocks of %s held by no peer asked: %w", len(want), as.f.digest, errors.Join(errs...))
	}
	return nil
}

// passBatch asks each peer in turn for the blocks still wanted and writes
// what arrives; it returns what is still wanted and whether a peer
// answered BUSY.
func (m *Mirror) passBatch(ctx context.Context, as *assembly, want []flat.Block, errs *[]error) ([]flat.Block, bool, error) {
	start := int(want[0].ID[0]) // spread batches over the peers
	busy := false
	for k := range as.peers {
		if len(want) == 0 {
			break
		}
		p := as.peers[(start+k)%len(as.peers)]
		as.mu.Lock()
		skip := as.bad[p]
		as.mu.Unlock()
		if skip {
			continue
		}
		got, err := m.cfg.Peers.Blocks(ctx, p, as.key, want)
		if err != nil {
			*errs = append(*errs, err)
			busy = busy || errors.Is(err, ErrPeerBusy)
			if errors.Is(err, ErrBadPeer) {
				as.mu.Lock()
				as.bad[p] = true
				as.mu.Unlock()
			}
		}
		var still []flat.Block
		for _, b := range want {
			data, ok := got[b.ID]
			if !ok || len(data) != int(b.ULen) || !b.ID.Verify(data) {
				still = append(still, b)
				continue
			}
			for _, i := range as.where[b.ID] {
				_, off, _ := as.r.block(i)
				if _, err := as.f.sp.WriteAt(data, off); err != nil {
					return nil, false, err
				}
			}
		}
		want = still
	}
	return want, busy, nil
}

// verifyFile hashes f's file and checks it against digest and size.
func verifyFile(f *flight, digest string, size int64) error {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f.file, 0, size+1))
	if err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != size || got != digest {
		return fmt.Errorf("%w: assembled %d bytes hashing to %s, want %s", ErrDigestMismatch, n, got, digest)
	}
	return nil
}

// fromUpstream streams the blob from upstream into f's file, cutting it
// into blocks and hashing it as it comes. Blobs of known size are readable
// as they arrive except for their last byte (see readableLocked). The
// spool is reserved for the size upstream announces before a byte is
// written, or, without one, a step at a time as bytes arrive; either
// failing ends the fetch with ErrSpoolFull.
func (m *Mirror) fromUpstream(ctx context.Context, f *flight, a *access, manifest bool, limit int64) (*recipe, error) {
	repo := a.repo
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	stall := time.AfterFunc(m.cfg.StallTimeout, func() {
		stop(fmt.Errorf("upstream sent nothing for %v", m.cfg.StallTimeout))
	})
	defer stall.Stop()
	kind, accept := "blobs", ""
	if manifest {
		kind, accept = "manifests", manifestAccept
	}
	resp, err := m.get(ctx, a, kind, f.digest, accept)
	if err != nil {
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", err, c)
		}
		return nil, err
	}
	defer resp.Body.Close()
	size := resp.ContentLength
	if size > limit {
		return nil, fmt.Errorf("%w: upstream announces %d bytes for %s, limit %d", ErrTooLarge, size, f.digest, limit)
	}
	if size >= 0 {
		if err := f.sp.reserve(size); err != nil {
			return nil, fmt.Errorf("%s from upstream %s: %w", f.digest, repo.RegistryStr(), err)
		}
	}
	if size > 0 && !manifest { // an empty blob has no last byte to hold back
		f.publish(size, SourceUpstream)
	}
	d, _ := parseDigest(f.digest)
	r := &recipe{digest: d, chunk: ChunkSize}
	whole, part := sha256.New(), sha256.New()
	var partLen, off int64
	buf := make([]byte, 256<<10)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			stall.Reset(m.cfg.StallTimeout)
			if off+int64(n) > limit || (size >= 0 && off+int64(n) > size) {
				return nil, fmt.Errorf("%w: upstream sent more than %d bytes for %s", ErrTooLarge, min(limit, max(size, 0)), f.digest)
			}
			if end := off + int64(n); size < 0 && end > f.sp.limit() {
				if err := f.sp.grow(end, limit); err != nil {
					return nil, fmt.Errorf("%s from upstream %s, of unannounced size: %w", f.digest, repo.RegistryStr(), err)
				}
			}
			if _, err := f.sp.WriteAt(buf[:n], off); err != nil {
				return nil, err
			}
			whole.Write(buf[:n])
			for b := buf[:n]; len(b) > 0; {
				c := min(int64(len(b)), ChunkSize-partLen)
				part.Write(b[:c])
				partLen += c
				b = b[c:]
				if partLen == ChunkSize {
					r.ids = append(r.ids, sumID(part))
					part.Reset()
					partLen = 0
				}
			}
			off += int64(n)
			m.st.fetchedUpstream.Add(int64(n))
			f.wrote(off)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if c := context.Cause(ctx); c != nil {
				rerr = c
			}
			return nil, &upstreamError{err: fmt.Errorf("upstream %s: reading %s: %w", repo.RegistryStr(), f.digest, rerr)}
		}
	}
	if partLen > 0 {
		r.ids = append(r.ids, sumID(part))
	}
	r.size = off
	if size >= 0 && off != size {
		return nil, &upstreamError{err: fmt.Errorf("upstream %s: %s ended after %d of %d bytes", repo.RegistryStr(), f.digest, off, size)}
	}
	if got := "sha256:" + hex.EncodeToString(whole.Sum(nil)); got != f.digest {
		m.st.mismatch.Add(1)
		return nil, fmt.Errorf("%w: upstream %s sent %d bytes hashing to %s for %s", ErrDigestMismatch, repo.RegistryStr(), off, got, f.digest)
	}
	f.verify(off, SourceUpstream)
	return r, nil
}

func sumID(h hash.Hash) flat.BlockID {
	var id flat.BlockID
	h.Sum(id[:0])
	return id
}

// serveBlob answers GET/HEAD of a blob once the client may read it from
// its repository (authorize): kept copy, else the (shared) fetch.
func (m *Mirror) serveBlob(w http.ResponseWriter, r *http.Request, a *access, digest string) {
	ctx := r.Context()
	g, err := m.authorize(ctx, a, "blobs", digest)
	if err != nil {
		m.failErr(w, r, a, "BLOB_UNKNOWN", err)
		return
	}
	if rc, ok := m.local(ctx, a, g, digest, m.cfg.MaxBlobSize); ok {
		m.serveRange(w, r, digest, rc.size, func(off int64) io.Reader {
			return &blockReader{ctx: ctx, blocks: m.cfg.Blocks, r: rc, off: off, cur: -1}
		}, func() string { return SourceLocal })
		return
	}
	f, err := m.join(digest, a, false, m.classFor(ctx, a, "blobs", digest))
	if err != nil {
		m.failErr(w, r, a, "BLOB_UNKNOWN", err)
		return
	}
	size, err := f.waitSize(ctx)
	if err != nil {
		f.release()
		if errors.Is(err, ErrSpoolFull) && g == grantChecked {
			m.streamUpstream(w, r, a, digest, err)
			return
		}
		m.failErr(w, r, a, "BLOB_UNKNOWN", err)
		return
	}
	defer f.release()
	m.serveRange(w, r, digest, size, func(off int64) io.Reader {
		return &flightReader{ctx: ctx, f: f, off: off}
	}, f.sourceName)
}

// serveRange writes a blob's headers and, for GET, the bytes of the one
// range asked for (or all). A body that cannot be completed — a source
// failed, or the blob did not match its digest — aborts the connection,
// so the client sees a truncated response, never a complete wrong one.
func (m *Mirror) serveRange(w http.ResponseWriter, r *http.Request, digest string, size int64, open func(off int64) io.Reader, source func() string) {
	h := w.Header()
	h.Set("Docker-Content-Digest", digest)
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Etag", `"`+digest+`"`)
	h.Set("Accept-Ranges", "bytes")
	start, n, status := int64(0), size, http.StatusOK
	if rh := r.Header.Get("Range"); rh != "" && r.Method == http.MethodGet {
		s, l, ok, satisfiable := parseRange(rh, size)
		if !satisfiable {
			h.Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
			m.fail(w, r, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID", fmt.Sprintf("range %q not satisfiable for a blob of %d bytes", rh, size))
			return
		}
		if ok {
			start, n, status = s, l, http.StatusPartialContent
			h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", s, s+l-1, size))
		}
	}
	h.Set("Content-Length", strconv.FormatInt(n, 10))
	w.WriteHeader(status)
	if r.Method == http.MethodHead || n == 0 {
		return
	}
	written, err := io.CopyN(w, open(start), n)
	m.served(source(), written)
	if err != nil {
		m.st.errors.Add(1)
		level := slog.LevelWarn
		if r.Context().Err() != nil {
			level = slog.LevelDebug // the client went away
		}
		m.log.Log(r.Context(), level, "blob response cut short", "blob", digest, "sent", written, "of", n, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// parseRange parses a single "bytes=" range against size. ok is false for
// a header to ignore (several ranges, another unit, bad syntax: the whole
// blob is sent, as RFC 9110 allows); satisfiable is false when the range
// starts past the end.
func parseRange(h string, size int64) (start, n int64, ok, satisfiable bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, 0, false, true
	}
	a, b, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return 0, 0, false, true
	}
	if a == "" { // suffix: the last b bytes
		k, err := strconv.ParseInt(b, 10, 64)
		if err != nil || k < 0 {
			return 0, 0, false, true
		}
		if k == 0 || size == 0 {
			return 0, 0, false, false
		}
		k = min(k, size)
		return size - k, k, true, true
	}
	s, err := strconv.ParseInt(a, 10, 64)
	if err != nil || s < 0 {
		return 0, 0, false, true
	}
	e := size - 1
	if b != "" {
		if e, err = strconv.ParseInt(b, 10, 64); err != nil || e < s {
			return 0, 0, false, true
		}
		e = min(e, size-1)
	}
	if s >= size {
		return 0, 0, false, false
	}
	return s, e - s + 1, true, true
}

// manifestBytes returns a manifest by digest to a request allowed by g:
// kept copy, else the shared fetch (peers, then upstream), verified either
// way.
func (m *Mirror) manifestBytes(ctx context.Context, a *access, g grant, digest string) ([]byte, string, error) {
	if rc, ok := m.local(ctx, a, g, digest, maxManifestSize); ok {
		b, err := io.ReadAll(&blockReader{ctx: ctx, blocks: m.cfg.Blocks, r: rc, cur: -1})
		if err == nil && "sha256:"+hex.EncodeToString(sha256Sum(b)) == digest {
			return b, SourceLocal, nil
		}
	}
	f, err := m.join(digest, a, true, m.classFor(ctx, a, "manifests", digest))
	if err != nil {
		return nil, "", err
	}
	defer f.release()
	if err := f.waitVerified(ctx); err != nil {
		if errors.Is(err, ErrSpoolFull) && g == grantChecked {
			// No room on disk for 4 MiB: held in memory instead, not kept.
			b, err := m.manifestUpstream(ctx, a, digest)
			return b, SourceUpstream, err
		}
		return nil, "", err
	}
	b, err := io.ReadAll(&flightReader{ctx: ctx, f: f})
	return b, f.sourceName(), err
}

func sha256Sum(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

func (m *Mirror) serveManifestDigest(w http.ResponseWriter, r *http.Request, a *access, digest string) {
	g, err := m.authorize(r.Context(), a, "manifests", digest)
	if err != nil {
		m.failErr(w, r, a, "MANIFEST_UNKNOWN", err)
		return
	}
	b, source, err := m.manifestBytes(r.Context(), a, g, digest)
	if err != nil {
		m.failErr(w, r, a, "MANIFEST_UNKNOWN", err)
		return
	}
	m.writeManifest(w, r, b, digest, source)
}

// serveTag resolves a tag upstream with the client's credentials —
// always: a mirror must not serve a stale tag, and the answer is the
// client's access check — keeps the manifest and the tag, and serves it.
// Only when upstream cannot be reached does the tag's kept manifest
// answer, to a client the upstream gave it within OfflineGrace (or, for a
// repository declared public, if it is kept as public).
func (m *Mirror) serveTag(w http.ResponseWriter, r *http.Request, a *access, tag string) {
	ctx, cancel := context.WithTimeout(r.Context(), m.cfg.TagTimeout)
	defer cancel()
	repo, up := a.repo, a.up
	b, digest, err := m.resolveTag(ctx, a, tag, r.Header.Get("Accept"))
	if err == nil {
		m.passed(a, digest)
		if kept, kerr := m.keep.keepBytes(ctx, digest, b, m.classFor(ctx, a, "manifests", tag)); kerr != nil {
			m.log.Warn("could not keep manifest", "ref", repo.Name()+":"+tag, "err", kerr)
		} else {
			m.announce(digest, kept)
		}
		if terr := m.keep.setTag(up.Host, repo.RepositoryStr(), tag, digest); terr != nil {
			m.log.Warn("could not keep tag", "ref", repo.Name()+":"+tag, "err", terr)
		}
		m.writeManifest(w, r, b, digest, SourceUpstream)
		return
	}
	m.refused(a, err)
	if unreachable(err) && r.Context().Err() == nil {
		if digest, ok := m.keep.tag(up.Host, repo.RepositoryStr(), tag); ok {
			g := grantPublicOnly
			if m.checks.passed(a.checkKey(digest), m.cfg.OfflineGrace, time.Now()) {
				g = grantRecent
			}
			if g == grantRecent || up.public.match(repo.RepositoryStr()) {
				if b, _, kerr := m.manifestBytes(r.Context(), a, g, digest); kerr == nil {
					m.log.Warn("upstream unreachable: serving the tag's kept manifest", "ref", repo.Name()+":"+tag, "digest", digest, "err", err)
					m.writeManifest(w, r, b, digest, SourceLocal)
					return
				}
			}
		}
	}
	m.failErr(w, r, a, "MANIFEST_UNKNOWN", err)
}

// getManifest reads a manifest (by tag or digest) upstream, whole, at
// most maxManifestSize bytes; it returns the bytes and the digest upstream
// states for them ("" if none).
func (m *Mirror) getManifest(ctx context.Context, a *access, ref, accept string) ([]byte, string, error) {
	resp, err := m.get(ctx, a, "manifests", ref, accept)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	if resp.ContentLength > maxManifestSize {
		return nil, "", fmt.Errorf("%w: manifest of %d bytes", ErrTooLarge, resp.ContentLength)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return nil, "", &upstreamError{err: fmt.Errorf("upstream %s: reading manifest %s: %w", a.repo.RegistryStr(), ref, err)}
	}
	if len(b) > maxManifestSize {
		return nil, "", fmt.Errorf("%w: manifest over %d bytes", ErrTooLarge, maxManifestSize)
	}
	m.st.fetchedUpstream.Add(int64(len(b)))
	return b, resp.Header.Get("Docker-Content-Digest"), nil
}

// manifestUpstream reads a manifest by digest upstream into memory and
// checks it against its digest: for when it cannot be spooled.
func (m *Mirror) manifestUpstream(ctx context.Context, a *access, digest string) ([]byte, error) {
	b, _, err := m.getManifest(ctx, a, digest, manifestAccept)
	if err != nil {
		return nil, err
	}
	if got := "sha256:" + hex.EncodeToString(sha256Sum(b)); got != digest {
		m.st.mismatch.Add(1)
		return nil, fmt.Errorf("%w: upstream %s sent a manifest hashing to %s for %s", ErrDigestMismatch, a.repo.RegistryStr(), got, digest)
	}
	return b, nil
}

// resolveTag fetches a tag's manifest upstream and checks it against the
// digest upstream states, if any.
func (m *Mirror) resolveTag(ctx context.Context, a *access, tag, accept string) ([]byte, string, error) {
	repo := a.repo
	if accept == "" {
		accept = manifestAccept
	}
	b, stated, err := m.getManifest(ctx, a, tag, accept)
	if err != nil {
		return nil, "", err
	}
	digest := "sha256:" + hex.EncodeToString(sha256Sum(b))
	if stated != "" && stated != digest {
		if _, ok := parseDigest(stated); ok {
			m.st.mismatch.Add(1)
			return nil, "", fmt.Errorf("%w: upstream states %s for %s:%s, its bytes hash to %s", ErrDigestMismatch, stated, repo.Name(), tag, digest)
		}
	}
	return b, digest, nil
}

// writeManifest answers with a manifest's bytes (none for HEAD).
func (m *Mirror) writeManifest(w http.ResponseWriter, r *http.Request, b []byte, digest, source string) {
	h := w.Header()
	h.Set("Content-Type", mediaType(b))
	h.Set("Docker-Content-Digest", digest)
	h.Set("Etag", `"`+digest+`"`)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	n, _ := w.Write(b)
	m.served(source, int64(n))
}

// mediaType reads a manifest's media type from its own bytes (the digest
// covers them; a stored type would not be). Without a mediaType field it
// is told apart by its shape, as the OCI spec allows.
func mediaType(b []byte) string {
	var v struct {
		SchemaVersion int             `json:"schemaVersion"`
		MediaType     string          `json:"mediaType"`
		Manifests     json.RawMessage `json:"manifests"`
		Signatures    json.RawMessage `json:"signatures"`
	}
	if json.Unmarshal(b, &v) != nil {
		return "application/octet-stream"
	}
	switch {
	case v.MediaType != "":
		return v.MediaType
	case v.SchemaVersion == 1 && len(v.Signatures) > 0:
		return "application/vnd.docker.distribution.manifest.v1+prettyjws"
	case v.SchemaVersion == 1:
		return "application/vnd.docker.distribution.manifest.v1+json"
	case len(v.Manifests) > 0 && !bytes.Equal(v.Manifests, []byte("null")):
		return "application/vnd.oci.image.index.v1+json"
	}
	return "application/vnd.oci.image.manifest.v1+json"
}
