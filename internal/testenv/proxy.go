//go:build linux

package testenv

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// CountingProxy is a reverse proxy on a loopback port that counts the
// response-body bytes it passes back, request by request. Put one in front of
// a registry (or any HTTP server) and point clients at Host to measure how
// much the origin served. It forwards the client's Host header, so the
// Location URLs a registry returns during a push point back at the proxy.
type CountingProxy struct {
	// Host is "127.0.0.1:PORT"; use it where the upstream's host would go.
	Host string

	srv    *httptest.Server
	link   atomic.Pointer[rate.Limiter] // nil: no limit
	bytes  atomic.Int64
	active atomic.Int64 // requests being served

	mu   sync.Mutex
	reqs []ProxiedRequest
}

// ProxiedRequest is one request that went through a CountingProxy.
type ProxiedRequest struct {
	Method string
	Path   string // URL path and query
	Range  string // the Range header, if any
	Status int
	Bytes  int64 // response-body bytes sent to the client
}

// Proxy starts a CountingProxy in front of the registry. It keeps working
// across Stop and Restart (answering 502 while the registry is down) and is
// closed when the test ends.
func (r *Registry) Proxy(tb testing.TB) *CountingProxy {
	tb.Helper()
	return NewCountingProxy(tb, r.Host)
}

// NewCountingProxy starts a CountingProxy in front of the plain-HTTP server at
// upstream ("host:port") and closes it when the test ends.
func NewCountingProxy(tb testing.TB, upstream string) *CountingProxy {
	tb.Helper()
	target := &url.URL{Scheme: "http", Host: upstream}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
		},
		// A stopped upstream is a state tests create on purpose; say so in
		// the test's log, not on stderr.
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			tb.Logf("testenv: proxy %s %s: %v", req.Method, req.URL.Path, err)
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	p := &CountingProxy{}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p.active.Add(1)
		defer p.active.Add(-1) // after the request is counted below
		cw := &countingWriter{ResponseWriter: w, status: http.StatusOK, link: p.link.Load(), ctx: req}
		rp.ServeHTTP(cw, req)
		p.mu.Lock()
		p.reqs = append(p.reqs, ProxiedRequest{
			Method: req.Method,
			Path:   req.URL.RequestURI(),
			Range:  req.Header.Get("Range"),
			Status: cw.status,
			Bytes:  cw.n,
		})
		p.mu.Unlock()
		p.bytes.Add(cw.n)
	}))
	p.Host = p.srv.Listener.Addr().String()
	tb.Cleanup(p.srv.Close)
	return p
}

// linkBurst is the most bytes a limited link sends at once.
const linkBurst = 32 << 10

// Limit makes every response body from now on share a link of
// bytesPerSec, as an origin behind a slower link than its clients'
// (0: no limit). Bytes are counted as they are sent.
func (p *CountingProxy) Limit(bytesPerSec int) {
	if bytesPerSec <= 0 {
		p.link.Store(nil)
		return
	}
	p.link.Store(rate.NewLimiter(rate.Limit(bytesPerSec), linkBurst))
}

// Ref returns the reference of repoTag through the proxy.
func (p *CountingProxy) Ref(repoTag string) string { return p.Host + "/" + repoTag }

// URL returns the proxy's base URL, "http://127.0.0.1:PORT".
func (p *CountingProxy) URL() string { return p.srv.URL }

// BytesServed returns the response-body bytes served since the start or the
// last Reset. A request still in flight is counted when it completes.
func (p *CountingProxy) BytesServed() int64 {
	p.settle()
	return p.bytes.Load()
}

// settle waits (at most a second) for requests in flight to be counted: a
// client can have read a whole response before the handler that sent it has
// returned and recorded it.
func (p *CountingProxy) settle() {
	for deadline := time.Now().Add(time.Second); p.active.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
}

// Requests returns the requests completed since the start or the last Reset,
// in completion order.
func (p *CountingProxy) Requests() []ProxiedRequest {
	p.settle()
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]ProxiedRequest(nil), p.reqs...)
}

// Reset zeroes the byte count and forgets the requests.
func (p *CountingProxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reqs = nil
	p.bytes.Store(0)
}

type countingWriter struct {
	http.ResponseWriter
	link        *rate.Limiter // shared by every response; nil: no limit
	ctx         *http.Request // whose context ends a wait for the link
	status      int
	wroteHeader bool
	n           int64
}

func (w *countingWriter) WriteHeader(code int) {
	// 1xx responses are informational; the final status comes later.
	if !w.wroteHeader && code >= 200 {
		w.status = code
		w.wroteHeader = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *countingWriter) Write(b []byte) (int, error) {
	w.wroteHeader = true
	if w.link == nil {
		n, err := w.ResponseWriter.Write(b)
		w.n += int64(n)
		return n, err
	}
	var sent int
	for len(b) > 0 {
		c := min(len(b), linkBurst)
		if err := w.link.WaitN(w.ctx.Context(), c); err != nil {
			return sent, err
		}
		n, err := w.ResponseWriter.Write(b[:c])
		w.n += int64(n)
		sent += n
		if err != nil {
			return sent, err
		}
		b = b[c:]
	}
	return sent, nil
}

// Unwrap lets http.ResponseController reach the real writer (ReverseProxy
// flushes through it).
func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
