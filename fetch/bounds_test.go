package fetch

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/bounded"
	"github.com/shoal-project/shoal/internal/memcheck"
)

// hostileRegistry answers every manifest request of the distribution API
// with manifest, and every blob request with blob.
func hostileRegistry(t testing.TB, manifest []byte, blob http.HandlerFunc) string {
	t.Helper()
	sum := sha256.Sum256(manifest)
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v2/":
			w.WriteHeader(http.StatusOK)
		case strings.Contains(r.URL.Path, "/manifests/"):
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			w.Header().Set("Docker-Content-Digest", "sha256:"+hex.EncodeToString(sum[:]))
			w.Header().Set("Content-Length", strconv.Itoa(len(manifest)))
			if r.Method == http.MethodGet {
				w.Write(manifest)
			}
		case strings.Contains(r.URL.Path, "/blobs/") && blob != nil:
			blob(w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

func openHostile(t testing.TB, host string) error {
	_, err := OpenImage(t.Context(), host+"/app:v1-shoal", WithPlainHTTP(true), WithLogger(quiet()),
		WithRetries(1, time.Millisecond), WithRequestTimeout(5*time.Second))
	return err
}

// flatManifestOf is a flat image manifest whose index layer claims size
// bytes.
func flatManifestOf(t testing.TB, size int64) []byte {
	hash := func(s string) v1.Hash {
		sum := sha256.Sum256([]byte(s))
		return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
	}
	m, err := json.Marshal(v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        v1.Descriptor{MediaType: flat.MediaTypeConfig, Size: 2, Digest: hash("config")},
		Layers:        []v1.Descriptor{{MediaType: flat.MediaTypeIndex, Size: size, Digest: hash("index")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Hostile registry answers, each refused with one error that names its
// limit, having cost little: a manifest of 4 MiB of empty descriptors
// (go-containerregistry's ParseManifest made 1 GB of them), and a flat
// manifest whose index the registry never sends (its claimed size was
// allocated before the first byte came: up to 1 GiB).
func TestHostileManifests(t *testing.T) {
	descriptors := func(n int) []byte {
		return []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[{}` + strings.Repeat(",{}", n-1) + `]}`)
	}
	// Sends a few bytes of the blob, and then ends.
	stingy := func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.Write([]byte("(\xb5/\xfd"))
		w.(http.Flusher).Flush() // no Content-Length: the client reads until the end
	}
	for _, tc := range []struct {
		name     string
		manifest func(t testing.TB) []byte
		blob     http.HandlerFunc
		want     error
		says     string
		ceiling  uint64
	}{
		{"empty descriptors", func(testing.TB) []byte { return descriptors((4<<20 - 200) / 3) }, nil,
			bounded.ErrTooLarge, "more than 65536 JSON values", 32 << 20},
		{"index never sent", func(t testing.TB) []byte { return flatManifestOf(t, flat.MaxIndexSize) }, stingy,
			ErrShortBody, "4 of 33554432 bytes", 4 << 20},
		{"index of a GiB", func(t testing.TB) []byte { return flatManifestOf(t, 1<<30) }, stingy,
			flat.ErrMalformed, "index blob of 1073741824 bytes (limit 33554432)", 4 << 20},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			manifest := memcheck.UnderBar(t, func() []byte { return tc.manifest(t) }, func(m []byte) string {
				return fmt.Sprint(openHostile(t, hostileRegistry(t, m, tc.blob)))
			})
			host := hostileRegistry(t, manifest, tc.blob)
			var err error
			got := memcheck.Allocated(func() { err = openHostile(t, host) })
			t.Logf("%d-byte manifest: %d bytes allocated: %v", len(manifest), got, err)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("got %v, want %v saying %q", err, tc.want, tc.says)
			}
			if got > tc.ceiling {
				t.Errorf("allocated %d bytes (ceiling %d)", got, tc.ceiling)
			}
		})
	}
}
