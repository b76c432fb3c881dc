//go:build linux

package netlab

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoal-project/shoal/internal/testenv"
)

const (
	shapedMbit   = 50
	transferSize = 12 << 20 // 12 MiB: 2.0 s at 50 Mbit/s
	// minShaped is the least a transfer of transferSize through the 50 Mbit/s
	// link may take: a generous bound (2.0 s is the ideal) that only an
	// unshaped link breaks.
	minShaped = 1500 * time.Millisecond
	maxShaped = 60 * time.Second

	helperEnv = "NETLAB_TEST_HELPER"
	markerEnv = "NETLAB_TEST_MARKER"
)

// needLab skips in -short mode, and without root or the tools (fails in CI).
func needLab(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("netlab: network namespaces are not for -short")
	}
	if err := Available(); err != nil {
		testenv.SkipOrFatal(t, "netlab: %v", err)
	}
}

func TestHostAddr(t *testing.T) {
	for _, c := range []struct {
		i    int
		want string
	}{{0, "198.18.0.2"}, {1, "198.18.0.3"}, {252, "198.18.0.254"}, {253, "198.18.1.1"}, {506, "198.18.1.254"}, {507, "198.18.2.1"}, {MaxHosts - 1, "198.18.16.33"}} {
		a := hostAddr(c.i)
		if a.String() != c.want {
			t.Errorf("hostAddr(%d) = %s, want %s", c.i, a, c.want)
		}
		if !subnetPrefix.Contains(a) || !rangePrefix.Contains(a) {
			t.Errorf("hostAddr(%d) = %s outside %s", c.i, a, Subnet)
		}
	}
	seen := map[string]bool{}
	for i := range MaxHosts {
		a := hostAddr(i)
		b := a.As4()
		if b[3] == 0 || b[3] == 255 || seen[a.String()] || !subnetPrefix.Contains(a) {
			t.Fatalf("hostAddr(%d) = %s: bad or repeated", i, a)
		}
		seen[a.String()] = true
	}
}

func TestCheckDialAddr(t *testing.T) {
	for addr, ok := range map[string]bool{
		"198.18.0.2:80":     true,
		"198.19.255.254:80": true,
		"127.0.0.1:80":      true,
		"[::1]:80":          true,
		"198.20.0.1:80":     false,
		"10.0.0.1:80":       false,
		"example.com:80":    false,
		"localhost:80":      false,
	} {
		if err := checkDialAddr(addr); (err == nil) != ok {
			t.Errorf("checkDialAddr(%s) = %v, want ok=%v", addr, err, ok)
		}
	}
}

