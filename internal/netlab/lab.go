//go:build linux

package netlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shoal-project/shoal/internal/testenv"
)

const (
	// NamespacePrefix starts the name of every network namespace a lab
	// creates: NamespacePrefix+ID for its switch, NamespacePrefix+ID+"-"+name
	// for its hosts. The ID is six hex digits.
	NamespacePrefix = "shoalnl-"
	// IfacePrefix starts the name of every interface a lab creates outside its
	// hosts (the bridge and the switch ends of the veths, all in the switch
	// namespace): IfacePrefix+ID+"br" and IfacePrefix+ID+"h"+index.
	IfacePrefix = "nl"
	// HostIface is the name of a host's interface inside its namespace.
	HostIface = "eth0"

	// Range is the only range lab addresses come from: the benchmarking range
	// of RFC 2544.
	Range = "198.18.0.0/15"
	// Subnet is the lab's one on-link subnet, inside Range.
	Subnet = "198.18.0.0/16"

	// MaxHosts is the most hosts one lab holds.
	MaxHosts = 4096
)

var (
	rangePrefix  = netip.MustParsePrefix(Range)
	subnetPrefix = netip.MustParsePrefix(Subnet)
)

// Where ip(8) keeps named network namespaces, and where labs keep their
// locks. Variables only so that nothing else is tempted to spell them.
var (
	netnsDir = "/run/netns"
	lockDir  = "/run/shoal-netlab"
)

const (
	idBytes      = 3 // six hex digits
	cmdTimeout   = 30 * time.Second
	killTimeout  = 5 * time.Second
	openAttempts = 5
)

// ErrClosed is returned for operations on a closed lab.
var ErrClosed = errors.New("netlab: lab is closed")

// Lab is a set of hosts in network namespaces on one bridge. Its methods are
// safe for concurrent use.
type Lab struct {
	id     string
	sw     string // switch namespace
	bridge string
	tb     testing.TB // nil for a lab from Open
	logf   func(format string, args ...any)
	tools  tools

	lock     *os.File // flock held for the lab's life
	lockPath string

	// ops is held shared by operations that create things and exclusively
	// by Close, so that nothing is created behind Close's back.
	ops sync.RWMutex

	mu        sync.Mutex
	closed    bool
	hosts     []*Host
	byName    map[string]*Host
	nextIndex int      // of the next host
	nss       []string // every namespace created or being created, switch first

	closeOnce sync.Once
	closeErr  error
}

// Option configures a lab.
type Option func(*config)

type config struct {
	logf func(format string, args ...any)
}

// WithLogf sends the lab's log lines (what it creates and removes) to logf.
// New logs to the test's Logf by default; Open logs nowhere.
func WithLogf(logf func(format string, args ...any)) Option {
	return func(c *config) { c.logf = logf }
}

// New creates a lab for a test: it removes what crashed earlier runs left
// behind (CleanupStale), creates the switch namespace and its bridge, and
// registers Close with tb.Cleanup, so every namespace, interface and process
// of the lab goes away when the test ends, also when it fails or panics.
//
// Without root or the tools (see Available) the test is skipped, or fails
// when the CI environment variable is set. Call New and AddHost from the test
// goroutine: they end the test with Fatal on errors.
func New(tb testing.TB, opts ...Option) *Lab {
	tb.Helper()
	if err := Available(); err != nil {
		testenv.SkipOrFatal(tb, "netlab: %v", err)
	}
	cfg := config{logf: tb.Logf}
	for _, o := range opts {
		o(&cfg)
	}
	if removed, err := CleanupStale(); err != nil {
		tb.Fatalf("netlab: clean up stale labs: %v", err)
	} else if len(removed) > 0 {
		cfg.logf("netlab: removed stale namespaces of crashed runs: %s", strings.Join(removed, " "))
	}
	l, err := newLab(cfg)
	if err != nil {
		tb.Fatalf("netlab: %v", err)
	}
	l.tb = tb
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("netlab: %v", err)
		}
	})
	if err := l.init(); err != nil {
		tb.Fatalf("netlab: %v", err)
	}
	return l
}

// Open creates a lab outside a test. The caller must Close it; a program
// killed before that leaves namespaces behind for CleanupStale.
func Open(opts ...Option) (*Lab, error) {
	if err := Available(); err != nil {
		return nil, fmt.Errorf("netlab: %w", err)
	}
	cfg := config{logf: func(string, ...any) {}}
	for _, o := range opts {
		o(&cfg)
	}
	if _, err := CleanupStale(); err != nil {
		return nil, fmt.Errorf("netlab: clean up stale labs: %w", err)
	}
	l, err := newLab(cfg)
	if err != nil {
		return nil, fmt.Errorf("netlab: %w", err)
	}
	if err := l.init(); err != nil {
		return nil, errors.Join(fmt.Errorf("netlab: %w", err), l.Close())
	}
	return l, nil
}

type tools struct{ ip, tc, nsenter string }

func findTools() (tools, error) {
	var t tools
	var errs []error
	for _, x := range []struct {
		name string
		dst  *string
	}{{"ip", &t.ip}, {"tc", &t.tc}, {"nsenter", &t.nsenter}} {
		p, err := lookPath(x.name)
		if err != nil {
			errs = append(errs, err)
		}
		*x.dst = p
	}
	return t, errors.Join(errs...)
}

// lookPath finds a tool in $PATH or in the sbin directories a non-login
// root shell may lack.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found (iproute2 provides ip and tc, util-linux nsenter)", name)
}

// Available reports why labs cannot be created here, or nil if they can: it
// needs root and ip, tc and nsenter.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root")
	}
	_, err := findTools()
	return err
}

