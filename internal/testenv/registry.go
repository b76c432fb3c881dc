//go:build linux

package testenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/crypto/bcrypt"
)

// RegistryBinary is where Debian's docker-registry package installs the
// registry (CNCF distribution v2). $SHOAL_REGISTRY_BIN overrides it.
const RegistryBinary = "/usr/bin/docker-registry"

func registryBinary() string {
	if b := os.Getenv("SHOAL_REGISTRY_BIN"); b != "" {
		return b
	}
	return RegistryBinary
}

const (
	registryReadyTimeout = 15 * time.Second
	registryStopTimeout  = 10 * time.Second
	// Choosing a free port and binding it are two steps, so another process can
	// take the port in between; a start that loses that race tries a new port.
	registryStartAttempts = 3
)

// Registry is a running docker-registry process on a loopback port. Its
// storage lives in the test's temporary directory and goes away with it.
type Registry struct {
	// Host is "127.0.0.1:PORT", the registry part of an image reference.
	Host string
	// Dir holds the config file, the storage (Dir/data) and the logs.
	Dir string
	// User and Password are the one account of a registry started
	// WithBasicAuth ("" otherwise): every request, reads included, needs
	// them, as with any registry behind htpasswd.
	User, Password string
	// extra are more accounts (WithAccount): user → password.
	extra [][2]string

	tb testing.TB

	mu   sync.Mutex
	proc *Process // nil while stopped
}

// Process is a child started by StartLocked.
type Process struct {
	Cmd  *exec.Cmd
	Done chan struct{} // closed when the process has exited and been reaped
	Err  error         // Cmd.Wait's result, valid after Done
}

// RegistryOption configures StartRegistry.
type RegistryOption func(*Registry)

// WithBasicAuth puts the registry behind distribution's htpasswd
// authentication with one account (a bcrypt entry): anonymous requests get
// 401 with a Basic challenge, as from a private registry.
func WithBasicAuth(user, password string) RegistryOption {
	return func(r *Registry) { r.User, r.Password = user, password }
}

// WithAccount adds an account to a registry WithBasicAuth: a second
// identity with the same rights, to tell whose credentials a client used.
func WithAccount(user, password string) RegistryOption {
	return func(r *Registry) { r.extra = append(r.extra, [2]string{user, password}) }
}

// StartRegistry starts the real docker-registry on a free 127.0.0.1 port and
// returns once GET /v2/ answers. It stops the registry when the test ends.
// Without the binary the test is skipped, or fails in CI.
func StartRegistry(tb testing.TB, opts ...RegistryOption) *Registry {
	tb.Helper()
	if _, err := exec.LookPath(registryBinary()); err != nil {
		SkipOrFatal(tb, "testenv: real registry not available: %v (apt-get install docker-registry)", err)
	}
	r := &Registry{Dir: tb.TempDir(), tb: tb}
	for _, o := range opts {
		o(r)
	}
	if r.User != "" {
		if err := WriteHtpasswd(r.htpasswdPath(), append([][2]string{{r.User, r.Password}}, r.extra...)...); err != nil {
			tb.Fatalf("testenv: %v", err)
		}
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			r.logTail()
		}
		r.Stop()
	})

	var lastErr error
	for range registryStartAttempts {
		port, err := freePort()
		if err != nil {
			tb.Fatalf("testenv: pick a port for the registry: %v", err)
		}
		r.Host = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if lastErr = r.start(); lastErr == nil {
			return r
		}
		if !strings.Contains(lastErr.Error(), "address already in use") {
			break
		}
	}
	tb.Fatalf("testenv: start registry: %v", lastErr)
	return nil
}

// Auth returns the registry's account as go-containerregistry credentials
// (authn.Anonymous for a registry without auth).
func (r *Registry) Auth() authn.Authenticator {
	if r.User == "" {
		return authn.Anonymous
	}
	return &authn.Basic{Username: r.User, Password: r.Password}
}

