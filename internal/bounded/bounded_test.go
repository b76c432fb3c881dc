package bounded

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestCheckJSON(t *testing.T) {
	t.Parallel()
	many := func(n int) string { return "[" + strings.Repeat("{},", n-1) + "{}]" }
	for _, tc := range []struct {
		name string
		doc  string
		ok   bool
	}{
		{"manifest", `{"schemaVersion":2,"layers":[{"size":1,"digest":"sha256:00"}]}`, true},
		{"at the limit", many(MaxJSONValues / 2), true},
		{"past the limit", many(MaxJSONValues/2 + 1), false},
		// Brackets and commas in strings are no values, escaped quotes end
		// no string.
		{"in strings", `["` + strings.Repeat(`{,[\"`, MaxJSONValues) + `"]`, true},
		{"not JSON", strings.Repeat("x", 1<<20), true},
	} {
		err := CheckJSON([]byte(tc.doc), "doc")
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrTooLarge)) {
			t.Errorf("%s: %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// Manifest-like answers are read and checked before the caller gets them;
// blobs, other methods and errors pass as they are.
func TestTransport(t *testing.T) {
	t.Parallel()
	big := strings.Repeat(" ", MaxManifestSize+1)
	values := "[" + strings.Repeat("{},", MaxJSONValues) + "{}]"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v2/a/manifests/big", "/v2/a/blobs/sha256:big":
			io.WriteString(w, big)
		case "/v2/a/manifests/sized":
			w.Header().Set("Content-Length", "5000000")
			w.WriteHeader(http.StatusOK)
		case "/v2/a/referrers/sha256:00", "/v2/a/tags/list", "/v2/_catalog":
			io.WriteString(w, values)
		case "/v2/a/manifests/ok":
			io.WriteString(w, `{"schemaVersion":2}`)
		default:
			http.Error(w, big, http.StatusNotFound)
		}
	}))
	defer srv.Close()
	c := &http.Client{Transport: Transport(nil)}
	for _, tc := range []struct {
		path string
		ok   bool
	}{
		{"/v2/a/manifests/big", false},
		{"/v2/a/manifests/sized", false},
		{"/v2/a/referrers/sha256:00", false},
		{"/v2/a/tags/list", false},
		{"/v2/_catalog", false},
		{"/v2/a/manifests/ok", true},
		{"/v2/a/blobs/sha256:big", true},
		{"/v2/a/manifests/missing", true}, // an error answer: ggcr bounds those
	} {
		resp, err := c.Get(srv.URL + tc.path)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrTooLarge)) {
			t.Errorf("%s: %v, want ok=%v", tc.path, err, tc.ok)
		}
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
}
