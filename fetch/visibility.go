package fetch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Manifest is a flat image's manifest as its registry served it, and
// whether its repository is public (Visibility).
type Manifest struct {
	Desc v1.Descriptor
	Raw  []byte // hashes to Desc.Digest
	// Public says anyone may read the repository: its registry served
	// the reference without credentials, or the configuration lists it
	// as public. A private image's manifest comes from the registry with
	// the node's own credentials, never from peers: holding its bytes is
	// the node's proof, to its peers, that it may read the image.
	Public bool
}

// Visibility tells public repositories from private ones. A repository is
// public if a pattern of the configuration matches it, or, with probing
// on, if its registry answers a reference of it without credentials (an
// anonymous HEAD of the manifest, as any client could send); the answer is
// cached per repository for its TTL. Anything else — a 401, a 403, an
// error, an unreachable registry — is private: the safe side, which costs
// a node a manifest GET and its peers a handshake, never a leak. It is
// safe for concurrent use; one is shared by every OpenImage of a node.
type Visibility struct {
	patterns []string
	probe    bool
	ttl      time.Duration

	mu    sync.Mutex
	cache map[string]visibilityEntry
}

type visibilityEntry struct {
	public bool
	until  time.Time
}

// DefaultVisibilityTTL is how long a probe's answer is kept.
const DefaultVisibilityTTL = 10 * time.Minute

// maxVisibilityEntries bounds the cache; past it, it starts over.
const maxVisibilityEntries = 4096

// NewVisibility makes a Visibility. public lists repositories that are
// public whatever their registry says, as "registry/repository" (the
// registry as references name it: "ghcr.io/org/app", "127.0.0.1:5000/lib/x")
// with path.Match wildcards ("ghcr.io/org/*"); probe turns on the
// anonymous probe; ttl <= 0 means DefaultVisibilityTTL.
func NewVisibility(public []string, probe bool, ttl time.Duration) (*Visibility, error) {
	for _, p := range public {
		if _, err := path.Match(p, ""); err != nil || p == "" || !strings.Contains(p, "/") {
			return nil, fmt.Errorf("public repository pattern %q: want registry/repository, with * wildcards if any", p)
		}
	}
	if ttl <= 0 {
		ttl = DefaultVisibilityTTL
	}
	return &Visibility{patterns: public, probe: probe, ttl: ttl, cache: map[string]visibilityEntry{}}, nil
}

// Public reports whether ref's repository is public. rt is the base
// transport for the probe (no credentials are added to it). When it
// probed, head is what the registry answered the anonymous HEAD with: the
// reference's descriptor, which spares the caller its own HEAD. err is
// the probe's failure when it said nothing either way (the registry
// unreachable, a server error, no such tag): the repository counts as
// private, and the caller may probe again (OpenImage retries as for any
// registry request) — a registry that fails for a moment would otherwise
// split a rollout's nodes between a public and a private swarm.
func (v *Visibility) Public(ctx context.Context, ref name.Reference, rt http.RoundTripper) (public bool, head *v1.Descriptor, err error) {
	if v == nil {
		return false, nil, nil
	}
	repo := ref.Context()
	key := repo.Name()
	for _, p := range v.patterns {
		if ok, _ := path.Match(p, key); ok {
			return true, nil, nil
		}
	}
	if !v.probe {
		return false, nil, nil
	}
	now := time.Now()
	v.mu.Lock()
	e, ok := v.cache[key]
	v.mu.Unlock()
	if ok && now.Before(e.until) {
		return e.public, nil, nil
	}
	head, err = probeAnonymous(ctx, ref, rt)
	if err != nil {
		return false, nil, err
	}
	v.mu.Lock()
	if len(v.cache) >= maxVisibilityEntries {
		clear(v.cache)
	}
	v.cache[key] = visibilityEntry{public: head != nil, until: now.Add(v.ttl)}
	v.mu.Unlock()
	return head != nil, head, nil
}

// probeAnonymous sends one HEAD of ref's manifest without credentials. It
// returns the descriptor the registry answered with, nil if the registry
// refused for want of credentials (401, 403), or an error when the answer
// says nothing about the repository.
func probeAnonymous(ctx context.Context, ref name.Reference, rt http.RoundTripper) (*v1.Descriptor, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	head, err := remote.Head(ref, remote.WithContext(ctx), remote.WithTransport(rt), remote.WithAuth(authn.Anonymous),
		remote.WithRetryBackoff(remote.Backoff{Steps: 1}))
	if err == nil {
		return head, nil
	}
	var te *transport.Error
	if errors.As(err, &te) && (te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden) {
		return nil, nil
	}
	return nil, fmt.Errorf("anonymous probe of %s: %w", ref, err)
}
