package mirror

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// ErrBadCredentials: the request's Authorization header is malformed or of
// a scheme the mirror does not forward.
var ErrBadCredentials = errors.New("mirror: bad credentials")

// class is what a kept blob may be shared as. The order matters: a blob's
// recorded class only ever rises (public content stays public).
type class uint8

const (
	// classPrivate: fetched with a client's credentials from a repository
	// not known to be public, or kept before classes were recorded.
	classPrivate class = iota
	// classShared: fetched with the daemon's credentials for a repository
	// the config shares with the mirror's clients.
	classShared
	// classPublic: its repository is served anonymously upstream (or
	// declared public in the config).
	classPublic
)

func (c class) String() string {
	switch c {
	case classPublic:
		return "public"
	case classShared:
		return "shared"
	}
	return "private"
}

// credential is who a request acts as upstream.
type credential struct {
	// key names the credential in caches: a keyed hash of the client's
	// Authorization header, or credAnonymous or credDaemon. The header
	// itself is kept only inside auth.
	key  string
	auth authn.Authenticator // nil for the daemon's keychain, resolved per registry
}

const (
	credAnonymous = "anonymous"
	credDaemon    = "daemon"
)

func (c credential) anonymous() bool { return c.key == credAnonymous }

// credentialOf reads a client's Authorization header. Basic credentials are
// used upstream as the client's username and password (ggcr's transport
// trades them for a token where the registry wants one); a Bearer token is
// forwarded as a registry token. Anything else is ErrBadCredentials.
func credentialOf(h string, salt []byte) (credential, error) {
	if h == "" {
		return credential{key: credAnonymous, auth: authn.Anonymous}, nil
	}
	scheme, value, _ := strings.Cut(h, " ")
	value = strings.TrimSpace(value)
	mac := hmac.New(sha256.New, salt)
	mac.Write([]byte(h))
	key := "client:" + hex.EncodeToString(mac.Sum(nil)[:16])
	switch {
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(value)
		if err != nil {
			return credential{}, fmt.Errorf("%w: Basic credentials are not base64", ErrBadCredentials)
		}
		user, pass, ok := strings.Cut(string(raw), ":")
		if !ok || user == "" {
			return credential{}, fmt.Errorf("%w: Basic credentials are not user:password", ErrBadCredentials)
		}
		return credential{key: key, auth: &authn.Basic{Username: user, Password: pass}}, nil
	case strings.EqualFold(scheme, "Bearer"):
		if value == "" {
			return credential{}, fmt.Errorf("%w: empty Bearer token", ErrBadCredentials)
		}
		return credential{key: key, auth: &authn.Bearer{Token: value}}, nil
	}
	return credential{}, fmt.Errorf("%w: unsupported Authorization scheme %q (Basic or Bearer)", ErrBadCredentials, scheme)
}

// newSalt keys the hashes that name client credentials in the mirror's
// caches, so that a hash seen in memory cannot be tested against guesses.
func newSalt() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}

// access is one request's reach upstream: the repository and who asks.
type access struct {
	up   *Upstream
	repo name.Repository
	cred credential
}

// repoKey names the repository across upstreams (Host, as clients name it).
func (a *access) repoKey() string { return a.up.Host + "/" + a.repo.RepositoryStr() }

func (a *access) checkKey(digest string) checkKey {
	return checkKey{cred: a.cred.key, repo: a.repoKey(), digest: digest}
}

// Repository patterns (Upstream.SharedRepositories, PublicRepositories): a
// repository name ("team/app"), a name followed by "/*" (every repository
// below it, at any depth: "team/*"), or "*" (every repository).
type patterns []string

func parsePatterns(field string, in []string) (patterns, error) {
	seen := map[string]bool{}
	for _, p := range in {
		base, _ := strings.CutSuffix(p, "/*")
		switch {
		case p == "*":
		case p == "":
			return nil, fmt.Errorf("%s: empty pattern", field)
		case !nameRE.MatchString(base) || len(base) > 255:
			return nil, fmt.Errorf("%s: %q is not a repository name, a name followed by /*, or *", field, p)
		}
		if seen[p] {
			return nil, fmt.Errorf("%s: %q listed twice", field, p)
		}
		seen[p] = true
	}
	return patterns(in), nil
}

func (ps patterns) match(repo string) bool {
	for _, p := range ps {
		if p == "*" || p == repo {
			return true
		}
		if base, ok := strings.CutSuffix(p, "/*"); ok && strings.HasPrefix(repo, base+"/") {
			return true
		}
	}
	return false
}

// checkKey names one positive answer of the upstream: cred may read digest
// of repo.
type checkKey struct{ cred, repo, digest string }

// checks remembers positive upstream answers (who may read what) and which
// repositories are public. Bounded: when full, entries too old to be used
// are dropped, and if that is not enough, all of them.
type checks struct {
	mu     sync.Mutex
	ok     map[checkKey]time.Time
	public map[string]publicEntry // repoKey → anonymous reads work or not
	sizes  map[string]int64       // blob digest → size, as a HEAD upstream stated it
}

type publicEntry struct {
	public bool
	at     time.Time
}

const (
	maxChecks       = 1 << 16
	maxPublicChecks = 1 << 12
)

func newChecks() *checks {
	return &checks{ok: map[checkKey]time.Time{}, public: map[string]publicEntry{}, sizes: map[string]int64{}}
}

// passed reports whether k was answered positively within age.
func (c *checks) passed(k checkKey, age time.Duration, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.ok[k]
	return ok && now.Sub(at) < age
}

