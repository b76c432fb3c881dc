package cri

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Bounds on what one pull may make the proxy keep.
const (
	// MaxCredentialBytes bounds each field of a pull's AuthConfig (cloud
	// registries' tokens are a few KiB).
	MaxCredentialBytes = 16 << 10
	// DefaultMaxRepositories bounds the repositories whose credentials are
	// kept at once; beyond it the oldest entry goes.
	DefaultMaxRepositories = 4096
	// DefaultTTL is how long a pull's credentials are used after it.
	DefaultTTL = 12 * time.Hour
)

// ErrCredentials is wrapped by errors about a pull's AuthConfig.
var ErrCredentials = errors.New("bad pull credentials")

// Credentials keeps, per repository, the registry credentials of the most
// recent CRI pull of an image in it (anonymous when that pull carried
// none, or none for the image's registry). Its Keychain hands them to the
// snapshotter, which reads the image's flat form with them; a repository
// no pull named resolves anonymously. It is safe for concurrent use.
type Credentials struct {
	max int
	ttl time.Duration
	now func() time.Time

	mu sync.Mutex
	m  map[string]entry // by repository, as name.Repository.String()
}

type entry struct {
	auth authn.AuthConfig // zero: anonymous
	at   time.Time
}

// NewCredentials returns an empty store holding at most max repositories
// (DefaultMaxRepositories if max <= 0), each for ttl (DefaultTTL if ttl <=
// 0) after its last pull.
func NewCredentials(max int, ttl time.Duration) *Credentials {
	if max <= 0 {
		max = DefaultMaxRepositories
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	return &Credentials{max: max, ttl: ttl, now: time.Now, m: map[string]entry{}}
}

// Record keeps the credentials a pull of image carries, replacing what an
// earlier pull of the same repository left: the snapshotter then acts for
// the latest pull, never for an earlier one with other rights. It returns
// the image's parsed reference.
func (c *Credentials) Record(image string, a *runtimeapi.AuthConfig) (name.Reference, error) {
	ref, err := name.ParseReference(image)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", image, err)
	}
	auth, err := authFor(ref.Context().Registry, a)
	if err != nil {
		return nil, err
	}
	now := c.now()
	key := ref.Context().String()
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[key]; !ok && len(c.m) >= c.max {
		c.dropOldest(now)
	}
	c.m[key] = entry{auth: auth, at: now}
	return ref, nil
}

// dropOldest removes expired entries, or else the oldest one. c.mu is held.
func (c *Credentials) dropOldest(now time.Time) {
	var oldest string
	var at time.Time
	for k, e := range c.m {
		if now.Sub(e.at) > c.ttl {
			delete(c.m, k)
			continue
		}
		if oldest == "" || e.at.Before(at) {
			oldest, at = k, e.at
		}
	}
	if len(c.m) >= c.max {
		delete(c.m, oldest)
	}
}

// Len is the number of repositories with credentials kept.
func (c *Credentials) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// lookup returns the credentials kept for repository key; ok is false when
// none are (never pulled, or expired).
func (c *Credentials) lookup(key string) (authn.AuthConfig, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return authn.AuthConfig{}, false
	}
	if c.now().Sub(e.at) > c.ttl {
		delete(c.m, key)
		return authn.AuthConfig{}, false
	}
	return e.auth, true
}

// Keychain resolves a repository to the credentials of its latest CRI
// pull, and anything else (a registry alone, a repository no pull named)
// to anonymous.
func (c *Credentials) Keychain() authn.Keychain { return keychain{c} }

type keychain struct{ c *Credentials }

func (k keychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

func (k keychain) ResolveContext(_ context.Context, target authn.Resource) (authn.Authenticator, error) {
	key := target.String()
	if key == target.RegistryStr() {
		return authn.Anonymous, nil // a registry, not a repository
	}
	a, ok := k.c.lookup(key)
	if !ok || a == (authn.AuthConfig{}) {
		return authn.Anonymous, nil
	}
	return authn.FromConfig(a), nil
}

// authFor turns a CRI AuthConfig into the credentials for registry reg:
// none when it carries none, or names another registry (containerd does
// not send those to reg either). Every field is bounded; Auth must be
// base64 of "user:password".
func authFor(reg name.Registry, a *runtimeapi.AuthConfig) (authn.AuthConfig, error) {
	if a == nil {
		return authn.AuthConfig{}, nil
	}
	for what, v := range map[string]string{"username": a.Username, "password": a.Password, "auth": a.Auth,
		"server_address": a.ServerAddress, "identity_token": a.IdentityToken, "registry_token": a.RegistryToken} {
		if len(v) > MaxCredentialBytes {
			return authn.AuthConfig{}, fmt.Errorf("%w: %s is %d bytes, more than %d", ErrCredentials, what, len(v), MaxCredentialBytes)
		}
	}
	if a.ServerAddress != "" {
		host, err := serverHost(a.ServerAddress)
		if err != nil {
			return authn.AuthConfig{}, err
		}
		if host != reg.RegistryStr() {
			return authn.AuthConfig{}, nil
		}
	}
	out := authn.AuthConfig{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken, RegistryToken: a.RegistryToken}
	if a.Auth != "" && a.Username == "" && a.Password == "" {
		raw, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return authn.AuthConfig{}, fmt.Errorf("%w: auth is not base64: %v", ErrCredentials, err)
		}
		user, pass, ok := strings.Cut(string(raw), ":")
		if !ok {
			return authn.AuthConfig{}, fmt.Errorf("%w: auth is not base64 of user:password", ErrCredentials)
		}
		out.Username, out.Password = user, pass
	}
	return out, nil
}

// serverHost is the registry a ServerAddress names ("https://host/v1/",
// "host:port", "docker.io"), as go-containerregistry spells it.
func serverHost(addr string) (string, error) {
	host := addr
	if strings.Contains(addr, "://") {
		u, err := url.Parse(addr)
		if err != nil || u.Host == "" {
			return "", fmt.Errorf("%w: server_address %q", ErrCredentials, addr)
		}
		host = u.Host
	} else if i := strings.IndexByte(host, '/'); i >= 0 {
		host = host[:i]
	}
	reg, err := name.NewRegistry(host)
	if err != nil {
		return "", fmt.Errorf("%w: server_address %q: %v", ErrCredentials, addr, err)
	}
	return reg.RegistryStr(), nil
}
