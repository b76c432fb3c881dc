package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/shoal-project/shoal/blockstore"
)

// ErrSpoolFull is returned for a blob that does not fit in the room the
// spool may take: the mirror's MaxSpool, or the block cache's quota and
// free-space guard (Space). Such a blob is streamed from upstream to each
// client without being written to disk or kept.
var ErrSpoolFull = errors.New("mirror: no room to spool the blob")

// Space is an optional extension of Blocks, found by type assertion: the
// block cache's quota and free-space guard, which spool files count
// against (blockstore.Store.Reserve). *blockstore.Store has it. Without
// it, only Config.MaxSpool bounds the spool.
type Space interface {
	Reserve(n int64) (*blockstore.Reservation, error)
}

var _ Space = (*blockstore.Store)(nil)

// spoolStep is how much more room a fetch from an upstream that does not
// announce the blob's size asks for at a time.
const spoolStep = 64 << 20

// budget is the room all spool files may take together.
type budget struct {
	max   int64 // Config.MaxSpool
	space Space // nil: max only

	mu   sync.Mutex
	used int64 // bytes reserved by the spools
}

func (b *budget) reserved() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// spool is a fetch's file with the room reserved for it. Writes past the
// reservation fail, so no source — a peer's recipe, an upstream that sends
// more than it announced — makes the file grow beyond what was granted.
type spool struct {
	file *os.File
	b    *budget

	mu   sync.Mutex
	size int64 // reserved
	used int64 // bytes written since the file was last emptied
	res  *blockstore.Reservation
}

// reserve makes the reservation n bytes: before anything is written, when
// the blob's size is known, or as an upstream of unknown length sends
// more. It fails with ErrSpoolFull, and holds nothing, when n does not
// fit: past MaxSpool with the other spools, or refused by the cache.
func (s *spool) reserve(n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n == s.size {
		return nil
	}
	b := s.b
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= s.size
	s.size = 0
	if s.res != nil {
		s.res.Release()
		s.res = nil
	}
	if b.used+n > b.max {
		return fmt.Errorf("%w: %d bytes, with %d held by other fetches, exceed the spool's limit of %d", ErrSpoolFull, n, b.used, b.max)
	}
	if b.space != nil {
		res, err := b.space.Reserve(n)
		if err != nil {
			return fmt.Errorf("%w: %d bytes: %w", ErrSpoolFull, n, err)
		}
		res.Used(s.used)
		s.res = res
	}
	b.used += n
	s.size = n
	return nil
}

// grow makes the reservation at least end bytes, for a source of unknown
// length: a step more when that fits (up to limit), else just end.
func (s *spool) grow(end, limit int64) error {
	if step := min(limit, max(end, s.limit()+spoolStep)); step > end && s.reserve(step) == nil {
		return nil
	}
	return s.reserve(end)
}

// limit is the bytes the file may hold.
func (s *spool) limit() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.size
}

// WriteAt writes p at off within the reservation.
func (s *spool) WriteAt(p []byte, off int64) (int, error) {
	if lim := s.limit(); off < 0 || off+int64(len(p)) > lim {
		return 0, fmt.Errorf("%w: a write of %d bytes at %d, past the %d reserved", ErrSpoolFull, len(p), off, lim)
	}
	n, err := s.file.WriteAt(p, off)
	s.mu.Lock()
	s.used += int64(n)
	if s.res != nil {
		s.res.Used(s.used)
	}
	s.mu.Unlock()
	return n, err
}

// truncate sets the file's length within the reservation (the file stays
// sparse: no room is used until bytes are written).
func (s *spool) truncate(n int64) error {
	if lim := s.limit(); n > lim {
		return fmt.Errorf("%w: a file of %d bytes, past the %d reserved", ErrSpoolFull, n, lim)
	}
	return s.file.Truncate(n)
}

// empty drops the file's contents for the next source; the reservation
// stays.
func (s *spool) empty() error {
	err := s.file.Truncate(0)
	s.mu.Lock()
	s.used = 0
	if s.res != nil {
		s.res.Used(0)
	}
	s.mu.Unlock()
	return err
}

// close closes the file (unlinked: its room is free again) and gives the
// reservation back.
func (s *spool) close() {
	_ = s.file.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b.mu.Lock()
	s.b.used -= s.size
	s.b.mu.Unlock()
	s.size = 0
	if s.res != nil {
		s.res.Release()
		s.res = nil
	}
}

