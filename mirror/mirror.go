package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Errors a request can end with; each maps to an OCI error code.
var (
	// ErrNotFound: neither the swarm nor upstream has the content.
	ErrNotFound = errors.New("mirror: not found")
	// ErrUpstreamRefused: the request names an upstream not configured.
	ErrUpstreamRefused = errors.New("mirror: upstream not allowed")
	// ErrDigestMismatch: the content a source sent does not match its digest.
	ErrDigestMismatch = errors.New("mirror: content does not match its digest")
	// ErrTooLarge: the content exceeds the mirror's size limit.
	ErrTooLarge = errors.New("mirror: content too large")
	// ErrBadPeer: a peer sent data that failed verification.
	ErrBadPeer = errors.New("mirror: peer sent bad data")
	// ErrNoPeers: no peer holds the blob (or there is no swarm).
	ErrNoPeers = errors.New("mirror: no peer holds the blob")
	// ErrPeerBusy: a peer had no upload slot free; it may be asked again
	// in a moment.
	ErrPeerBusy = errors.New("mirror: peer busy")
)

// Upstream is a registry the mirror may fetch from.
type Upstream struct {
	// Host is the registry's name as clients use it: containerd sends it
	// as ?ns=<host> on mirror requests ("docker.io", "registry.example:5000").
	Host string
	// Endpoint is the host[:port] to contact; default Host (ggcr maps
	// docker.io to index.docker.io).
	Endpoint string
	// PlainHTTP talks HTTP instead of HTTPS to the endpoint.
	PlainHTTP bool
	// Default makes this the upstream of requests without ?ns= (clients
	// that use the mirror as their registry). At most one.
	Default bool
	// SharedRepositories are the repositories read with the daemon's own
	// credentials (Config.Keychain) for every client of the mirror, with
	// or without credentials of its own. Patterns: a repository name as
	// clients send it ("team/app"; "library/debian" for docker.io's
	// official images), a name followed by "/*" (every repository below
	// it), or "*" (all). Every other repository is read with each client's
	// own credentials, or anonymously.
	SharedRepositories []string
	// PublicRepositories are repositories declared public (same patterns):
	// their content is shared with peers, and when the upstream cannot be
	// reached, public content of theirs (kept public, or from peers) is
	// served to anyone. A repository the upstream serves anonymously is
	// public without being listed.
	PublicRepositories []string

	shared, public patterns
}

// Config configures a Mirror. Zero values mean the documented defaults.
type Config struct {
	// Dir holds the mirror's state (recipes, tags, spool files). Required.
	Dir string
	// Blocks is the node's block cache. Required.
	Blocks Blocks
	// Peers finds and fetches blobs in the swarm. Default nil: local and
	// upstream only.
	Peers Peers
	// Upstreams are the registries the mirror serves; requests for any
	// other are refused, so the mirror is never an open proxy.
	Upstreams []Upstream
	// Keychain supplies the daemon's own upstream credentials, used only
	// for Upstream.SharedRepositories. Default authn.DefaultKeychain (the
	// Docker config of the user running the daemon).
	Keychain authn.Keychain
	// Transport is the base HTTP transport to upstreams. Default: a clone
	// of http.DefaultTransport.
	Transport http.RoundTripper
	// TagTimeout bounds resolving a tag upstream; past it (or with upstream
	// unreachable) the kept copy answers. Default 10 s.
	TagTimeout time.Duration
	// FetchTimeout bounds one whole blob fetch. Default 30 min.
	FetchTimeout time.Duration
	// StallTimeout fails an upstream transfer that sends no byte for this
	// long. Default 60 s.
	StallTimeout time.Duration
	// PeerTimeout bounds finding a blob's providers and its recipe.
	// Default 5 s.
	PeerTimeout time.Duration
	// MaxBlobSize bounds a blob. Default 64 GiB.
	MaxBlobSize int64
	// MaxSpool bounds the bytes of all spool files together (blobs being
	// fetched), on top of the cache's quota and free-space guard when
	// Blocks has them (Space). A blob that does not fit is streamed from
	// upstream to each client and not kept. Default MaxBlobSize.
	MaxSpool int64
	// CheckTTL is how long an upstream's positive answer (this credential
	// may read this digest of this repository), and whether a repository
	// is public, are trusted without asking again. Default 5 min.
	CheckTTL time.Duration
	// OfflineGrace is how old a positive answer may be and still let kept
	// content be served while the upstream cannot be reached. Default 1 h.
	OfflineGrace time.Duration
	// CoalesceMin is the smallest blob that nodes pulling it at the same
	// moment read upstream in ranges and swap (RangePeers), when no peer
	// holds it whole; smaller ones are read whole by each node, as are
	// all blobs when Peers is not a RangePeers. Negative: never. Default
	// (0) 1 MiB.
	CoalesceMin int64
	// Logger gets the mirror's logs, with component=mirror. Default
	// slog.Default().
	Logger *slog.Logger
}