func TestParseNetDev(t *testing.T) {
	data := []byte(`Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0: 12345678   9000    0    3    0     0          0         0 87654321   8000    0    5    0     0       0          0
`)
	s, err := parseNetDev(data, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	want := LinkStats{RxBytes: 12345678, RxPackets: 9000, RxDropped: 3, TxBytes: 87654321, TxPackets: 8000, TxDropped: 5}
	if s != want {
		t.Errorf("got %+v, want %+v", s, want)
	}
	if _, err := parseNetDev(data, "eth1"); err == nil {
		t.Error("eth1: no error")
	}
}

// TestLab builds three hosts and a registry host behind a 50 Mbit/s link,
// checks the addressing and isolation, talks between hosts, and checks that
// the link is capped.
func TestLab(t *testing.T) {
	needLab(t)
	if removed, err := CleanupStale(); err != nil {
		t.Fatalf("CleanupStale: %v", err)
	} else if len(removed) > 0 {
		t.Logf("removed stale namespaces: %v", removed)
	}
	lab := New(t)
	a, b, c := lab.AddHost("a"), lab.AddHost("b"), lab.AddHost("c")
	reg := lab.AddHost("registry", WithRate(shapedMbit))
	hosts := []*Host{a, b, c, reg}
	for i, h := range hosts {
		if want := fmt.Sprintf("198.18.0.%d", i+2); h.IP() != want {
			t.Errorf("host %s: IP %s, want %s", h.Name(), h.IP(), want)
		}
	}
	if lab.Host("b") != b || lab.Host("nope") != nil || !slices.Equal(lab.Hosts(), hosts) {
		t.Errorf("Host/Hosts do not return the hosts")
	}
	if _, err := lab.NewHost("a"); err == nil {
		t.Error("a second host a: no error")
	}
	if _, err := lab.NewHost("bad name"); err == nil {
		t.Error(`host "bad name": no error`)
	}

	t.Run("addressing", func(t *testing.T) {
		for _, h := range hosts {
			routes := ipOut(t, "-n", h.Namespace(), "-4", "route", "show", "table", "all")
			for _, line := range strings.Split(routes, "\n") {
				if strings.HasPrefix(line, "default") {
					t.Errorf("host %s has a default route: %s", h.Name(), line)
				}
			}
			main := strings.TrimSpace(ipOut(t, "-n", h.Namespace(), "-4", "route", "show"))
			if want := "198.18.0.0/16 dev eth0 proto kernel scope link src " + h.IP(); main != want {
				t.Errorf("host %s: routes %q, want %q", h.Name(), main, want)
			}
			if v6 := strings.TrimSpace(ipOut(t, "-n", h.Namespace(), "-6", "-o", "addr", "show")); v6 != "" {
				t.Errorf("host %s has IPv6 addresses: %s", h.Name(), v6)
			}
			// An address inside the range but off the lab's subnet: no route,
			// so no packet is ever sent anywhere else.
			out, err := exec.Command(lab.tools.ip, "-n", h.Namespace(), "route", "get", "198.19.255.1").CombinedOutput()
			if err == nil || !strings.Contains(string(out), "unreachable") {
				t.Errorf("host %s: route get 198.19.255.1 = %q, %v; want unreachable", h.Name(), out, err)
			}
		}
		if addrs := strings.TrimSpace(ipOut(t, "-n", lab.SwitchNamespace(), "-o", "addr", "show", "scope", "global")); addrs != "" {
			t.Errorf("switch has addresses: %s", addrs)
		}
		for _, end := range []struct{ ns, dev string }{{reg.Namespace(), HostIface}, {lab.SwitchNamespace(), reg.BridgePort()}} {
			q := tcOut(t, "-n", end.ns, "qdisc", "show", "dev", end.dev)
			if !strings.Contains(q, "tbf") || !strings.Contains(q, "rate 50Mbit") {
				t.Errorf("%s in %s: qdisc %q, want tbf rate 50Mbit", end.dev, end.ns, q)
			}
		}
		if q := tcOut(t, "-n", a.Namespace(), "qdisc", "show", "dev", HostIface); strings.Contains(q, "tbf") {
			t.Errorf("unshaped host a has %q", q)
		}
		for _, name := range ifaceNames(t, lab.SwitchNamespace()) {
			if len(name) > 15 {
				t.Errorf("interface name %s longer than 15", name)
			}
		}
	})

	// A file server on a, fetched with curl from b.
	dir := t.TempDir()
	hello := fmt.Sprintf("hello from a, %d\n", rand.Int64())
	writeFile(t, filepath.Join(dir, "hello.txt"), []byte(hello))
	big := randomBytes(transferSize, 1)
	writeFile(t, filepath.Join(dir, "big.bin"), big)
	ctx := t.Context()
	srv := a.Command(ctx, "python3", "-m", "http.server", "8000", "--bind", a.IP(), "--directory", dir)
	if err := srv.Start(); err != nil {
		t.Fatalf("start http.server on a: %v", err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })

	t.Run("http", func(t *testing.T) {
		url := "http://" + a.HostPort(8000) + "/hello.txt"
		var got []byte
		var err error
		deadline := time.Now().Add(15 * time.Second)
		for {
			got, err = b.Command(ctx, "curl", "-fsS", "--max-time", "5", url).Output()
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("curl %s from b: %v", url, err)
		}
		if string(got) != hello {
			t.Errorf("curl %s from b = %q, want %q", url, got, hello)
		}
		// The server is bound to a's lab address only: not on a's loopback.
		if out, err := a.Command(ctx, "curl", "-fsS", "--max-time", "5", "http://127.0.0.1:8000/hello.txt").CombinedOutput(); err == nil {
			t.Errorf("http.server answers on a's loopback: %s", out)
		}
	})

	t.Run("echo", func(t *testing.T) {
		ln, err := c.Listen("tcp", c.HostPort(7))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(conn, conn); conn.Close() }()
			}
		}()
		// From a with Go, and from b with bash's /dev/tcp.
		conn, err := a.DialContext(ctx, "tcp", c.HostPort(7))
		if err != nil {
			t.Fatal(err)
		}
		msg := "ping over the bridge\n"
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != msg {
			t.Errorf("echo from c: %q, %v", buf, err)
		}
		if got := conn.LocalAddr().(*net.TCPAddr).IP.String(); got != a.IP() {
			t.Errorf("connection from a has source %s, want %s", got, a.IP())
		}
		conn.Close()
		script := fmt.Sprintf(`exec 3<>/dev/tcp/%s/7 && printf 'bash\n' >&3 && read -r -t 5 line <&3 && echo "$line"`, c.IP())
		out, err := b.Command(ctx, "bash", "-c", script).Output()
		if err != nil || string(out) != "bash\n" {
			t.Errorf("bash /dev/tcp echo from b: %q, %v", out, err)
		}
	})

	t.Run("link down", func(t *testing.T) {
		ln, err := c.Listen("tcp", c.HostPort(9))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				conn.Close()
			}
		}()
		dial := func() error {
			dctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			conn, err := a.DialContext(dctx, "tcp", c.HostPort(9))
			if err == nil {
				conn.Close()
			}
			return err
		}
		if err := c.SetLinkUp(false); err != nil {
			t.Fatal(err)
		}
		if err := dial(); err == nil {
			t.Error("dialed c with its link down")
		}
		if err := c.SetLinkUp(true); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for err := dial(); err != nil; err = dial() {
			if time.Now().After(deadline) {
				t.Fatalf("c unreachable with its link up again: %v", err)
			}
		}
	})

	t.Run("isolation", func(t *testing.T) {
		// A listener on the test's own loopback is out of the hosts' reach:
		// their 127.0.0.1 is their own.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if conn, err := a.DialContext(ctx, "tcp", ln.Addr().String()); err == nil {
			conn.Close()
			t.Errorf("host a reached the test's loopback listener %s", ln.Addr())
		}
		if _, err := a.DialContext(ctx, "tcp", "10.1.2.3:80"); err == nil || !strings.Contains(err.Error(), "only") {
			t.Errorf("dial outside the range: %v, want refused", err)
		}
	})

	t.Run("registry", func(t *testing.T) {
		addr := reg.StartRegistry(t)
		if want := reg.IP() + ":5000"; addr != want {
			t.Errorf("StartRegistry = %s, want %s", addr, want)
		}
		out, err := a.Command(ctx, "curl", "-fsS", "--max-time", "5", "http://"+addr+"/v2/").Output()
		if err != nil || strings.TrimSpace(string(out)) != "{}" {
			t.Fatalf("GET /v2/ from a: %q, %v", out, err)
		}

		// Upload from a: the bytes enter the registry host through the tbf
		// on its bridge port.
		blob := randomBytes(transferSize, 2)
		sum := sha256.Sum256(blob)
		digest := "sha256:" + hex.EncodeToString(sum[:])
		regRx := reg.RxBytes()
		start := time.Now()
		pushBlob(t, a.HTTPClient(), addr, "netlab/test", digest, blob)
		up := time.Since(start)
		regRx = reg.RxBytes() - regRx

		// Download to b with curl: the bytes leave through the tbf on the
		// registry's eth0.
		regTx := reg.TxBytes()
		start = time.Now()
		out, err = b.Command(ctx, "curl", "-fsS", "--max-time", "60", "-o", "/dev/null", "-w", "%{size_download}",
			"http://"+addr+"/v2/netlab/test/blobs/"+digest).Output()
		down := time.Since(start)
		if err != nil {
			t.Fatalf("curl blob from b: %v", err)
		}
		regTx = reg.TxBytes() - regTx
		if n, _ := strconv.Atoi(string(out)); n != transferSize {
			t.Fatalf("curl blob from b: %s bytes, want %d", out, transferSize)
		}

		// The same size between two unshaped hosts (a's http.server to b).
		start = time.Now()
		got, err := b.Command(ctx, "curl", "-fsS", "--max-time", "60", "http://"+a.HostPort(8000)+"/big.bin").Output()
		free := time.Since(start)
		if err != nil || !bytes.Equal(got, big) {
			t.Fatalf("curl big.bin from b: %d bytes, %v", len(got), err)
		}

		mbit := func(d time.Duration) float64 { return float64(transferSize) * 8 / d.Seconds() / 1e6 }
		t.Logf("%d bytes: upload to the registry %v (%.1f Mbit/s, registry rx %d bytes), download from it %v (%.1f Mbit/s, registry tx %d bytes), unshaped a->b (python http.server) %v (%.0f Mbit/s); cap %d Mbit/s, ideal %v",
			transferSize, up.Round(time.Millisecond), mbit(up), regRx, down.Round(time.Millisecond), mbit(down), regTx,
			free.Round(time.Millisecond), mbit(free), shapedMbit, time.Duration(transferSize*8*int64(time.Second)/(shapedMbit*1e6)).Round(time.Millisecond))
		for _, x := range []struct {
			what string
			d    time.Duration
		}{{"upload to", up}, {"download from", down}} {
			if x.d < minShaped || x.d > maxShaped {
				t.Errorf("%s the registry behind %d Mbit/s took %v, want between %v and %v", x.what, shapedMbit, x.d, minShaped, maxShaped)
			}
		}
		if regTx < transferSize || regTx > transferSize*11/10 {
			t.Errorf("registry sent %d bytes for a %d-byte blob", regTx, transferSize)
		}
		if regRx < transferSize || regRx > transferSize*11/10 {
			t.Errorf("registry received %d bytes for a %d-byte blob", regRx, transferSize)
		}

		// Lifting the cap.
		if err := reg.SetRate(0); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		out, err = b.Command(ctx, "curl", "-fsS", "--max-time", "60", "-o", "/dev/null", "-w", "%{size_download}",
			"http://"+addr+"/v2/netlab/test/blobs/"+digest).Output()
		lifted := time.Since(start)
		if n, _ := strconv.Atoi(string(out)); err != nil || n != transferSize {
			t.Fatalf("curl blob without the cap: %s bytes, %v", out, err)
		}
		t.Logf("download from the registry without the cap: %v", lifted.Round(time.Millisecond))
		if lifted >= down {
			t.Errorf("download without the cap (%v) not faster than with it (%v)", lifted, down)
		}
		if q := tcOut(t, "-n", reg.Namespace(), "qdisc", "show", "dev", HostIface); strings.Contains(q, "tbf") {
			t.Errorf("after SetRate(0): %q", q)
		}
	})
}

