package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
)

// blobClient issues GETs on one repository's blobs through an authenticated
// transport, each with a deadline and a stall timer, and counts what it
// received.
type blobClient struct {
	cfg    *config
	client *http.Client
	repo   name.Repository

	requests atomic.Int64 // HTTP requests sent (each attempt counts)
	bytes    atomic.Int64 // response body bytes received, error bodies included
}

func newBlobClient(cfg *config, repo name.Repository, rt http.RoundTripper) *blobClient {
	// The default redirect policy is what registries need: blob GETs are
	// often redirected to object storage, Go resends the request with its
	// headers (Range included), and ggcr's transports attach credentials
	// only to requests for the registry's own host.
	return &blobClient{cfg: cfg, client: &http.Client{Transport: rt}, repo: repo}
}

func (c *blobClient) blobURL(digest string) string {
	u := url.URL{
		Scheme: c.repo.Scheme(),
		Host:   c.repo.RegistryStr(),
		Path:   "/v2/" + c.repo.RepositoryStr() + "/blobs/" + digest,
	}
	return u.String()
}

// get returns bytes [off, off+n) of blob digest, whose size is blobSize.
// With whole set it asks for the blob without a Range header (n must then be
// blobSize). A 206 answer must cover the range (Content-Range is checked); a
// 200 answer is the whole blob, read up to the end of the range and cut.
// timeout bounds the request from send to last byte.
func (c *blobClient) get(ctx context.Context, digest string, off, n, blobSize int64, whole bool, timeout time.Duration) ([]byte, error) {
	parent := ctx
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("no complete answer within the %v request deadline: %w", timeout, ErrTimeout))
	defer cancel()
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var timer *time.Timer
	if c.cfg.stall > 0 {
		timer = time.AfterFunc(c.cfg.stall, func() { stop(fmt.Errorf("stalled: no bytes for %v: %w", c.cfg.stall, ErrTimeout)) })
		defer timer.Stop()
	}
	// fail prefers, in order: the caller's own cancellation, our deadline or
	// stall (which surface from net/http as a bare "context canceled"), then
	// the error itself.
	fail := func(err error) error {
		if perr := parent.Err(); perr != nil {
			return perr
		}
		if cause := context.Cause(ctx); cause != nil {
			return cause
		}
		return err
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.blobURL(digest), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errBadRequest, err)
	}
	// Identity, so that Go's transport does not ask for gzip: a range of a
	// gzip-encoded representation is not a range of the blob.
	req.Header.Set("Accept-Encoding", "identity")
	if !whole {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	}
	c.requests.Add(1)
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, fail(translate(err))
	}
	defer resp.Body.Close()
	body := &countingReader{r: resp.Body, n: &c.bytes, timer: timer, stall: c.cfg.stall}

	skip := off // bytes of the body before the wanted range
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if whole {
			return nil, fmt.Errorf("HTTP 206 to a request without Range: %w", ErrShortBody)
		}
		start, end, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return nil, err
		}
		if start > off || end < off+n-1 {
			return nil, fmt.Errorf("asked for bytes %d-%d, got Content-Range %d-%d", off, off+n-1, start, end)
		}
		skip = off - start
	case http.StatusOK:
		if resp.ContentLength >= 0 && resp.ContentLength != blobSize {
			return nil, fmt.Errorf("whole-blob answer of %d bytes, the blob has %d: %w", resp.ContentLength, blobSize, ErrShortBody)
		}
	default:
		detail, _ := io.ReadAll(io.LimitReader(body, 4<<10))
		return nil, fail(newStatusError(resp, detail))
	}
	if skip > 0 {
		if k, err := io.CopyN(io.Discard, body, skip); err != nil {
			return nil, fail(short(err, off+n, k))
		}
	}
	buf, err := readN(body, n, whole)
	if err != nil {
		return nil, fail(short(err, n, int64(len(buf))))
	}
	return buf, nil
}

// firstRead is the buffer a whole blob's read starts with.
const firstRead = 64 << 10

// readN reads exactly n bytes of r. A range's n is the caller's own plan,
// allocated at once; a whole blob's is what its manifest claims (up to
// flat.MaxIndexSize for an index), so its buffer grows as the bytes
// arrive, doubling from firstRead, never past n. On error it returns what
// it read.
func readN(r io.Reader, n int64, whole bool) ([]byte, error) {
	if !whole || n <= firstRead {
		buf := make([]byte, n)
		k, err := io.ReadFull(r, buf)
		return buf[:k], err
	}
	buf := make([]byte, 0, firstRead)
	for int64(len(buf)) < n {
		if len(buf) == cap(buf) {
			buf = append(make([]byte, 0, min(n, 2*int64(cap(buf)))), buf...)
		}
		k, err := io.ReadFull(r, buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+k]
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

func short(err error, want, got int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%d of %d bytes: %w", got, want, ErrShortBody)
	}
	return fmt.Errorf("read body after %d of %d bytes: %w", got, want, err)
}

// parseContentRange parses "bytes first-last/size" (size may be "*").
func parseContentRange(v string) (first, last int64, err error) {
	bad := func() (int64, int64, error) { return 0, 0, fmt.Errorf("bad Content-Range %q", v) }
	r, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return bad()
	}
	r, _, ok = strings.Cut(r, "/")
	if !ok {
		return bad()
	}
	a, b, ok := strings.Cut(r, "-")
	if !ok {
		return bad()
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || first < 0 || last < first {
		return bad()
	}
	return first, last, nil
}

// countingReader counts body bytes into n and pushes the stall timer back
// whenever bytes arrive.
type countingReader struct {
	r     io.Reader
	n     *atomic.Int64
	timer *time.Timer
	stall time.Duration
}

func (r *countingReader) Read(p []byte) (int, error) {
	k, err := r.r.Read(p)
	if k > 0 {
		r.n.Add(int64(k))
		if r.timer != nil {
			r.timer.Reset(r.stall)
		}
	}
	return k, err
}