// maxManifestSize bounds a manifest, as distribution does (4 MiB).
const maxManifestSize = 4 << 20

// reprovideInterval re-publishes blob records well inside the DHT's 48 h
// record lifetime.
const reprovideInterval = 12 * time.Hour

// provideRetry is how soon a provide that failed to reach the DHT is tried
// again.
const provideRetry = time.Minute

// Mirror is an http.Handler serving the OCI distribution read API. Run
// keeps its provider records fresh; Close stops fetches in progress.
type Mirror struct {
	cfg     Config
	log     *slog.Logger
	keep    *keeper
	names   *names // swarm names of the private blobs held
	clients *clients
	checks  *checks
	salt    []byte // keys the hashes that name client credentials
	budget  *budget
	ups     map[string]*Upstream
	def     *Upstream

	life   context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	flights map[string]*flight
	failed  map[string]struct{} // provides to retry

	pullMu sync.Mutex
	pulls  map[string]*pull // blobs being pulled in ranges, by key (coalesce.go)
	recent []*pull          // the last recentPulls that ended, oldest first

	st counters
}

// New checks cfg and opens the mirror's state directory. It starts nothing.
func New(cfg Config) (*Mirror, error) {
	if cfg.Dir == "" || cfg.Blocks == nil {
		return nil, errors.New("mirror: Dir and Blocks are required")
	}
	if len(cfg.Upstreams) == 0 {
		return nil, errors.New("mirror: no upstream configured")
	}
	if cfg.Keychain == nil {
		cfg.Keychain = authn.DefaultKeychain
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport.(*http.Transport).Clone()
	}
	if cfg.TagTimeout <= 0 {
		cfg.TagTimeout = 10 * time.Second
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = 30 * time.Minute
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = time.Minute
	}
	if cfg.PeerTimeout <= 0 {
		cfg.PeerTimeout = 5 * time.Second
	}
	if cfg.MaxBlobSize <= 0 {
		cfg.MaxBlobSize = 64 << 30
	}
	if cfg.MaxSpool <= 0 {
		cfg.MaxSpool = cfg.MaxBlobSize
	}
	if cfg.CheckTTL <= 0 {
		cfg.CheckTTL = 5 * time.Minute
	}
	if cfg.OfflineGrace <= 0 {
		cfg.OfflineGrace = time.Hour
	}
	cfg.OfflineGrace = max(cfg.OfflineGrace, cfg.CheckTTL)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CoalesceMin == 0 {
		cfg.CoalesceMin = 1 << 20
	}
	m := &Mirror{pulls: map[string]*pull{}, cfg: cfg, log: cfg.Logger.With("component", "mirror"), ups: map[string]*Upstream{}, flights: map[string]*flight{}, failed: map[string]struct{}{},
		checks: newChecks(), salt: newSalt(), names: newNames(), budget: &budget{max: cfg.MaxSpool}}
	m.budget.space, _ = cfg.Blocks.(Space)
	for i := range cfg.Upstreams {
		u := cfg.Upstreams[i]
		if u.Host == "" {
			return nil, fmt.Errorf("mirror: upstream %d has no host", i)
		}
		if u.Endpoint == "" {
			u.Endpoint = u.Host
		}
		if _, err := name.NewRegistry(u.Endpoint); err != nil {
			return nil, fmt.Errorf("mirror: upstream %q: %w", u.Host, err)
		}
		if m.ups[u.Host] != nil {
			return nil, fmt.Errorf("mirror: upstream %q listed twice", u.Host)
		}
		var err error
		if u.shared, err = parsePatterns("shared repositories", u.SharedRepositories); err != nil {
			return nil, fmt.Errorf("mirror: upstream %q: %w", u.Host, err)
		}
		if u.public, err = parsePatterns("public repositories", u.PublicRepositories); err != nil {
			return nil, fmt.Errorf("mirror: upstream %q: %w", u.Host, err)
		}
		m.ups[u.Host] = &u
		if u.Default {
			if m.def != nil {
				return nil, fmt.Errorf("mirror: two default upstreams (%q, %q)", m.def.Host, u.Host)
			}
			m.def = &u
		}
	}
	k, err := openKeeper(cfg.Dir, cfg.Blocks)
	if err != nil {
		return nil, err
	}
	m.keep = k
	k.forgotten = m.unhold
	m.clients = &clients{keychain: cfg.Keychain, base: cfg.Transport, m: map[clientKey]*http.Client{}}
	m.life, m.cancel = context.WithCancel(context.Background())
	return m, nil
}

