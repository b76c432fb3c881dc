package testenv

import (
	"net/http"
	"sync/atomic"
)

// BasicAuth serves h to requests carrying user:password in HTTP basic
// auth and answers every other one 401 with a Basic challenge, as a
// registry behind htpasswd does (for in-memory registries in unit tests;
// StartRegistry's WithBasicAuth runs the real one). refused, if not nil,
// counts the requests refused.
func BasicAuth(h http.Handler, user, password string, refused *atomic.Int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != password {
			if refused != nil {
				refused.Add(1)
			}
			w.Header().Set("WWW-Authenticate", `Basic realm="shoal-test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}
