package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// manifestAccept is what the mirror asks upstream for when the client did
// not say: every manifest and index type containerd and ggcr know.
const manifestAccept = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, " +
	"application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, " +
	"application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json"

// upstreamError is an upstream answer that is not the content.
type upstreamError struct {
	status int // 0: no HTTP answer at all
	err    error
}

func (e *upstreamError) Error() string { return e.err.Error() }
func (e *upstreamError) Unwrap() error { return e.err }

// unreachable reports whether err means upstream could not be asked (no
// answer, a server error, or rate limiting), as opposed to a definite answer
// such as 404.
func unreachable(err error) bool {
	var ue *upstreamError
	if errors.As(err, &ue) {
		return ue.status == 0 || ue.status >= 500 || ue.status == http.StatusTooManyRequests
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded)
}

// clients caches one authenticated HTTP client per credential and
// upstream repository (ggcr's transport does the token dance and refreshes
// expired tokens). A client is never shared between credentials: the key
// is the credential's key, and a client's own credentials are in its
// transport only.
type clients struct {
	keychain authn.Keychain
	base     http.RoundTripper

	mu sync.Mutex
	m  map[clientKey]*http.Client
}

type clientKey struct{ cred, repo string }

// maxClients bounds the cache; when full it is emptied (clients are cheap
// to make again: one ping of the registry, one token).
const maxClients = 512

func (c *clients) get(ctx context.Context, a *access) (*http.Client, error) {
	key := clientKey{cred: a.cred.key, repo: a.repo.Name()}
	c.mu.Lock()
	cl := c.m[key]
	c.mu.Unlock()
	if cl != nil {
		return cl, nil
	}
	auth := a.cred.auth
	if auth == nil { // the daemon's own, for a shared repository
		var err error
		if auth, err = c.keychain.Resolve(a.repo.Registry); err != nil {
			return nil, &upstreamError{status: http.StatusUnauthorized, err: fmt.Errorf("the daemon's credentials for %s: %w", a.repo.RegistryStr(), err)}
		}
	}
	rt, err := transport.NewWithContext(ctx, a.repo.Registry, auth, c.base, []string{a.repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, classify(a.repo.RegistryStr(), err)
	}
	cl = &http.Client{Transport: rt}
	c.mu.Lock()
	if len(c.m) >= maxClients {
		clear(c.m)
	}
	c.m[key] = cl
	c.mu.Unlock()
	return cl, nil
}

// classify turns a ggcr transport error into an upstreamError with its
// HTTP status when there was one.
func classify(host string, err error) error {
	var te *transport.Error
	if errors.As(err, &te) {
		return &upstreamError{status: te.StatusCode, err: fmt.Errorf("upstream %s: %w", host, err)}
	}
	return &upstreamError{err: fmt.Errorf("upstream %s unreachable: %w", host, err)}
}

// get sends GET /v2/<repo>/<kind>/<ref> upstream as a's client and
// returns the response if it is a 200; any other answer is an
// upstreamError (404 wraps ErrNotFound). The caller closes the body.
func (m *Mirror) get(ctx context.Context, a *access, kind, ref, accept string) (*http.Response, error) {
	return m.send(ctx, http.MethodGet, a, kind, ref, accept, "")
}

// head asks upstream, as a's client, whether it would serve kind/ref: nil
// for a 200, an upstreamError otherwise (404 wraps ErrNotFound). The size
// of a blob or manifest by digest is remembered (checks.size).
func (m *Mirror) head(ctx context.Context, a *access, kind, ref string) error {
	m.st.checks.Add(1)
	accept := ""
	if kind == "manifests" {
		accept = manifestAccept
	}
	resp, err := m.send(ctx, http.MethodHead, a, kind, ref, accept, "")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if _, isDigest := parseDigest(ref); isDigest && resp.ContentLength >= 0 {
		m.checks.setSize(ref, resp.ContentLength)
	}
	return nil
}

// send sends method /v2/<repo>/<kind>/<ref> upstream as a's client, with
// a Range header when rng is not "" (then a 206 is a success too).
func (m *Mirror) send(ctx context.Context, method string, a *access, kind, ref, accept, rng string) (*http.Response, error) {
	repo := a.repo
	cl, err := m.clients.get(ctx, a)
	if err != nil {
		return nil, err
	}
	u := url.URL{Scheme: repo.Scheme(), Host: repo.RegistryStr(), Path: "/v2/" + repo.RepositoryStr() + "/" + kind + "/" + ref}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return nil, err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	// Identity: the bytes must be the blob's, not a transfer encoding of it.
	req.Header.Set("Accept-Encoding", "identity")
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := cl.Do(req)
	if err != nil {
		return nil, &upstreamError{err: fmt.Errorf("upstream %s unreachable: %w", repo.RegistryStr(), err)}
	}
	if resp.StatusCode == http.StatusOK || (rng != "" && resp.StatusCode == http.StatusPartialContent) {
		return resp, nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	resp.Body.Close()
	err = fmt.Errorf("upstream %s: %s %s/%s/%s: %s: %s", repo.RegistryStr(), method, repo.RepositoryStr(), kind, ref, resp.Status, strings.TrimSpace(string(msg)))
	if resp.StatusCode == http.StatusNotFound {
		err = fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return nil, &upstreamError{status: resp.StatusCode, err: err}
}