// Run names the kept private and shared blobs (from their kept copies),
// then re-provides the kept blobs to the swarm — public ones under their
// digests, private ones under their names — at start and every 12 hours,
// and retries failed provides every minute, until ctx ends; then it
// closes the mirror.
func (m *Mirror) Run(ctx context.Context) error {
	defer m.Close()
	if m.cfg.Peers == nil {
		<-ctx.Done()
		return nil
	}
	m.holdKept(ctx)
	all := m.provideKeys()
	full := time.NewTicker(reprovideInterval)
	defer full.Stop()
	retry := time.NewTicker(provideRetry)
	defer retry.Stop()
	for {
		for _, key := range all {
			if ctx.Err() != nil {
				return nil
			}
			d, ok := m.keyDigest(key)
			if !ok { // forgotten, or no longer named
				m.mu.Lock()
				delete(m.failed, key)
				m.mu.Unlock()
				continue
			}
			if _, _, ok := m.keep.recipe(ctx, d, m.cfg.MaxBlobSize); ok {
				m.provide(ctx, key)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-full.C:
			all = m.provideKeys()
		case <-retry.C:
			m.mu.Lock()
			all = slices.Collect(maps.Keys(m.failed))
			m.mu.Unlock()
		}
	}
}

// Close cancels fetches in progress and waits for the mirror's goroutines.
// Requests still being served fail. It is idempotent.
func (m *Mirror) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	return nil
}

// spawn runs fn on a goroutine Close waits for; false once closed.
func (m *Mirror) spawn(fn func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.wg.Go(fn)
	return true
}

// provide publishes the node's record for a kept blob under key (its
// digest, or a private blob's name). The record is held locally at once
// (peers that ask this node find it); publishing it to the DHT's closest
// peers may fail, and is then retried.
func (m *Mirror) provide(ctx context.Context, key string) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err := m.cfg.Peers.Provide(ctx, key)
	m.st.provided.Add(1)
	m.mu.Lock()
	if err != nil {
		m.failed[key] = struct{}{}
	} else {
		delete(m.failed, key)
	}
	m.mu.Unlock()
	if err != nil {
		m.log.Debug("provide blob record; will retry", "key", key, "err", err)
	}
}

// announce publishes, in the background, the digest of a blob newly kept
// (or newly known) as public. A private or shared blob's digest is never
// announced: hold announces its name.
func (m *Mirror) announce(digest string, c class) {
	if m.cfg.Peers != nil && c == classPublic {
		m.spawn(func() { m.provide(m.life, digest) })
	}
}

// provideKeys lists what the node provides: the kept public blobs'
// digests and the private blobs' names.
func (m *Mirror) provideKeys() []string {
	return append(m.keep.keptDigests(classPublic), m.names.all()...)
}

