package fetch

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
)

var (
	// ErrNotFlat is returned by OpenImage for a reference that names a plain
	// image (or an image index) instead of a flat image.
	ErrNotFlat = errors.New("not a shoal flat image")
	// ErrNotFound is wrapped when the registry answers 404 for a manifest or blob.
	ErrNotFound = errors.New("not found in the registry")
	// ErrDenied is wrapped when the registry answers 401 or 403.
	ErrDenied = errors.New("access denied by the registry (run `docker login` for it, or check the credentials)")
	// ErrTimeout is wrapped when a request passes its deadline or stalls.
	ErrTimeout = errors.New("registry request timed out")
	// ErrShortBody is wrapped when a response ends before the bytes asked for.
	ErrShortBody = errors.New("registry response ended early")
)

// statusError is an HTTP answer the reader did not want.
type statusError struct {
	code       int
	retryAfter time.Duration
	detail     string // start of the body, for registries that explain themselves
}

func (e *statusError) Error() string {
	msg := fmt.Sprintf("HTTP %d", e.code)
	if s := e.Unwrap(); s != nil {
		msg += ": " + s.Error()
	} else if e.code >= 500 {
		msg += ": the registry failed"
	} else if e.code == http.StatusTooManyRequests {
		msg += ": the registry is rate limiting requests"
	}
	if e.detail != "" {
		msg += " (" + e.detail + ")"
	}
	return msg
}

func (e *statusError) Unwrap() error {
	switch e.code {
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusUnauthorized, http.StatusForbidden:
		return ErrDenied
	}
	return nil
}

func newStatusError(resp *http.Response, detail []byte) *statusError {
	d := strings.TrimSpace(string(detail))
	if len(d) > 200 {
		d = d[:200] + "…"
	}
	d = strings.Join(strings.Fields(d), " ") // one line
	return &statusError{code: resp.StatusCode, retryAfter: parseRetryAfter(resp.Header.Get("Retry-After")), detail: d}
}

func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return min(time.Duration(s)*time.Second, maxRetryAfter)
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), maxRetryAfter)
	}
	return 0
}

// translate turns ggcr's transport errors into this package's, so that
// callers can test for ErrNotFound and ErrDenied whatever made the request.
func translate(err error) error {
	var terr *transport.Error
	if errors.As(err, &terr) {
		se := &statusError{code: terr.StatusCode}
		if len(terr.Errors) > 0 {
			se.detail = terr.Errors[0].String()
		}
		if se.Unwrap() != nil || terr.StatusCode >= 500 || terr.StatusCode == http.StatusTooManyRequests {
			return se
		}
	}
	return err
}

// retryable reports whether an attempt that failed with err is worth
// repeating: network trouble, timeouts, 5xx, 429 and 408, short bodies and
// bytes that do not match their digest. Answers that will not change (404,
// 401, 403, other 4xx) and certificate problems are not.
func retryable(err error) bool {
	var se *statusError
	var terr *transport.Error
	var cverr *tls.CertificateVerificationError
	var uaerr x509.UnknownAuthorityError
	var hnerr x509.HostnameError
	switch {
	case errors.As(err, &se):
		return se.code >= 500 || se.code == http.StatusTooManyRequests || se.code == http.StatusRequestTimeout
	case errors.As(err, &terr):
		return terr.StatusCode >= 500 || terr.StatusCode == http.StatusTooManyRequests || terr.StatusCode == http.StatusRequestTimeout
	case errors.Is(err, ErrNotFlat), errors.Is(err, flat.ErrMalformed), errors.Is(err, errBadRequest), errors.Is(err, bounded.ErrTooLarge):
		return false
	case errors.As(err, &cverr), errors.As(err, &uaerr), errors.As(err, &hnerr):
		return false
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return false
	}
	return true
}

// errBadRequest marks mistakes of the caller (a block outside its blob) that
// no retry can fix.
var errBadRequest = errors.New("bad request")

// retryDelay returns the pause before retry number n (1 for the first retry):
// full jitter over an exponentially growing window, or the server's
// Retry-After if that is longer.
func (c *config) retryDelay(n int, err error) time.Duration {
	var d time.Duration
	if c.backoff > 0 {
		window := c.backoff << min(n-1, 20)
		if window > c.maxBackoff || window <= 0 { // <= 0: shifted past the top
			window = c.maxBackoff
		}
		d = rand.N(window) + 1
	}
	var se *statusError
	if errors.As(err, &se) && se.retryAfter > d {
		d = se.retryAfter
	}
	return d
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// retry runs op until it succeeds, fails with an error not worth retrying,
// ctx ends, or c.attempts attempts have failed.
func (c *config) retry(ctx context.Context, what string, op func(context.Context) error) error {
	var err error
	for attempt := 1; ; attempt++ {
		if err = op(ctx); err == nil {
			return nil
		}
		if ctx.Err() != nil || !retryable(err) || attempt >= c.attempts {
			return err
		}
		d := c.retryDelay(attempt, err)
		c.log.Debug("retrying", "component", "fetch", "what", what, "attempt", attempt, "delay", d, "err", err)
		if serr := sleep(ctx, d); serr != nil {
			return joinErrors(err, serr)
		}
	}
}

// joinErrors is errors.Join on one line ("a; b"), for messages that end up
// in logs and terminals.
func joinErrors(errs ...error) error {
	var kept multiError
	for _, e := range errs {
		if e != nil {
			kept = append(kept, e)
		}
	}
	switch len(kept) {
	case 0:
		return nil
	case 1:
		return kept[0]
	}
	return kept
}

type multiError []error

func (m multiError) Error() string {
	parts := make([]string, len(m))
	for i, e := range m {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

func (m multiError) Unwrap() []error { return m }