func (r *Registry) htpasswdPath() string { return filepath.Join(r.Dir, "htpasswd") }

// RegistryAuth returns the account opts set (WithBasicAuth), "" if none.
func RegistryAuth(opts ...RegistryOption) (user, password string) {
	var r Registry
	for _, o := range opts {
		o(&r)
	}
	return r.User, r.Password
}

// WriteHtpasswd writes an htpasswd file of bcrypt entries, one for each
// user and password, as distribution's htpasswd auth reads it.
func WriteHtpasswd(path string, accounts ...[2]string) error {
	var b strings.Builder
	for _, a := range accounts {
		hash, err := bcrypt.GenerateFromPassword([]byte(a[1]), bcrypt.MinCost)
		if err != nil {
			return fmt.Errorf("htpasswd entry: %w", err)
		}
		b.WriteString(a[0] + ":" + string(hash) + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("write htpasswd: %w", err)
	}
	return nil
}

// HtpasswdConfig is the distribution config section that puts a registry
// behind the htpasswd file at path (appended to RegistryConfig).
func HtpasswdConfig(path string) string {
	return fmt.Sprintf("auth:\n  htpasswd:\n    realm: shoal-test\n    path: %s\n", path)
}

// Ref returns the reference of repoTag ("repo:tag" or "repo@sha256:…") in
// this registry.
func (r *Registry) Ref(repoTag string) string { return r.Host + "/" + repoTag }

// URL returns the registry's base URL, "http://127.0.0.1:PORT".
func (r *Registry) URL() string { return "http://" + r.Host }

// AccessLogPath is the file the registry writes its access log to, one line
// per request in Apache combined format.
func (r *Registry) AccessLogPath() string { return filepath.Join(r.Dir, "access.log") }

// LogPath is the file the registry writes its own log to (level warn).
func (r *Registry) LogPath() string { return filepath.Join(r.Dir, "registry.log") }

// Running reports whether the registry process is up.
func (r *Registry) Running() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		return false
	}
	select {
	case <-r.proc.Done:
		return false
	default:
		return true
	}
}

// Stop stops the registry: SIGTERM, then SIGKILL if it has not exited within
// a few seconds. The storage is kept, so Restart brings the same content back.
// Stop is idempotent, and safe to call from any goroutine.
func (r *Registry) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		return
	}
	p := r.proc
	r.proc = nil
	select {
	case <-p.Done:
		// It died on its own before anyone asked: worth knowing when a test
		// then fails for "connection refused".
		r.tb.Logf("testenv: registry %s had already exited: %v", r.Host, p.Err)
		return
	default:
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.Done:
	case <-time.After(registryStopTimeout):
		r.tb.Logf("testenv: registry %s ignored SIGTERM for %v; killing it", r.Host, registryStopTimeout)
		_ = p.Cmd.Process.Kill()
		<-p.Done
	}
}

// Restart starts the registry again on the same port with the same storage,
// after a Stop (it stops a running one first). It fails the test if the
// registry does not come back.
func (r *Registry) Restart() {
	r.tb.Helper()
	r.Stop()
	if err := r.start(); err != nil {
		r.tb.Fatalf("testenv: restart registry: %v", err)
	}
}

// AccessLogEntry is one request from the registry's access log.
type AccessLogEntry struct {
	Method string
	Path   string // request URI, query included
	Status int
	Bytes  int64 // response body bytes
}

