package mirror

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
)

// Sources of served bytes, as labels.
const (
	SourceLocal    = "local"
	SourcePeers    = "peers"
	SourceUpstream = "upstream"
)

// flight is one fetch of a blob (or a manifest by digest) that every
// concurrent request for it shares: it fills a spool file, and requests
// read from the file as far as the rules allow (readableLocked). The file
// closes, and its room is given back, when the fetch is over and the last
// reader has left.
type flight struct {
	digest string
	sp     *spool   // what the fetch writes through, within its reservation
	file   *os.File // sp's file, which readers read

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every change
	refs     int           // the fetch itself plus each attached reader
	size     int64         // -1 until it may be announced to clients
	written  int64         // bytes in the file, from offset 0
	stream   bool          // bytes may be read before the digest is verified
	verified bool
	source   string
	err      error
}

func newFlight(digest string, sp *spool) *flight {
	return &flight{digest: digest, sp: sp, file: sp.file, changed: make(chan struct{}), refs: 1, size: -1}
}

func (f *flight) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// readableLocked is how far readers may read. Verified: all of it. An
// upstream stream with a known size: what has arrived, except the last
// byte, which is released only once the whole blob matches its digest — a
// mismatch then ends every response short of its Content-Length, so no
// client ever completes a wrong blob. Otherwise (peers, manifests, unknown
// size): nothing before verification.
func (f *flight) readableLocked() int64 {
	switch {
	case f.verified:
		return f.size
	case f.stream && f.size > 0:
		return min(f.written, f.size-1)
	}
	return 0
}

// publish announces the size and lets readers stream (upstream, size
// known from the response headers).
func (f *flight) publish(size int64, source string) {
	f.mu.Lock()
	f.size, f.stream, f.source = size, true, source
	f.notifyLocked()
	f.mu.Unlock()
}

// wrote records that the file now holds n bytes from offset 0.
func (f *flight) wrote(n int64) {
	f.mu.Lock()
	f.written = n
	f.notifyLocked()
	f.mu.Unlock()
}

// verify marks the whole file as checked against the digest.
func (f *flight) verify(size int64, source string) {
	f.mu.Lock()
	f.size, f.written, f.verified, f.source = size, size, true, source
	f.notifyLocked()
	f.mu.Unlock()
}

// restart empties the file for the next source; nothing was readable.
func (f *flight) restart() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.written, f.size, f.stream = 0, -1, false
	return f.sp.empty()
}

// finish ends the fetch with err (nil after verify) and drops its reference.
func (f *flight) finish(err error) {
	f.mu.Lock()
	if !f.verified && err == nil {
		err = errors.New("mirror: fetch ended unverified")
	}
	if !f.verified {
		f.err = err
	}
	f.notifyLocked()
	f.mu.Unlock()
	f.release()
}

// attach adds a reader reference; callers hold the mirror's flight lock.
func (f *flight) attach() {
	f.mu.Lock()
	f.refs++
	f.mu.Unlock()
}

func (f *flight) release() {
	f.mu.Lock()
	f.refs--
	last := f.refs == 0
	f.mu.Unlock()
	if last {
		f.sp.close()
	}
}

// waitSize waits until the size may be told to clients, or the fetch failed.
func (f *flight) waitSize(ctx context.Context) (int64, error) {
	for {
		f.mu.Lock()
		size, err, ch := f.size, f.err, f.changed
		f.mu.Unlock()
		switch {
		case size >= 0:
			return size, nil
		case err != nil:
			return 0, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// waitVerified waits for the whole verified blob.
func (f *flight) waitVerified(ctx context.Context) error {
	for {
		f.mu.Lock()
		ok, err, ch := f.verified, f.err, f.changed
		f.mu.Unlock()
		switch {
		case ok:
			return nil
		case err != nil:
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (f *flight) sourceName() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.source
}

// flightReader reads a flight's file from off, waiting for bytes as the
// readability rules release them.
type flightReader struct {
	ctx context.Context
	f   *flight
	off int64
}

func (r *flightReader) Read(p []byte) (int, error) {
	f := r.f
	for {
		f.mu.Lock()
		lim, size, verified, err, ch := f.readableLocked(), f.size, f.verified, f.err, f.changed
		f.mu.Unlock()
		if r.off < lim {
			n, rerr := f.file.ReadAt(p[:min(int64(len(p)), lim-r.off)], r.off)
			r.off += int64(n)
			if n > 0 {
				return n, nil
			}
			return 0, rerr
		}
		if verified && r.off >= size {
			return 0, io.EOF
		}
		if err != nil {
			return 0, err
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// blockReader reads a kept blob from the block cache, from off. Every block
// is verified by the cache as it is read.
type blockReader struct {
	ctx    context.Context
	blocks Blocks
	r      *recipe
	off    int64
	cur    int
	buf    []byte
}

var errShortBlock = errors.New("mirror: kept block has the wrong length")

func (b *blockReader) Read(p []byte) (int, error) {
	if b.off >= b.r.size {
		return 0, io.EOF
	}
	i := int(b.off / b.r.chunk)
	id, start, n := b.r.block(i)
	if b.buf == nil || b.cur != i {
		data, err := b.blocks.Get(b.ctx, id)
		if err != nil {
			return 0, err
		}
		if int64(len(data)) != n {
			return 0, errShortBlock
		}
		b.buf, b.cur = data, i
	}
	c := copy(p, b.buf[b.off-start:])
	b.off += int64(c)
	return c, nil
}