// pushBlob uploads blob in one PUT (the registry's monolithic upload).
func pushBlob(t *testing.T, client *http.Client, addr, repo, digest string, blob []byte) {
	t.Helper()
	resp, err := client.Post("http://"+addr+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatalf("start upload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s", resp.Status)
	}
	loc, err := resp.Location()
	if err != nil {
		t.Fatalf("start upload: %v", err)
	}
	q := loc.Query()
	q.Set("digest", digest)
	loc.RawQuery = q.Encode()
	req, err := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = client.Do(req)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload: %s", resp.Status)
	}
}

// TestCleanup checks that a lab leaves nothing behind: no namespace, no
// interface, no lock, no process, including one that left its process
// group.
func TestCleanup(t *testing.T) {
	needLab(t)
	if _, err := CleanupStale(); err != nil {
		t.Fatal(err)
	}
	marker := newMarker()
	var id string
	var nss []string
	t.Run("lab", func(t *testing.T) {
		lab := New(t)
		for _, name := range []string{"n1", "n2", "n3"} {
			h := lab.AddHost(name, WithRate(100))
			startMarked(t, h, marker)
		}
		if _, err := exec.LookPath(registryBinary()); err == nil {
			lab.Host("n3").StartRegistry(t)
		}
		id, nss = lab.ID(), lab.Namespaces()
		if len(nss) != 4 {
			t.Fatalf("namespaces %v, want 4", nss)
		}
		waitMarked(t, marker, 6) // each host: sleep and its setsid grandchild
		for _, ns := range nss {
			if !slices.Contains(netnsList(t), ns) {
				t.Errorf("ip netns list lacks %s", ns)
			}
		}
	})
	checkGone(t, id, nss, marker)

	// Close outside a test, twice.
	lab, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	h, err := lab.NewHost("x", WithRate(10))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Stats(); err != nil {
		t.Fatal(err)
	}
	if err := lab.Close(); err != nil {
		t.Fatal(err)
	}
	if err := lab.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := lab.NewHost("y"); err != ErrClosed {
		t.Errorf("NewHost after Close: %v, want ErrClosed", err)
	}
	if err := h.Command(t.Context(), "true").Run(); err != ErrClosed {
		t.Errorf("Command after Close: %v, want ErrClosed", err)
	}
	checkGone(t, lab.ID(), lab.Namespaces(), "")
}