// keyDigest maps what peers ask for to a kept blob they may be given: a
// private blob's name to its digest, a public blob's digest to itself.
// A private blob's digest maps to nothing. Whether the asker proved it
// knows a name is p2p's to check before it calls Recipe or BlobBlocks.
func (m *Mirror) keyDigest(key string) (string, bool) {
	if d, ok := m.names.digest(key); ok {
		return d, true
	}
	if _, ok := parseDigest(key); ok && m.keep.class(key) == classPublic {
		return key, true
	}
	return "", false
}

// Recipe returns, for peers (p2p.RecipeGetter), the recipe of a kept
// blob whose blocks are all cached: a public blob asked for by digest, or
// a private or shared one by its name. A private blob's digest is not
// found.
func (m *Mirror) Recipe(ctx context.Context, key string) ([]byte, error) {
	d, ok := m.keyDigest(key)
	if !ok {
		return nil, ErrNotFound
	}
	_, raw, ok := m.keep.recipe(ctx, d, m.cfg.MaxBlobSize)
	if !ok {
		return nil, ErrNotFound
	}
	return raw, nil
}

// Stats is a snapshot of the mirror's counters.
type Stats struct {
	// Body bytes sent to clients (blobs and manifests), by where they came
	// from: the node's kept copy, peers, or upstream.
	ServedLocal    int64 `json:"served_local"`
	ServedPeers    int64 `json:"served_peers"`
	ServedUpstream int64 `json:"served_upstream"`
	// Bytes fetched to keep: verified blob bytes from peers, and response
	// bytes from upstream.
	FetchedPeers       int64 `json:"fetched_peers"`
	FetchedUpstream    int64 `json:"fetched_upstream"`
	Requests           int64 `json:"requests"`
	Errors             int64 `json:"errors"`
	Fetches            int64 `json:"fetches"`             // blob fetches started (concurrent requests share one)
	BadPeerBlobs       int64 `json:"bad_peer_blobs"`      // peer recipes or blobs that failed verification
	UpstreamMismatches int64 `json:"upstream_mismatches"` // upstream content that failed its digest
	Provided           int64 `json:"provided"`            // provider records announced (held locally; published to the DHT or retried)
	Windows            int64 `json:"windows"`             // private blobs' windows read upstream (Range GETs)
	WindowBytes        int64 `json:"window_bytes"`        // their bytes
	Checks             int64 `json:"checks"`              // access checks sent upstream (HEADs with a client's credentials, and public probes)
	Denied             int64 `json:"denied"`              // requests the upstream refused for the client's credentials (401, 403)
	SpoolBytes         int64 `json:"spool_bytes"`         // room reserved by the spool files of fetches in progress
	SpoolRefused       int64 `json:"spool_refused"`       // fetches refused for lack of room to spool the blob (the blob was streamed from upstream)
	Kept               int   `json:"kept"`                // blobs with a recipe on disk
	KeptPublic         int   `json:"kept_public"`         // of those, public (announced, served to peers)
	Named              int   `json:"named"`               // private and shared blobs held under a swarm name (announced, served to proven peers)
	Pulls              int64 `json:"pulls"`               // blobs pulled in ranges with the other nodes pulling them (RangePeers)
	// Their ranges, by where they came from.
	RangesPeers    int64 `json:"ranges_peers"`
	RangesUpstream int64 `json:"ranges_upstream"`
	RangesBad      int64 `json:"ranges_bad"` // ranges from peers that differed from upstream's (their peers struck)
}

type counters struct {
	servedLocal, servedPeers, servedUpstream atomic.Int64
	fetchedPeers, fetchedUpstream            atomic.Int64
	requests, errors, fetches                atomic.Int64
	badPeer, mismatch, provided              atomic.Int64
	checks, denied                           atomic.Int64
	windows, windowBytes                     atomic.Int64
	spoolRefused                             atomic.Int64
	pulls, rangesPeers, rangesUpstream       atomic.Int64
	rangesBad                                atomic.Int64
}