// combined log format: host ident user [time] "METHOD URI PROTO" status bytes "referer" "agent"
var accessLogLine = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)`)

// AccessLog returns the requests the registry has logged so far, oldest
// first. Each line is written when its response is complete.
func (r *Registry) AccessLog() []AccessLogEntry {
	r.tb.Helper()
	data, err := os.ReadFile(r.AccessLogPath())
	if err != nil {
		r.tb.Fatalf("testenv: read registry access log: %v", err)
	}
	var entries []AccessLogEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		m := accessLogLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		e := AccessLogEntry{Method: m[1], Path: m[2]}
		e.Status, _ = strconv.Atoi(m[3])
		if m[4] != "-" {
			e.Bytes, _ = strconv.ParseInt(m[4], 10, 64)
		}
		entries = append(entries, e)
	}
	return entries
}

func (r *Registry) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc != nil {
		return errors.New("already running")
	}
	cfg := filepath.Join(r.Dir, "config.yml")
	conf := RegistryConfig(r.Host, filepath.Join(r.Dir, "data"))
	if r.User != "" {
		conf += HtpasswdConfig(r.htpasswdPath())
	}
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	// The access log goes to stdout and everything else to stderr; both are
	// appended so that a restart keeps the history.
	accessLog, err := os.OpenFile(r.AccessLogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open access log: %w", err)
	}
	defer accessLog.Close()
	logFile, err := os.OpenFile(r.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	defer logFile.Close()
	logStart, _ := logFile.Seek(0, 2)

	cmd := exec.Command(registryBinary(), "serve", cfg)
	cmd.Dir = r.Dir
	cmd.Stdout = accessLog
	cmd.Stderr = logFile
	// If the test binary dies (panic, timeout), the kernel kills the registry
	// too. Pdeathsig fires when the *thread* that forked exits, so the fork
	// happens on a locked thread that lives as long as the child (see
	// StartLocked).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p, err := StartLocked(cmd)
	if err != nil {
		return fmt.Errorf("exec %s: %w", cmd.Path, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), registryReadyTimeout)
	defer cancel()
	if err := WaitRegistryReady(ctx, nil, "http://"+r.Host+"/v2/", p.Done); err != nil {
		_ = cmd.Process.Kill()
		<-p.Done
		tail, _ := os.ReadFile(r.LogPath())
		if int64(len(tail)) >= logStart {
			tail = tail[logStart:]
		}
		return fmt.Errorf("registry on %s not ready: %w; its log: %s", r.Host, err, strings.TrimSpace(string(tail)))
	}
	r.proc = p
	return nil
}

// StartLocked starts cmd from a goroutine locked to its OS thread and keeps
// that thread until the child has exited, so that Pdeathsig fires only when
// the test process itself dies. Go may otherwise retire the forking thread
// (when some goroutine exits while locked to it), killing a healthy child.
func StartLocked(cmd *exec.Cmd) (*Process, error) {
	p := &Process{Cmd: cmd, Done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.Err = cmd.Wait()
		close(p.Done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

// WaitRegistryReady polls url with client until it answers 200 or 401 (a
// registry with auth still proves it is serving), the process exits, or ctx
// ends. client nil means a plain client; its Timeout is set to a second.
func WaitRegistryReady(ctx context.Context, client *http.Client, url string, exited <-chan struct{}) error {
	if client == nil {
		client = &http.Client{}
	}
	client.Timeout = time.Second
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		last = err
		select {
		case <-exited:
			return errors.New("process exited")
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
		case <-tick.C:
		}
	}
}

func (r *Registry) logTail() {
	data, err := os.ReadFile(r.LogPath())
	if err != nil || len(bytes.TrimSpace(data)) == 0 {
		return
	}
	const max = 4096
	if len(data) > max {
		data = data[len(data)-max:]
	}
	r.tb.Logf("testenv: registry %s log (tail):\n%s", r.Host, data)
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// RegistryConfig is the distribution config of every test registry (and of
// scripts/registry.sh): filesystem storage under dataDir, deletes allowed
// (tests of garbage and re-pushes need them), the access log kept, the rest
// at warn, listening on addr.
func RegistryConfig(addr, dataDir string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  # Fixed, so that an upload survives a restart; this is a test registry.
  secret: shoal-test-registry-not-secret
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
`, dataDir, addr)
}
