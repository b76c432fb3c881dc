//go:build linux

package netlab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Host is a network namespace on the lab's bridge with one address.
type Host struct {
	lab   *Lab
	name  string
	ns    string
	index int
	addr  netip.Addr
	swIf  string // the veth end in the switch namespace, a bridge port

	mu   sync.Mutex
	rate int // Mbit/s, 0 for none
}

// HostOption configures a host.
type HostOption func(*hostConfig)

type hostConfig struct{ rate int }

// WithRate caps the host's link at mbit Mbit/s in each direction, with a tbf
// qdisc on each end of its veth pair (see the package documentation). There
// is no latency option: that needs netem, which the kernel lacks.
func WithRate(mbit int) HostOption {
	return func(c *hostConfig) { c.rate = mbit }
}

// MaxRate is the highest rate WithRate and SetRate accept, in Mbit/s.
const MaxRate = 100_000

const (
	// tbfLatency bounds how long a packet may wait in a tbf queue; it sets
	// the queue's length (rate × latency + burst).
	tbfLatency = "50ms"
	// tbfMinBurst is the smallest bucket: several full-size frames, so that
	// low rates still pass whole TCP bursts.
	tbfMinBurst = 16 << 10
)

var hostNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$`)

// AddHost creates a host called name (letters, digits, '_', '.', '-'; at
// most 32) with the next free address. It ends the test with Fatal on errors
// (a lab from Open panics): call it from the test goroutine, or use NewHost.
func (l *Lab) AddHost(name string, opts ...HostOption) *Host {
	if l.tb != nil {
		l.tb.Helper()
	}
	h, err := l.NewHost(name, opts...)
	if err != nil {
		l.fail("netlab: %v", err)
	}
	return h
}

// NewHost is AddHost returning an error.
func (l *Lab) NewHost(name string, opts ...HostOption) (*Host, error) {
	if !hostNameRE.MatchString(name) {
		return nil, fmt.Errorf("add host %q: bad name (want %s)", name, hostNameRE)
	}
	var cfg hostConfig
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.rate < 0 || cfg.rate > MaxRate {
		return nil, fmt.Errorf("add host %s: rate %d Mbit/s out of range [0, %d]", name, cfg.rate, MaxRate)
	}

	l.ops.RLock()
	defer l.ops.RUnlock()
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return nil, ErrClosed
	case l.byName[name] != nil:
		l.mu.Unlock()
		return nil, fmt.Errorf("add host %s: a host of that name exists", name)
	case l.nextIndex >= MaxHosts:
		l.mu.Unlock()
		return nil, fmt.Errorf("add host %s: the lab has made %d hosts, the most it can", name, MaxHosts)
	}
	// Indexes are never reused, so a failed host's interface name and
	// address cannot collide with a later host's.
	index := l.nextIndex
	l.nextIndex++
	h := &Host{
		lab:   l,
		name:  name,
		ns:    l.sw + "-" + name,
		index: index,
		addr:  hostAddr(index),
		swIf:  IfacePrefix + l.id + "h" + strconv.Itoa(index),
	}
	l.byName[name] = h
	l.mu.Unlock()

	if err := h.create(cfg); err != nil {
		// The namespace stays listed for Close; deleting it now frees the
		// name (and destroys the veth pair, if it got that far).
		if _, kerr := killInNetns([]string{h.ns}, killTimeout); kerr != nil {
			err = errors.Join(err, kerr)
		}
		if derr := deleteNetns(h.ns); derr != nil {
			err = errors.Join(err, derr)
		}
		l.mu.Lock()
		delete(l.byName, name)
		l.mu.Unlock()
		return nil, fmt.Errorf("add host %s: %w", name, err)
	}
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	return h, nil
}

// hostAddr is the address of the i-th host: 198.18.0.2 to 198.18.0.254, then
// 198.18.1.1 to 198.18.1.254, and so on; never .0 or .255.
func hostAddr(i int) netip.Addr {
	third, fourth := 0, i+2
	if i >= 253 {
		j := i - 253
		third, fourth = 1+j/254, 1+j%254
	}
	return netip.AddrFrom4([4]byte{198, 18, byte(third), byte(fourth)})
}

func (h *Host) create(cfg hostConfig) error {
	l := h.lab
	if err := l.addNamespace(h.ns); err != nil {
		return err
	}
	ip := l.tools.ip
	steps := [][]string{
		{"-n", h.ns, "link", "set", "lo", "up"},
		{"-n", l.sw, "link", "add", h.swIf, "type", "veth", "peer", "name", HostIface, "netns", h.ns},
		{"-n", l.sw, "link", "set", h.swIf, "master", l.bridge, "up"},
		{"-n", h.ns, "addr", "add", netip.PrefixFrom(h.addr, subnetPrefix.Bits()).String(), "dev", HostIface},
		{"-n", h.ns, "link", "set", HostIface, "up"},
	}
	for _, args := range steps {
		if err := l.run(ip, args...); err != nil {
			return err
		}
	}
	if cfg.rate > 0 {
		if err := h.setRate(cfg.rate); err != nil {
			return err
		}
	}
	rate := "unshaped"
	if cfg.rate > 0 {
		rate = fmt.Sprintf("tbf %d Mbit/s each way", cfg.rate)
	}
	l.logf("netlab: host %s: %s in namespace %s, bridge port %s, %s", h.name, h.addr, h.ns, h.swIf, rate)
	return nil
}

// SetRate changes the cap on the host's link to mbit Mbit/s each way; 0
// removes it.
func (h *Host) SetRate(mbit int) error {
	if mbit < 0 || mbit > MaxRate {
		return fmt.Errorf("netlab: rate %d Mbit/s out of range [0, %d]", mbit, MaxRate)
	}
	l := h.lab
	l.ops.RLock()
	defer l.ops.RUnlock()
	if l.isClosed() {
		return ErrClosed
	}
	if err := h.setRate(mbit); err != nil {
		return fmt.Errorf("netlab: host %s: %w", h.name, err)
	}
	return nil
}

func (h *Host) setRate(mbit int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if mbit == h.rate {
		return nil
	}
	l := h.lab
	for _, end := range []struct{ ns, dev string }{{h.ns, HostIface}, {l.sw, h.swIf}} {
		var err error
		if mbit == 0 {
			err = l.run(l.tools.tc, "-n", end.ns, "qdisc", "del", "dev", end.dev, "root")
		} else {
			burst := max(mbit*1_000_000/8/100, tbfMinBurst) // 10 ms at the rate
			err = l.run(l.tools.tc, "-n", end.ns, "qdisc", "replace", "dev", end.dev, "root", "tbf",
				"rate", strconv.Itoa(mbit)+"mbit", "burst", strconv.Itoa(burst), "latency", tbfLatency)
		}
		if err != nil {
			return err
		}
	}
	h.rate = mbit
	return nil
}

// SetLinkUp takes the host's link to the bridge down (false) or up again
// (true): while it is down, nothing reaches the host or leaves it, as when
// a registry's network fails; connections survive a short outage.
func (h *Host) SetLinkUp(up bool) error {
	l := h.lab
	l.ops.RLock()
	defer l.ops.RUnlock()
	if l.isClosed() {
		return ErrClosed
	}
	state := "down"
	if up {
		state = "up"
	}
	if err := l.run(l.tools.ip, "-n", l.sw, "link", "set", h.swIf, state); err != nil {
		return fmt.Errorf("netlab: host %s: link %s: %w", h.name, state, err)
	}
	return nil
}

// Name is the name the host was created with.
func (h *Host) Name() string { return h.name }

// IP is the host's address, "198.18.0.N".
func (h *Host) IP() string { return h.addr.String() }

// Addr is the host's address.
func (h *Host) Addr() netip.Addr { return h.addr }

// HostPort is "IP:port".
func (h *Host) HostPort(port int) string {
	return netip.AddrPortFrom(h.addr, uint16(port)).String()
}

// Namespace is the name of the host's network namespace, for ip -n and
// /run/netns.
func (h *Host) Namespace() string { return h.ns }

// BridgePort is the name of the host's veth end in the switch namespace.
func (h *Host) BridgePort() string { return h.swIf }

// Rate is the host's link cap in Mbit/s, 0 for none.
func (h *Host) Rate() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.rate
}

// proxyVars are left out of a command's environment: a proxy is an address
// outside the lab.
var proxyVars = []string{"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"}

// Command returns a command that runs name inside the host's network
// namespace, through nsenter --net (only the network namespace changes: the
// command sees the test's files and mounts, and mounts it makes are visible
// to the test; /sys/class/net, being a mount, still lists the test's own
// interfaces, while ip(8), /proc/self/net and netlink show the host's). name
// is looked up in $PATH first, as exec.Command does.
//
// The command gets its own process group, SIGKILL when the test binary dies
// (Pdeathsig: start it from a goroutine that is not locked to its thread),
// the process group killed when ctx ends, and the environment of the test
// without proxy variables. Whatever runs in the namespace when the lab closes
// is killed; Wait for the command as usual to reap it.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	l := h.lab
	path := name
	var lookErr error
	if !strings.Contains(name, "/") {
		path, lookErr = exec.LookPath(name)
	}
	argv := append([]string{"--net=" + filepath.Join(netnsDir, h.ns), "--", path}, args...)
	cmd := exec.CommandContext(ctx, l.tools.nsenter, argv...)
	cmd.Env = withoutProxy(os.Environ())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error {
		if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err == nil {
			return nil
		}
		return cmd.Process.Kill()
	}
	cmd.WaitDelay = 5 * time.Second
	switch {
	case l.isClosed():
		cmd.Err = ErrClosed
	case lookErr != nil:
		cmd.Err = lookErr
	}
	return cmd
}

func withoutProxy(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, p := range proxyVars {
			if strings.EqualFold(k, p) {
				drop = true
				break
			}
		}
		if !drop {
			out = append(out, kv)
		}
	}
	return out
}

// checkDialAddr enforces the address rule: a lab host may be dialled only at
// an IP literal inside Range, or at its own loopback.
func checkDialAddr(address string) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return fmt.Errorf("netlab: dial %s: want an IP address, not a name", address)
	}
	a = a.Unmap()
	if !a.IsLoopback() && !rangePrefix.Contains(a) {
		return fmt.Errorf("netlab: dial %s: only %s and loopback are allowed", address, Range)
	}
	return nil
}

// DialContext connects from inside the host's network namespace, as
// net.Dialer.DialContext does; address must be an IP in Range or loopback
// (the host's own).
func (h *Host) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkDialAddr(address); err != nil {
		return nil, err
	}
	var c net.Conn
	err := inNetns(h.ns, func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Listen listens inside the host's network namespace, as net.Listen does:
// on the host's address ("198.18.0.N:port"), on its loopback, or on all of
// its addresses (":port").
func (h *Host) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := inNetns(h.ns, func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// HTTPClient returns a client whose connections start in the host's
// namespace. It uses no proxy and dials only what DialContext allows.
func (h *Host) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         h.DialContext,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}}
}

// LinkStats are the counters of a host's eth0, as /proc/net/dev shows them
// inside its namespace: Tx is what the host sent, Rx what it received, in
// bytes of Ethernet frames.
type LinkStats struct {
	RxBytes, RxPackets, RxDropped uint64
	TxBytes, TxPackets, TxDropped uint64
}

// Stats reads the counters of the host's eth0.
func (h *Host) Stats() (LinkStats, error) {
	var data []byte
	err := inNetns(h.ns, func() error {
		var err error
		data, err = os.ReadFile("/proc/thread-self/net/dev")
		return err
	})
	if err != nil {
		return LinkStats{}, fmt.Errorf("netlab: host %s: %w", h.name, err)
	}
	s, err := parseNetDev(data, HostIface)
	if err != nil {
		return LinkStats{}, fmt.Errorf("netlab: host %s: %w", h.name, err)
	}
	return s, nil
}

// parseNetDev finds iface in the text of /proc/net/dev.
func parseNetDev(data []byte, iface string) (LinkStats, error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(name) != iface {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 16 {
			return LinkStats{}, fmt.Errorf("/proc/net/dev: short line for %s: %q", iface, sc.Text())
		}
		var v [16]uint64
		for i := range v {
			n, err := strconv.ParseUint(f[i], 10, 64)
			if err != nil {
				return LinkStats{}, fmt.Errorf("/proc/net/dev: %s: %w", iface, err)
			}
			v[i] = n
		}
		// receive: bytes packets errs drop fifo frame compressed multicast;
		// transmit: bytes packets errs drop fifo colls carrier compressed.
		return LinkStats{
			RxBytes: v[0], RxPackets: v[1], RxDropped: v[3],
			TxBytes: v[8], TxPackets: v[9], TxDropped: v[11],
		}, nil
	}
	return LinkStats{}, fmt.Errorf("/proc/net/dev: no interface %s", iface)
}

// TxBytes is how many bytes the host has sent on its link. Errors end the
// test as AddHost's do.
func (h *Host) TxBytes() uint64 {
	s, err := h.Stats()
	if err != nil {
		h.lab.fail("%v", err)
	}
	return s.TxBytes
}

// RxBytes is how many bytes the host has received on its link. Errors end
// the test as AddHost's do.
func (h *Host) RxBytes() uint64 {
	s, err := h.Stats()
	if err != nil {
		h.lab.fail("%v", err)
	}
	return s.RxBytes
}