// newLab picks an unused ID and takes its lock; init then creates the switch.
func newLab(cfg config) (*Lab, error) {
	t, err := findTools()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, err
	}
	for range openAttempts {
		id, err := randomID()
		if err != nil {
			return nil, err
		}
		lock, path, err := takeLock(id)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		sw := NamespacePrefix + id
		if _, err := os.Lstat(filepath.Join(netnsDir, sw)); err == nil {
			// Leftovers of a crashed lab with the same ID: not ours to touch.
			lock.Close()
			os.Remove(path)
			continue
		}
		return &Lab{
			id:       id,
			sw:       sw,
			bridge:   IfacePrefix + id + "br",
			logf:     cfg.logf,
			tools:    t,
			lock:     lock,
			lockPath: path,
			byName:   map[string]*Host{},
		}, nil
	}
	return nil, fmt.Errorf("no free lab ID after %d attempts", openAttempts)
}

func randomID() (string, error) {
	b := make([]byte, idBytes)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// takeLock creates lockDir/ID.lock already flocked: it locks a private file
// and then links it into place, so that nobody ever sees the lock file of a
// live lab unlocked (CleanupStale takes an unlocked one for a dead lab's).
func takeLock(id string) (*os.File, string, error) {
	tmp, err := os.CreateTemp(lockDir, ".new-"+id+"-")
	if err != nil {
		return nil, "", err
	}
	defer os.Remove(tmp.Name())
	if err := unix.Flock(int(tmp.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		tmp.Close()
		return nil, "", fmt.Errorf("lock %s: %w", tmp.Name(), err)
	}
	fmt.Fprintf(tmp, "pid %d\n", os.Getpid())
	path := lockPath(id)
	if err := os.Link(tmp.Name(), path); err != nil {
		tmp.Close()
		return nil, "", err // os.ErrExist: the ID is taken
	}
	return tmp, path, nil
}

// isClosed reports whether Close has begun.
func (l *Lab) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

func lockPath(id string) string { return filepath.Join(lockDir, id+".lock") }

func (l *Lab) init() error {
	l.ops.RLock()
	defer l.ops.RUnlock()
	if err := l.addNamespace(l.sw); err != nil {
		return err
	}
	if err := l.run(l.tools.ip, "-n", l.sw, "link", "add", l.bridge, "type", "bridge", "stp_state", "0"); err != nil {
		return err
	}
	if err := l.run(l.tools.ip, "-n", l.sw, "link", "set", l.bridge, "up"); err != nil {
		return err
	}
	l.logf("netlab: lab %s: bridge %s in namespace %s", l.id, l.bridge, l.sw)
	return nil
}

// addNamespace registers ns for cleanup, then creates it with IPv6 and
// forwarding off.
func (l *Lab) addNamespace(ns string) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	if err := l.run(l.tools.ip, "netns", "add", ns); err != nil {
		return err
	}
	return inNetns(ns, isolate)
}

// isolate sets the sysctls of the calling thread's network namespace that
// keep a lab namespace to itself. Devices created or moved into the
// namespace later take the "default" values.
func isolate() error {
	for _, s := range []struct{ path, value string }{
		{"/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"},
		{"/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"},
		{"/proc/sys/net/ipv4/ip_forward", "0"},
	} {
		err := os.WriteFile(s.path, []byte(s.value), 0o644)
		if err != nil && !(errors.Is(err, os.ErrNotExist) && strings.Contains(s.path, "ipv6")) {
			return fmt.Errorf("sysctl %s: %w", s.path, err)
		}
	}
	return nil
}

// run runs a setup command and returns its output in the error.
func (l *Lab) run(name string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ID is the lab's random ID, part of every name it creates.
func (l *Lab) ID() string { return l.id }

// SwitchNamespace is the name of the namespace that holds the bridge.
func (l *Lab) SwitchNamespace() string { return l.sw }

// Bridge is the name of the bridge in the switch namespace.
func (l *Lab) Bridge() string { return l.bridge }

// Namespaces returns the names of the lab's namespaces, switch first.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.nss)
}

// Hosts returns the lab's hosts in order of creation.
func (l *Lab) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.hosts)
}

// Host returns the host called name, or nil.
func (l *Lab) Host(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byName[name]
}

// Close kills every process in the lab's namespaces, deletes the namespaces
// (which destroys the veths and the bridge) and releases the lab's lock. It is
// idempotent; New calls it when the test ends.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.ops.Lock() // wait for AddHost calls in flight
	defer l.ops.Unlock()
	l.mu.Lock()
	l.closed = true
	nss := slices.Clone(l.nss)
	l.mu.Unlock()

	var errs []error
	killed, err := killInNetns(nss, killTimeout)
	if err != nil {
		errs = append(errs, err)
	}
	// Hosts first, the switch last: a host's veth goes with whichever end's
	// namespace dies first.
	for _, ns := range slices.Backward(nss) {
		if err := deleteNetns(ns); err != nil {
			errs = append(errs, err)
		}
	}
	if l.lock != nil {
		os.Remove(l.lockPath)
		l.lock.Close()
	}
	if len(nss) > 0 {
		l.logf("netlab: lab %s closed: killed %d processes, deleted %d namespaces", l.id, killed, len(nss))
	}
	if len(errs) > 0 {
		return fmt.Errorf("close lab %s: %w", l.id, errors.Join(errs...))
	}
	return nil
}

// fail reports an error of a method that has no error result: Fatal in the
// lab's test, a panic for a lab from Open.
func (l *Lab) fail(format string, args ...any) {
	if l.tb != nil {
		l.tb.Helper()
		l.tb.Fatalf(format, args...)
	}
	panic(fmt.Sprintf(format, args...))
}