// TestCleanupAfterFailure runs a test that fails (FailNow, a panic) in a
// child process after creating hosts and processes, and checks that its
// cleanup left nothing; and one that is killed outright, whose leftovers
// CleanupStale must remove, while sparing a live lab.
func TestCleanupAfterFailure(t *testing.T) {
	needLab(t)
	if _, err := CleanupStale(); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"failnow", "panic", "kill"} {
		t.Run(mode, func(t *testing.T) {
			var live *Lab
			var liveMarker string
			if mode == "kill" {
				// A live lab with a process, which CleanupStale must spare.
				// Made first: New itself runs CleanupStale.
				live = New(t)
				liveMarker = newMarker()
				startMarked(t, live.AddHost("live"), liveMarker)
				waitMarked(t, liveMarker, 2)
			}
			marker := newMarker()
			out, err := runHelper(t, mode, marker)
			if err == nil {
				t.Fatalf("helper (%s) succeeded; output:\n%s", mode, out)
			}
			m := regexp.MustCompile(`NETLAB_LAB=(\w+) (\S+)`).FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("helper (%s): no lab in its output (%v):\n%s", mode, err, out)
			}
			id, nss := m[1], strings.Split(m[2], ",")
			t.Logf("helper (%s) exited: %v; lab %s", mode, err, id)
			if mode != "kill" {
				if !strings.Contains(out, "netlab: lab "+id+" closed") {
					t.Errorf("helper (%s): no close in its log:\n%s", mode, out)
				}
				checkGone(t, id, nss, marker)
				return
			}

			// Killed: its namespaces stay, and so does the grandchild that
			// escaped Pdeathsig, unless the CleanupStale of another test
			// binary's New got there first.
			left := 0
			for _, ns := range nss {
				if slices.Contains(netnsList(t), ns) {
					left++
				}
			}
			survivors := len(markedPIDs(marker))
			if left < len(nss) {
				t.Logf("another process removed %d of the killed helper's %d namespaces", len(nss)-left, len(nss))
			}
			// Another process's CleanupStale may hold the dead lab's lock,
			// halfway through removing it, in which case this one passes
			// it by: wait for that one to finish.
			var removed []string
			deadline := time.Now().Add(10 * time.Second)
			for {
				r, err := CleanupStale()
				if err != nil {
					t.Fatalf("CleanupStale: %v", err)
				}
				removed = append(removed, r...)
				if _, err := os.Lstat(filepath.Join(netnsDir, nss[0])); err != nil || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			t.Logf("CleanupStale removed %v", removed)
			// It may also have removed the leftovers of other killed test
			// binaries, and fewer of these if another process was cleaning
			// up at the same time; but never a live lab's.
			for _, ns := range removed {
				if id, _ := labID(ns); id == live.ID() {
					t.Errorf("CleanupStale removed the live lab's %s", ns)
				}
			}
			mine := 0
			for _, ns := range removed {
				if slices.Contains(nss, ns) {
					mine++
				}
			}
			// Whoever removes a lab holds its lock from the kill to the
			// deletion, so if this call removed them all, nobody else
			// killed the survivor.
			if mine == len(nss) && survivors == 0 {
				t.Errorf("no process of the killed helper survived: CleanupStale's kill is untested")
			}
			checkGone(t, id, nss, marker)
			for _, ns := range live.Namespaces() {
				if !slices.Contains(netnsList(t), ns) {
					t.Errorf("CleanupStale removed the live lab's %s", ns)
				}
			}
			if n := len(markedPIDs(liveMarker)); n != 2 {
				t.Errorf("CleanupStale killed the live lab's processes: %d left, want 2", n)
			}
		})
	}
}

