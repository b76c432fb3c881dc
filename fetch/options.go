package fetch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Option configures OpenImage (and the Registry source it makes) or
// NewChain. Each option says which of them it applies to; the others ignore it.
type Option func(*config) error

type config struct {
	observer   Observer
	plainHTTP  bool
	keychain   authn.Keychain
	transport  http.RoundTripper
	log        *slog.Logger
	mergeGap   int64
	maxRequest int64
	timeout    time.Duration
	stall      time.Duration
	attempts   int
	backoff    time.Duration
	maxBackoff time.Duration
	parallel   int
	indexSrc   IndexSource
	onManifest func(ctx context.Context, m Manifest)
	visibility *Visibility
}

// Defaults. See the package doc for why these values.
const (
	DefaultMergeGap       = 64 << 10
	DefaultMaxRequestSize = 8 << 20
	DefaultRequestTimeout = 30 * time.Second
	DefaultStallTimeout   = 10 * time.Second
	DefaultAttempts       = 4
	DefaultBackoff        = 200 * time.Millisecond
	DefaultParallel       = 4

	// maxRetryAfter caps how long a Retry-After header can make one retry wait.
	maxRetryAfter = 10 * time.Second
	// minIndexRate is the slowest transfer rate an index download is allowed
	// before its deadline (which grows with the index size) expires.
	minIndexRate = 1 << 20 // bytes per second
)

func defaults() config {
	return config{
		keychain:   authn.DefaultKeychain,
		transport:  remote.DefaultTransport,
		log:        slog.Default(),
		mergeGap:   DefaultMergeGap,
		maxRequest: DefaultMaxRequestSize,
		timeout:    DefaultRequestTimeout,
		stall:      DefaultStallTimeout,
		attempts:   DefaultAttempts,
		backoff:    DefaultBackoff,
		maxBackoff: 5 * time.Second,
		parallel:   DefaultParallel,
	}
}

func newConfig(opts []Option) (config, error) {
	c := defaults()
	for _, o := range opts {
		if err := o(&c); err != nil {
			return config{}, err
		}
	}
	return c, nil
}

func (c *config) nameOpts() []name.Option {
	if c.plainHTTP {
		return []name.Option{name.Insecure}
	}
	return nil
}

// WithPlainHTTP lets OpenImage talk plain HTTP to the registry (default:
// HTTPS only). OpenImage.
func WithPlainHTTP(on bool) Option { return func(c *config) error { c.plainHTTP = on; return nil } }

// WithKeychain sets where registry credentials come from (default:
// authn.DefaultKeychain, the Docker config and credential helpers). OpenImage.
func WithKeychain(k authn.Keychain) Option {
	return func(c *config) error {
		if k == nil {
			return errors.New("keychain must not be nil")
		}
		c.keychain = k
		return nil
	}
}

// WithTransport sets the HTTP transport that registry authentication is
// layered on (default: ggcr's remote.DefaultTransport). OpenImage.
func WithTransport(t http.RoundTripper) Option {
	return func(c *config) error {
		if t == nil {
			return errors.New("transport must not be nil")
		}
		c.transport = t
		return nil
	}
}

// WithLogger sets the logger; records carry component=fetch (default:
// slog.Default()). OpenImage and NewChain.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("logger must not be nil")
		}
		c.log = l
		return nil
	}
}

// WithMergeGap sets the largest run of unwanted bytes between two wanted
// blocks of one blob that is still read (and thrown away) to serve both with
// one request; 0 merges only blocks that touch (default 64 KiB). Registry.
func WithMergeGap(bytes int64) Option {
	return func(c *config) error {
		if bytes < 0 {
			return fmt.Errorf("merge gap %d: must not be negative", bytes)
		}
		c.mergeGap = bytes
		return nil
	}
}

// WithMaxRequestSize caps the bytes one merged range request asks for
// (default 8 MiB). A single block larger than the cap is still fetched, alone.
// Registry.
func WithMaxRequestSize(bytes int64) Option {
	return func(c *config) error {
		if bytes < 1 {
			return fmt.Errorf("max request size %d: must be positive", bytes)
		}
		c.maxRequest = bytes
		return nil
	}
}