func (c *checks) pass(k checkKey, now time.Time, keep time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.ok) >= maxChecks {
		for k, at := range c.ok {
			if now.Sub(at) >= keep {
				delete(c.ok, k)
			}
		}
		if len(c.ok) >= maxChecks {
			clear(c.ok)
		}
	}
	c.ok[k] = now
}

// isPublic returns what is known, within ttl, of whether repo serves
// anonymous reads.
func (c *checks) isPublic(repo string, ttl time.Duration, now time.Time) (public, known bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.public[repo]
	if !ok || now.Sub(e.at) >= ttl {
		return false, false
	}
	return e.public, true
}

// size returns a blob's size as upstream last stated it: where a private
// blob's window lies. A wrong size only gives a name no holder has.
func (c *checks) size(digest string) (int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.sizes[digest]
	return n, ok
}

func (c *checks) setSize(digest string, n int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sizes) >= maxChecks {
		clear(c.sizes)
	}
	c.sizes[digest] = n
}

func (c *checks) setPublic(repo string, public bool, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.public) >= maxPublicChecks {
		clear(c.public)
	}
	c.public[repo] = publicEntry{public: public, at: now}
}

// grant is how a request for content by digest was allowed.
type grant int

const (
	// grantChecked: the upstream says this credential may read it (now,
	// or within CheckTTL).
	grantChecked grant = iota + 1
	// grantRecent: the upstream cannot be reached, and it said so within
	// OfflineGrace.
	grantRecent
	// grantPublicOnly: the upstream cannot be reached, the repository is
	// declared public: only public content (kept public, or from peers)
	// may be served.
	grantPublicOnly
)

// credentialFor is who a request acts as for repo: the daemon's keychain
// for a repository the config shares, otherwise the client's own
// Authorization (anonymous without one).
func (m *Mirror) credentialFor(r *http.Request, up *Upstream, repo string) (credential, error) {
	if up.shared.match(repo) {
		return credential{key: credDaemon}, nil
	}
	return credentialOf(r.Header.Get("Authorization"), m.salt)
}

// authorize decides whether a's client may read kind/digest (kind
// "blobs" or "manifests") of a's repository: a positive answer of the
// upstream to a HEAD with the client's credentials, remembered for
// CheckTTL. When the upstream cannot be reached, a positive answer within
// OfflineGrace still counts; failing that, a repository declared public
// gets public content only.
func (m *Mirror) authorize(ctx context.Context, a *access, kind, digest string) (grant, error) {
	k := a.checkKey(digest)
	if m.checks.passed(k, m.cfg.CheckTTL, time.Now()) {
		return grantChecked, nil
	}
	err := m.head(ctx, a, kind, digest)
	if err == nil {
		m.passed(a, digest)
		return grantChecked, nil
	}
	if !unreachable(err) || ctx.Err() != nil {
		m.refused(a, err)
		return 0, err
	}
	if m.checks.passed(k, m.cfg.OfflineGrace, time.Now()) {
		m.log.Info("upstream unreachable: serving on a recent positive check", "repo", a.repoKey(), "digest", digest, "err", err)
		return grantRecent, nil
	}
	if a.up.public.match(a.repo.RepositoryStr()) {
		return grantPublicOnly, nil
	}
	return 0, err
}

// passed records that the upstream gave a's client digest.
func (m *Mirror) passed(a *access, digest string) {
	now := time.Now()
	m.checks.pass(a.checkKey(digest), now, m.cfg.OfflineGrace)
	if a.cred.anonymous() {
		m.checks.setPublic(a.repoKey(), true, now)
	}
}

// refused notes an upstream refusal: counted, and an anonymous 401/403
// marks the repository as not public.
func (m *Mirror) refused(a *access, err error) {
	var ue *upstreamError
	if errors.As(err, &ue) && (ue.status == http.StatusUnauthorized || ue.status == http.StatusForbidden) {
		m.st.denied.Add(1)
		if a.cred.anonymous() {
			m.checks.setPublic(a.repoKey(), false, time.Now())
		}
	}
}

// classFor is the class content fetched for a will be kept as: public when
// its repository is declared public or serves anonymous reads (asked with
// an anonymous HEAD of kind/ref when not known, remembered for CheckTTL),
// else shared or private by who fetched it.
func (m *Mirror) classFor(ctx context.Context, a *access, kind, ref string) class {
	if a.cred.anonymous() || a.up.public.match(a.repo.RepositoryStr()) {
		return classPublic
	}
	now := time.Now()
	public, known := m.checks.isPublic(a.repoKey(), m.cfg.CheckTTL, now)
	if !known {
		anon := &access{up: a.up, repo: a.repo, cred: credential{key: credAnonymous, auth: authn.Anonymous}}
		pctx, cancel := context.WithTimeout(ctx, m.cfg.TagTimeout)
		err := m.head(pctx, anon, kind, ref)
		cancel()
		switch {
		case err == nil:
			public, known = true, true
		case !unreachable(err):
			known = true
		}
		if known {
			m.checks.setPublic(a.repoKey(), public, now)
		}
	}
	switch {
	case public:
		return classPublic
	case a.cred.key == credDaemon:
		return classShared
	}
	return classPrivate
}

// challenge is the WWW-Authenticate header of a 401: Basic, so that
// containerd, crane and CRI send the credentials they have for the
// registry on their next try.
func challenge(up *Upstream) string {
	realm := "shoal mirror"
	if up != nil {
		realm = up.Host + " via shoal mirror"
	}
	return `Basic realm="` + realm + `"`
}