// TestHelperProcess is the child of TestCleanupAfterFailure.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper for TestCleanupAfterFailure")
	}
	marker := os.Getenv(markerEnv)
	lab := New(t)
	for _, name := range []string{"f1", "f2"} {
		startMarked(t, lab.AddHost(name, WithRate(20)), marker)
	}
	waitMarked(t, marker, 4)
	fmt.Printf("NETLAB_LAB=%s %s\n", lab.ID(), strings.Join(lab.Namespaces(), ","))
	os.Stdout.Sync()
	switch mode {
	case "failnow":
		t.FailNow()
	case "panic":
		panic("netlab test helper panics on purpose")
	case "kill":
		p, _ := os.FindProcess(os.Getpid())
		p.Kill()
		time.Sleep(time.Minute)
	}
}

func runHelper(t *testing.T, mode, marker string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperProcess$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, markerEnv+"="+marker)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// newMarker returns a sleep duration that names the processes of one test:
// a day and a random fraction of a second.
func newMarker() string { return fmt.Sprintf("86400.%09d", rand.IntN(1e9)) }

// startMarked starts, inside h, a sleep and a grandchild sleep that leaves
// the process group with setsid, both marked.
func startMarked(t *testing.T, h *Host, marker string) {
	t.Helper()
	cmd := h.Command(context.Background(), "sh", "-c", `setsid sleep "$1" & exec sleep "$1"`, "sh", marker)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start marked processes on %s: %v", h.Name(), err)
	}
	go cmd.Wait()
}