// Stats returns the mirror's counters.
func (m *Mirror) Stats() Stats {
	return Stats{
		ServedLocal:        m.st.servedLocal.Load(),
		ServedPeers:        m.st.servedPeers.Load(),
		ServedUpstream:     m.st.servedUpstream.Load(),
		FetchedPeers:       m.st.fetchedPeers.Load(),
		FetchedUpstream:    m.st.fetchedUpstream.Load(),
		Requests:           m.st.requests.Load(),
		Errors:             m.st.errors.Load(),
		Fetches:            m.st.fetches.Load(),
		BadPeerBlobs:       m.st.badPeer.Load(),
		UpstreamMismatches: m.st.mismatch.Load(),
		Provided:           m.st.provided.Load(),
		Windows:            m.st.windows.Load(),
		WindowBytes:        m.st.windowBytes.Load(),
		Checks:             m.st.checks.Load(),
		Denied:             m.st.denied.Load(),
		SpoolBytes:         m.budget.reserved(),
		SpoolRefused:       m.st.spoolRefused.Load(),
		Kept:               len(m.keep.keptDigests(classPrivate)),
		KeptPublic:         len(m.keep.keptDigests(classPublic)),
		Named:              m.names.len(),
		Pulls:              m.st.pulls.Load(),
		RangesPeers:        m.st.rangesPeers.Load(),
		RangesUpstream:     m.st.rangesUpstream.Load(),
		RangesBad:          m.st.rangesBad.Load(),
	}
}

func (m *Mirror) served(source string, n int64) {
	switch source {
	case SourceLocal:
		m.st.servedLocal.Add(n)
	case SourcePeers:
		m.st.servedPeers.Add(n)
	case SourceUpstream:
		m.st.servedUpstream.Add(n)
	}
}

// The grammar of distribution's names, tags and the one digest algorithm
// the mirror serves.
var (
	nameRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRE  = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
)