// WithRequestTimeout sets the deadline of every range request, from sending
// it to the last body byte (default 30 s). The index download gets this plus
// one second per MiB of index. OpenImage and Registry.
func WithRequestTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("request timeout %v: must be positive", d)
		}
		c.timeout = d
		return nil
	}
}

// WithStallTimeout aborts a request that receives no bytes for d, whether
// waiting for the response headers or in the middle of the body, long before
// its deadline; 0 disables it (default 10 s). OpenImage and Registry.
func WithStallTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("stall timeout %v: must not be negative", d)
		}
		c.stall = d
		return nil
	}
}

// WithRetries sets how many times a request is tried in all (default 4) and
// the first backoff (default 200 ms), which doubles per retry up to 5 s, with
// full jitter. OpenImage and Registry.
func WithRetries(attempts int, backoff time.Duration) Option {
	return func(c *config) error {
		if attempts < 1 {
			return fmt.Errorf("attempts %d: want at least 1", attempts)
		}
		if backoff < 0 {
			return fmt.Errorf("backoff %v: must not be negative", backoff)
		}
		c.attempts, c.backoff = attempts, backoff
		c.maxBackoff = max(c.maxBackoff, backoff)
		return nil
	}
}

// WithParallelRequests caps the range requests one FetchMany call has in
// flight at once (default 4); the image's requests together are capped at
// twice that, handed out by priority (WithPriority). Registry.
func WithParallelRequests(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("parallel requests %d: want at least 1", n)
		}
		c.parallel = n
		return nil
	}
}

// Observer is told what each source delivered and how long the batch took;
// the daemon feeds its metrics from it. Calls come from fetching goroutines:
// implementations must be quick and safe for concurrent use.
type Observer interface {
	Fetched(source string, blocks int, bytes int64, d time.Duration, err error)
}

// WithObserver reports every source batch to o (default: none). Cache hits
// are reported with source "cache".
func WithObserver(o Observer) Option { return func(c *config) error { c.observer = o; return nil } }

// IndexSource is where OpenImage looks for a flat image's index before the
// registry: the swarm, whose peers of the image hold it. m is the image's
// manifest (a private image is addressed in the swarm by what its bytes
// derive), index the index blob's descriptor. The bytes are untrusted:
// OpenImage checks them against index's digest and falls back to the
// registry on any error.
type IndexSource interface {
	FetchIndex(ctx context.Context, m Manifest, index v1.Descriptor) ([]byte, error)
}

// WithIndexSource makes OpenImage try s for the index before the registry,
// and for the manifest too if s is also a ManifestSource.
func WithIndexSource(s IndexSource) Option {
	return func(c *config) error { c.indexSrc = s; return nil }
}

// ManifestSource is an optional extension of IndexSource: where OpenImage
// looks for a public flat image's manifest before the registry (the swarm,
// whose peers of the image keep it); a private image's manifest always
// comes from the registry (Manifest.Public). OpenImage checks for it with a type
// assertion on the IndexSource, so that one value — the swarm — serves
// both and a plain IndexSource keeps working unchanged. desc comes from a
// HEAD request for the reference (digest, size, media type: no body from
// the registry). The bytes are untrusted: OpenImage checks their length
// and sha256 against desc and falls back to the registry on any error,
// by desc's digest, so that a tag moved in between cannot mix two images.
type ManifestSource interface {
	FetchManifest(ctx context.Context, desc v1.Descriptor) ([]byte, error)
}

// WithOnManifest makes OpenImage call f with the flat manifest (its bytes
// hash to m.Desc.Digest) as soon as it has it and has checked it is a flat
// image's, before it fetches the index; f must be quick. The
// node keeps them in its block cache there, where its peers fetch them
// (ManifestSource): kept only once OpenImage returned, the manifest of the
// node designated to read it from the registry would stay out of the
// swarm's reach while that node waits for the index — from a node that
// waits for the manifest — and both would wait out their peer budget.
// OpenImage.
func WithOnManifest(f func(ctx context.Context, m Manifest)) Option {
	return func(c *config) error { c.onManifest = f; return nil }
}

// WithVisibility makes OpenImage ask v whether the image's repository is
// public (Manifest.Public, Image.Public). Without it every image is
// private: its manifest comes from the registry, and the swarm shares it
// only with nodes that prove they could read it too. OpenImage.
func WithVisibility(v *Visibility) Option {
	return func(c *config) error { c.visibility = v; return nil }
}