// markedPIDs returns the processes running sleep with marker, zombies aside.
func markedPIDs(marker string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if len(args) == 2 && filepath.Base(args[0]) == "sleep" && args[1] == marker {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitMarked(t *testing.T, marker string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(markedPIDs(marker)) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d marked processes, want %d", len(markedPIDs(marker)), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkGone checks that lab id left no namespace, interface, lock file or
// marked process.
func checkGone(t *testing.T, id string, nss []string, marker string) {
	t.Helper()
	if id == "" || len(nss) == 0 {
		t.Fatalf("no lab to check (id %q, namespaces %v)", id, nss)
	}
	for _, ns := range netnsList(t) {
		if strings.HasPrefix(ns, NamespacePrefix+id) {
			t.Errorf("namespace %s is left", ns)
		}
	}
	for _, ns := range nss {
		if _, err := os.Lstat(filepath.Join(netnsDir, ns)); err == nil {
			t.Errorf("%s/%s is left", netnsDir, ns)
		}
	}
	for _, name := range ifaceNames(t, "") {
		if strings.HasPrefix(name, IfacePrefix+id) {
			t.Errorf("interface %s is left in the root namespace", name)
		}
	}
	if _, err := os.Lstat(lockPath(id)); err == nil {
		t.Errorf("lock file %s is left", lockPath(id))
	}
	if marker != "" {
		// Killed processes may linger a moment as zombies of their parent.
		deadline := time.Now().Add(5 * time.Second)
		for {
			pids := markedPIDs(marker)
			if len(pids) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("processes %v of the lab are left", pids)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func netnsList(t *testing.T) []string {
	t.Helper()
	var names []string
	for _, line := range strings.Split(ipOut(t, "netns", "list"), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

// ifaceNames lists the interfaces of namespace ns ("" for the test's own).
func ifaceNames(t *testing.T, ns string) []string {
	t.Helper()
	args := []string{"-o", "link", "show"}
	if ns != "" {
		args = append([]string{"-n", ns}, args...)
	}
	var names []string
	for _, line := range strings.Split(ipOut(t, args...), "\n") {
		// "3: name@peer: <FLAGS> ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		names = append(names, name)
	}
	return names
}

func ipOut(t *testing.T, args ...string) string { t.Helper(); return toolOut(t, "ip", args...) }
func tcOut(t *testing.T, args ...string) string { t.Helper(); return toolOut(t, "tc", args...) }

func toolOut(t *testing.T, tool string, args ...string) string {
	t.Helper()
	path, err := lookPath(tool)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(path, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// randomBytes returns n incompressible bytes.
func randomBytes(n int, seed uint64) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed)})
	b := make([]byte, n)
	r.Read(b)
	return b
}