// streamUpstream serves a blob that could not be spooled (why) straight
// from upstream to this one request: nothing is written to disk or kept,
// and each such request is a GET of its own. The rule of streamed blobs
// holds: the blob's last byte is sent only once the whole blob matched its
// digest, or the response is cut short. A blob whose size upstream does
// not announce cannot be served so: the request gets why (503).
func (m *Mirror) streamUpstream(w http.ResponseWriter, r *http.Request, a *access, digest string, why error) {
	ctx, stop := context.WithCancelCause(r.Context())
	defer stop(nil)
	upstream := func() string { return SourceUpstream }
	if r.Method == http.MethodHead {
		size, ok := m.checks.size(digest)
		if !ok {
			if err := m.head(ctx, a, "blobs", digest); err != nil {
				m.failErr(w, r, a, "BLOB_UNKNOWN", err)
				return
			}
			if size, ok = m.checks.size(digest); !ok {
				m.failErr(w, r, a, "BLOB_UNKNOWN", why)
				return
			}
		}
		m.serveRange(w, r, digest, size, nil, upstream)
		return
	}
	resp, err := m.get(ctx, a, "blobs", digest, "")
	if err != nil {
		m.refused(a, err)
		m.failErr(w, r, a, "BLOB_UNKNOWN", err)
		return
	}
	defer resp.Body.Close()
	size := resp.ContentLength
	switch {
	case size > m.cfg.MaxBlobSize:
		m.failErr(w, r, a, "BLOB_UNKNOWN", fmt.Errorf("%w: upstream announces %d bytes for %s, limit %d", ErrTooLarge, size, digest, m.cfg.MaxBlobSize))
		return
	case size < 0:
		m.failErr(w, r, a, "BLOB_UNKNOWN", fmt.Errorf("%w; upstream does not announce its size, so it cannot be streamed unspooled either", why))
		return
	}
	stall := time.AfterFunc(m.cfg.StallTimeout, func() {
		stop(fmt.Errorf("upstream sent nothing for %v", m.cfg.StallTimeout))
	})
	defer stall.Stop()
	body := &checkedBody{ctx: ctx, body: resp.Body, h: sha256.New(), digest: digest, size: size,
		progress: func() { stall.Reset(m.cfg.StallTimeout) }, mismatch: func() { m.st.mismatch.Add(1) }}
	m.serveRange(w, r, digest, size, func(off int64) io.Reader {
		body.skip = off
		return body
	}, upstream)
}

// checkedBody reads a blob of size bytes from an upstream response, from
// skip on (the bytes before are read and hashed), and holds its last byte
// back until the whole blob hashed to digest.
type checkedBody struct {
	ctx      context.Context
	body     io.Reader
	h        hash.Hash
	digest   string
	size     int64
	skip     int64
	pos      int64
	progress func() // bytes arrived
	mismatch func() // the blob did not match its digest

	scratch []byte
}

// read reads into p, hashing what arrives; the body ending before size
// bytes is an error.
func (c *checkedBody) read(p []byte) (int, error) {
	n, err := c.body.Read(p)
	if n > 0 {
		c.h.Write(p[:n])
		c.pos += int64(n)
		c.progress()
	}
	if err != nil && c.ctx.Err() != nil {
		err = context.Cause(c.ctx)
	}
	if errors.Is(err, io.EOF) && c.pos < c.size {
		err = fmt.Errorf("upstream ended %s after %d of %d bytes: %w", c.digest, c.pos, c.size, io.ErrUnexpectedEOF)
	}
	return n, err
}

func (c *checkedBody) Read(p []byte) (int, error) {
	for c.pos < c.skip {
		if c.scratch == nil {
			c.scratch = make([]byte, 64<<10)
		}
		if _, err := c.read(c.scratch[:min(int64(len(c.scratch)), c.skip-c.pos)]); err != nil {
			return 0, err
		}
	}
	switch {
	case c.pos >= c.size:
		return 0, io.EOF
	case len(p) == 0:
		return 0, nil
	case c.pos < c.size-1:
		return c.read(p[:min(int64(len(p)), c.size-1-c.pos)])
	}
	// The last byte: released only if the whole blob is the one asked for.
	var last [1]byte
	for c.pos < c.size {
		if _, err := c.read(last[:]); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
	}
	if got := "sha256:" + hex.EncodeToString(c.h.Sum(nil)); got != c.digest {
		c.mismatch()
		return 0, fmt.Errorf("%w: upstream sent %d bytes hashing to %s for %s", ErrDigestMismatch, c.size, got, c.digest)
	}
	p[0] = last[0]
	return 1, nil
}
