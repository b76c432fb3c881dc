// Package bounded bounds what reading a registry's JSON documents
// (manifests, image indexes, referrers, configs) may cost. A registry is
// untrusted input: a tenant's pod may name any registry, and anyone who
// can push to one may have written what it serves.
//
// Two bounds, each checked before a document is parsed:
//
//   - Bytes: a manifest (or index, or referrers list) of at most
//     MaxManifestSize, a config of at most MaxConfigSize. go-containerregistry
//     reads manifests of up to 100 MiB, and configs of whatever size their
//     manifest claims.
//   - Values: at most MaxJSONValues array elements and object members.
//     encoding/json turns "{}," into a whole descriptor: 1 MiB of them made
//     go-containerregistry's ParseManifest allocate 270 MB (and 4 MiB,
//     1 GB), so bytes alone bound nothing useful.
//
// Transport enforces both on every manifest-like response of a registry,
// whatever then parses it; ConfigFile reads an image's config within
// them. Real documents are far from the limits: a flat image's manifest
// holds one descriptor per 128 MiB of blocks (about 4 values each), a
// source image's at most a few hundred layers.
package bounded

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

const (
	// MaxManifestSize bounds a manifest, image index or referrers list:
	// the size the OCI distribution spec asks registries to accept.
	MaxManifestSize = 4 << 20
	// MaxConfigSize bounds an image config.
	MaxConfigSize = 4 << 20
	// MaxJSONValues bounds the array elements and object members of one
	// document: a flat manifest of 16,000 data blobs (2 TB of blocks).
	MaxJSONValues = 1 << 16
)

// ErrTooLarge is wrapped by every error of this package.
var ErrTooLarge = errors.New("registry document exceeds its limits")

// CheckJSON refuses a JSON document with more than MaxJSONValues values in
// its arrays and objects (it counts brackets and commas outside strings:
// a document that is not JSON at all is left to its parser).
func CheckJSON(b []byte, what string) error {
	n := 0
	inString, escaped := false, false
	for _, c := range b {
		switch {
		case escaped:
			escaped = false
		case inString:
			escaped = c == '\\'
			inString = c != '"'
		case c == '"':
			inString = true
		case c == '{' || c == '[' || c == ',':
			n++
		}
	}
	if n > MaxJSONValues {
		return fmt.Errorf("%w: %s of %d bytes holds more than %d JSON values", ErrTooLarge, what, len(b), MaxJSONValues)
	}
	return nil
}

// Transport returns base (nil: remote.DefaultTransport) with the limits
// applied to manifest-like responses: GETs of /v2/<name>/manifests/,
// /referrers/ and /tags/list, and of /v2/_catalog. Their bodies are read
// (at most MaxManifestSize bytes, refused at once if Content-Length says
// more) and checked by CheckJSON before the caller gets them. Blobs pass
// untouched: their sizes come from manifests, and their bytes are
// verified against digests.
func Transport(base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = remote.DefaultTransport
	}
	return transport{base}
}

type transport struct{ base http.RoundTripper }

func (t transport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || req.Method != http.MethodGet || resp.StatusCode != http.StatusOK || !document(req.URL.Path) {
		return resp, err
	}
	what := "the registry's answer to GET " + req.URL.Path
	if resp.ContentLength > MaxManifestSize {
		resp.Body.Close()
		return nil, fmt.Errorf("%w: %s is %d bytes (limit %d)", ErrTooLarge, what, resp.ContentLength, MaxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	if len(body) > MaxManifestSize {
		return nil, fmt.Errorf("%w: %s is more than %d bytes", ErrTooLarge, what, MaxManifestSize)
	}
	if err := CheckJSON(body, what); err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	return resp, nil
}

// document reports whether path names a manifest-like document of the
// distribution API.
func document(path string) bool {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return false
	}
	return rest == "_catalog" || strings.HasSuffix(rest, "/tags/list") ||
		strings.Contains(rest, "/manifests/") || strings.Contains(rest, "/referrers/")
}

// ConfigFile reads img's config within the limits: its manifest must
// claim at most MaxConfigSize bytes for it (go-containerregistry reads
// as many as the manifest claims), and its JSON must pass CheckJSON.
func ConfigFile(img v1.Image) (*v1.ConfigFile, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	if m.Config.Size > MaxConfigSize {
		return nil, fmt.Errorf("%w: config of %d bytes (limit %d)", ErrTooLarge, m.Config.Size, MaxConfigSize)
	}
	raw, err := img.RawConfigFile()
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxConfigSize {
		return nil, fmt.Errorf("%w: config of %d bytes (limit %d)", ErrTooLarge, len(raw), MaxConfigSize)
	}
	if err := CheckJSON(raw, "config"); err != nil {
		return nil, err
	}
	return v1.ParseConfigFile(bytes.NewReader(raw))
}