// ServeHTTP implements the read side of the OCI distribution API:
// GET/HEAD /v2/, /v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest>.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m.st.requests.Add(1)
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		m.fail(w, r, http.StatusMethodNotAllowed, "UNSUPPORTED", "the mirror is read-only: "+r.Method+" is not supported")
		return
	}
	if r.URL.Path == "/v2/" || r.URL.Path == "/v2" {
		// Without credentials: a challenge, so that clients that ping
		// first (ggcr, crane) know to send the credentials they have.
		// Anonymous clients go on without, as from any registry that
		// answers 401 here.
		if r.Header.Get("Authorization") == "" {
			m.fail(w, r, http.StatusUnauthorized, "UNAUTHORIZED", "authentication possible: send the upstream registry's credentials, or none for public repositories")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		if r.Method == http.MethodGet {
			_, _ = w.Write([]byte("{}"))
		}
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	var repoName, kind, ref string
	if ok {
		if i := strings.LastIndex(rest, "/manifests/"); i > 0 {
			repoName, kind, ref = rest[:i], "manifests", rest[i+len("/manifests/"):]
		} else if i := strings.LastIndex(rest, "/blobs/"); i > 0 {
			repoName, kind, ref = rest[:i], "blobs", rest[i+len("/blobs/"):]
		}
	}
	if kind == "" {
		m.fail(w, r, http.StatusNotFound, "UNSUPPORTED", "not an OCI distribution read endpoint: "+r.URL.Path)
		return
	}
	if !nameRE.MatchString(repoName) || len(repoName) > 255 {
		m.fail(w, r, http.StatusBadRequest, "NAME_INVALID", fmt.Sprintf("invalid repository name %q", repoName))
		return
	}
	up, err := m.upstream(r.URL.Query().Get("ns"))
	if err != nil {
		m.fail(w, r, http.StatusForbidden, "DENIED", err.Error())
		return
	}
	var opts []name.Option
	if up.PlainHTTP {
		opts = append(opts, name.Insecure)
	}
	repo, err := name.NewRepository(up.Endpoint+"/"+repoName, opts...)
	if err != nil {
		m.fail(w, r, http.StatusBadRequest, "NAME_INVALID", err.Error())
		return
	}
	isDigest := strings.Contains(ref, ":")
	if isDigest {
		if _, ok := parseDigest(ref); !ok {
			m.fail(w, r, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("unsupported digest %q: the mirror serves sha256:<64 lowercase hex> only", ref))
			return
		}
	}
	switch {
	case kind == "blobs" && !isDigest:
		m.fail(w, r, http.StatusBadRequest, "DIGEST_INVALID", fmt.Sprintf("blob reference %q is not a digest", ref))
		return
	case !isDigest && !tagRE.MatchString(ref):
		// No such manifest can exist: 404, as distribution answers (and
		// the conformance suite expects), not 400.
		m.fail(w, r, http.StatusNotFound, "MANIFEST_UNKNOWN", fmt.Sprintf("invalid tag %q", ref))
		return
	}
	cred, err := m.credentialFor(r, up, repoName)
	if err != nil {
		w.Header().Set("WWW-Authenticate", challenge(up))
		m.fail(w, r, http.StatusUnauthorized, "UNAUTHORIZED", err.Error())
		return
	}
	a := &access{up: up, repo: repo, cred: cred}
	switch {
	case kind == "blobs":
		m.serveBlob(w, r, a, ref)
	case isDigest:
		m.serveManifestDigest(w, r, a, ref)
	default:
		m.serveTag(w, r, a, ref)
	}
}

// upstream maps containerd's ns parameter to a configured upstream.
func (m *Mirror) upstream(ns string) (*Upstream, error) {
	if ns == "" {
		if m.def == nil {
			return nil, fmt.Errorf("%w: the request names no upstream (?ns=<registry host>) and no default upstream is configured", ErrUpstreamRefused)
		}
		return m.def, nil
	}
	if u := m.ups[ns]; u != nil {
		return u, nil
	}
	return nil, fmt.Errorf("%w: %q is not one of the mirror's upstreams", ErrUpstreamRefused, ns)
}

// fail writes an OCI error body. A 401 carries the mirror's challenge.
func (m *Mirror) fail(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	m.st.errors.Add(1)
	m.log.Debug("request failed", "method", r.Method, "path", r.URL.Path, "status", status, "code", code, "msg", msg)
	body, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if status == http.StatusUnauthorized && h.Get("WWW-Authenticate") == "" {
		h.Set("WWW-Authenticate", challenge(nil))
	}
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// failErr maps an error from a source to its OCI error; a 401 challenges
// for the credentials of a's upstream.
func (m *Mirror) failErr(w http.ResponseWriter, r *http.Request, a *access, unknownCode string, err error) {
	var ue *upstreamError
	switch {
	case errors.Is(err, ErrNotFound):
		m.fail(w, r, http.StatusNotFound, unknownCode, err.Error())
	case errors.Is(err, ErrSpoolFull):
		m.fail(w, r, http.StatusServiceUnavailable, "UNAVAILABLE", err.Error())
	case errors.Is(err, ErrDigestMismatch), errors.Is(err, ErrTooLarge):
		m.fail(w, r, http.StatusBadGateway, "UNKNOWN", err.Error())
	case errors.As(err, &ue) && ue.status == http.StatusUnauthorized:
		w.Header().Set("WWW-Authenticate", challenge(a.up))
		m.fail(w, r, http.StatusUnauthorized, "UNAUTHORIZED", err.Error())
	case errors.As(err, &ue) && ue.status == http.StatusForbidden:
		m.fail(w, r, http.StatusForbidden, "DENIED", err.Error())
	case errors.As(err, &ue) && ue.status == http.StatusTooManyRequests:
		m.fail(w, r, http.StatusTooManyRequests, "TOOMANYREQUESTS", err.Error())
	case unreachable(err), errors.Is(err, context.Canceled):
		m.fail(w, r, http.StatusServiceUnavailable, "UNAVAILABLE", err.Error())
	default:
		m.fail(w, r, http.StatusBadGateway, "UNKNOWN", err.Error())
	}
}
