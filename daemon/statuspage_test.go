package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/html"

	"github.com/shoal-project/shoal/internal/testenv"
)

func TestSeriesRing(t *testing.T) {
	t.Parallel()
	s := newSeries(3)
	if got := s.samples(); len(got) != 0 {
		t.Fatalf("empty ring holds %v", got)
	}
	for i := int64(1); i <= 5; i++ {
		s.add(Sample{T: i})
		want := []int64{}
		for j := max(1, i-2); j <= i; j++ {
			want = append(want, j)
		}
		var got []int64
		for _, x := range s.samples() {
			got = append(got, x.T)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("after %d adds: %v, want %v (oldest first)", i, got, want)
		}
	}
}

// TestStatusPage runs two daemons with status pages, makes real traffic
// (node A reads an image from the real docker-registry, then again from
// its cache; node B reads it from A), loads each page in headless Chromium
// and checks that the page shows what the daemon reports: bytes by source,
// cache use, uploads, the image and the peer, and charts with lines.
func TestStatusPage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		testenv.SkipOrFatal(t, "status page test: no chromium (apt-get install chromium): %v", err)
	}
	reg := testenv.StartRegistry(t)
	body := make([]byte, 3<<20)
	_, _ = rand.NewChaCha8([32]byte{3}).Read(body)
	ref := pushAndConvertFile(t, reg.Ref("page:v1"), "data/file", body)

	addrA, addrB := freeAddr(t), freeAddr(t)
	da, ca := startDaemon(t, Config{StateDir: t.TempDir(), MetricsAddr: addrA, Labels: map[string]string{"zone": "z1"}})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	db, cb := startDaemon(t, Config{StateDir: t.TempDir(), MetricsAddr: addrB, P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})
	sb, err := cb.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// read mounts the image through c and reads n bytes of the file.
	read := func(c *Client, n int) {
		t.Helper()
		mnt := filepath.Join(t.TempDir(), "mnt")
		if _, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt}); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(filepath.Join(mnt, "data/file"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, n)
		if _, err := io.ReadFull(f, b); err != nil || !bytes.Equal(b, body[:n]) {
			t.Fatalf("read %d bytes through the mount: %v", n, err)
		}
	}
	// A reads the file's first block from the registry, then the whole
	// file through a second mount: that block from its cache, the rest
	// from the registry. (Had the first read fetched every block, the file
	// would be passed through to the kernel and show no cache reads.)
	read(ca, 64<<10)
	read(ca, len(body))
	// B's mount reads from A once its lookup finds A's record (A's bitmap
	// comes with the have session, whole).
	waitProvider(t, db, da, flatImage(t, ref))
	read(cb, len(body)) // from A
	pb := pageStatusOf(t, addrB)
	if pb.Bytes.Peers == 0 || len(pb.Peers) == 0 {
		t.Fatalf("B did not read from A: bytes %+v, peers %+v", pb.Bytes, pb.Peers)
	}

	pa := pageStatusOf(t, addrA)
	if pa.Bytes.Registry == 0 || pa.Bytes.Cache == 0 || pa.Swarm == nil || pa.Swarm.BytesUploaded == 0 || len(pa.Mounts) != 2 {
		t.Fatalf("A did not read from the registry and its cache and upload to B: bytes %+v, swarm %+v, %d mounts", pa.Bytes, pa.Swarm, len(pa.Mounts))
	}
	// The page's bytes by source are the mounts' own counters, summed.
	var fromRegistry, fromCache int64
	for _, m := range pa.Mounts {
		fromRegistry += m.Fetch.BytesFromRegistry
		fromCache += m.Fetch.BytesFromCache
	}
	if pa.Bytes.Registry != fromRegistry || pa.Bytes.Cache != fromCache {
		t.Errorf("api/status bytes %+v, the mounts say registry %d, cache %d", pa.Bytes, fromRegistry, fromCache)
	}
	domA := loadPage(t, chromium, addrA)
	if now := pageStatusOf(t, addrA); now.Bytes != pa.Bytes || now.Cache.Bytes != pa.Cache.Bytes || now.Swarm.BytesUploaded != pa.Swarm.BytesUploaded {
		t.Fatalf("A's counters moved while the page loaded: %+v then %+v", pa, now)
	}
	checkPage(t, "A", domA, pa)
	// A uploaded to B alone: B's row shows all of it (and the frames).
	if row := domA.find(attrIs("data-peer", sb.PeerID)); row == nil {
		t.Errorf("A's page does not list peer B %s", sb.PeerID)
	} else if cells := row.all(tagIs("td")); len(cells) < 6 {
		t.Errorf("A's row for B: %q", row.text())
	} else if sent, _ := strconv.ParseInt(cells[5].attr("data-value"), 10, 64); sent < pa.Swarm.BytesUploaded || shows(cells[5].text(), sent) != nil {
		t.Errorf("A's row for B shows %q (%d bytes) uploaded, A uploaded %d block bytes", cells[5].text(), sent, pa.Swarm.BytesUploaded)
	}
	domB := loadPage(t, chromium, addrB)
	checkPage(t, "B", domB, pb)
	row := domB.find(attrIs("data-peer", sa.PeerID))
	if row == nil {
		t.Fatalf("B's page does not list peer A %s", sa.PeerID)
	}
	cells := row.all(tagIs("td"))
	if len(cells) < 5 || cells[1].text() != "z1" || cells[4].text() == "0" {
		t.Errorf("B's row for A: zone and blocks received wrong: %q", row.text())
	}
}

// TestStatusPageSwarmOff: a daemon with no swarm and nothing mounted
// still gets a page that says so, rather than a script error.
func TestStatusPageSwarmOff(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		testenv.SkipOrFatal(t, "status page test: no chromium (apt-get install chromium): %v", err)
	}
	addr := freeAddr(t)
	d, err := New(Config{StateDir: t.TempDir(), MetricsAddr: addr, P2P: P2PConfig{Disabled: true}, Snapshotter: SnapshotterConfig{Disabled: true}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon exit: %v", err)
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if resp, err := http.Get("http://" + addr + "/api/status"); err == nil {
			resp.Body.Close()
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no status page: %v", err)
		}
	}
	dom := loadPage(t, chromium, addr)
	if b := dom.find(tagIs("body")); b.attr("data-state") != "live" {
		t.Fatalf("the page did not render a status (body data-state %q)", b.attr("data-state"))
	}
	for id, want := range map[string]string{"uploaded": "swarm off", "peer-id": "(swarm off)", "bytes-registry": "0 B", "mount-count": "0"} {
		if got := dom.find(attrIs("id", id)).text(); got != want {
			t.Errorf("#%s shows %q, want %q", id, got, want)
		}
	}
	for table, want := range map[string]string{"images": "no images mounted", "peers": "the swarm is off"} {
		if got := dom.find(attrIs("id", table)).text(); !strings.Contains(got, want) {
			t.Errorf("table %s reads %q, want %q", table, got, want)
		}
	}
}

// checkPage compares what the page shows with st, taken from api/status
// when the page loaded.
func checkPage(t *testing.T, name string, dom *domNode, st PageStatus) {
	t.Helper()
	if b := dom.find(tagIs("body")); b == nil || b.attr("data-state") != "live" {
		t.Errorf("%s: the page did not render a status (body data-state %q)", name, b.attr("data-state"))
	}
	for id, want := range map[string]int64{
		"bytes-cache": st.Bytes.Cache, "bytes-peers": st.Bytes.Peers, "bytes-registry": st.Bytes.Registry,
		"cache-used": st.Cache.Bytes, "uploaded": st.Swarm.BytesUploaded,
	} {
		e := dom.find(attrIs("id", id))
		if e == nil {
			t.Errorf("%s: no #%s", name, id)
			continue
		}
		if got := e.attr("data-value"); got != strconv.FormatInt(want, 10) {
			t.Errorf("%s: #%s holds %s bytes, the daemon reports %d", name, id, got, want)
		}
		if err := shows(e.text(), want); err != nil {
			t.Errorf("%s: #%s: %v", name, id, err)
		}
	}
	if got, want := dom.find(attrIs("id", "peer-id")).text(), st.PeerID; got != want {
		t.Errorf("%s: peer id %q, want %q", name, got, want)
	}
	rows := dom.all(attrIs("data-ref", ""))
	if len(rows) != len(st.Mounts) {
		t.Errorf("%s: %d image rows, %d mounts", name, len(rows), len(st.Mounts))
	}
	for _, r := range rows {
		if r.attr("data-ref") != st.Mounts[0].Source || !strings.Contains(r.text(), st.Mounts[0].Source) {
			t.Errorf("%s: image row %q, want %s", name, r.text(), st.Mounts[0].Source)
		}
	}
	// Every chart has a line with points; the bytes charts one per source.
	for _, chart := range []string{"chart-rate", "chart-total", "chart-cache", "chart-upload"} {
		c := dom.find(attrIs("id", chart))
		if c == nil {
			t.Errorf("%s: no #%s", name, chart)
			continue
		}
		lines := c.all(func(n *domNode) bool { return n.Data == "path" && strings.Contains(n.attr("class"), "line") })
		if want := map[bool]int{true: 3, false: 1}[chart == "chart-rate" || chart == "chart-total"]; len(lines) != want {
			t.Errorf("%s: #%s has %d lines, want %d", name, chart, len(lines), want)
		}
		for _, l := range lines {
			if d := l.attr("d"); !strings.HasPrefix(d, "M") || strings.Count(d, "L") < 1 || strings.Contains(d, "NaN") {
				t.Errorf("%s: #%s line %q: %q", name, chart, l.attr("class"), d)
			}
		}
	}
}

// shows checks that text ("1.25 MB") is bytes as the page rounds it: the
// same number to within half of its last shown digit.
func shows(text string, bytes int64) error {
	num, unit, ok := strings.Cut(strings.TrimSpace(text), " ")
	v, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil {
		return fmt.Errorf("%q is not a number and a unit", text)
	}
	scale := map[string]float64{"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
	if scale == 0 {
		return fmt.Errorf("%q: unknown unit", text)
	}
	digits := 0
	if _, frac, ok := strings.Cut(num, "."); ok {
		digits = len(frac)
	}
	if tol := 0.5 * math.Pow(10, -float64(digits)) * scale; math.Abs(v*scale-float64(bytes)) > tol*1.0001 {
		return fmt.Errorf("shows %q for %d bytes", text, bytes)
	}
	return nil
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func pageStatusOf(t *testing.T, addr string) PageStatus {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/api/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ps PageStatus
	if err := json.NewDecoder(resp.Body).Decode(&ps); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("api/status: %s, %v", resp.Status, err)
	}
	return ps
}

// loadPage loads the status page in headless Chromium, lets its script
// poll and draw, and returns the DOM. Chromium may talk to nothing but the
// daemon: no background services, and every host name but 127.0.0.1
// fails to resolve.
func loadPage(t *testing.T, chromium, addr string) *domNode {
	t.Helper()
	home := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--user-data-dir="+filepath.Join(home, "profile"), "--no-first-run", "--no-default-browser-check",
		"--disable-background-networking", "--disable-component-update", "--disable-default-apps",
		"--disable-extensions", "--disable-sync", "--disable-breakpad", "--disable-domain-reliability",
		"--disable-client-side-phishing-detection", "--metrics-recording-only", "--safebrowsing-disable-auto-update",
		"--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,CertificateTransparencyComponentUpdater",
		"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
		"--virtual-time-budget=5000", "--dump-dom", "http://"+addr+"/")
	cmd.Env = append(os.Environ(), "HOME="+home)
	// Chromium forks helpers: run it in a process group of its own and
	// kill the whole group, on timeout and after it exits.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		testenv.SkipOrFatal(t, "status page test: cannot run chromium: %v", err)
	}
	pgid := cmd.Process.Pid
	t.Cleanup(func() { _ = syscall.Kill(-pgid, syscall.SIGKILL) })
	err := cmd.Wait()
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	if err != nil || !strings.Contains(stdout.String(), "</html>") {
		t.Fatalf("chromium: %v\nstderr: %s", err, tail(stderr.String(), 2000))
	}
	doc, err := html.Parse(&stdout)
	if err != nil {
		t.Fatal(err)
	}
	return (*domNode)(doc)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// domNode is an html.Node with the few look-ups the test needs.
type domNode html.Node

func (n *domNode) attr(key string) string {
	if n == nil {
		return ""
	}
	for _, a := range n.Attr {
		if a.Key == key {
			return a.Val
		}
	}
	return ""
}

func (n *domNode) text() string {
	if n == nil {
		return ""
	}
	var b strings.Builder
	var walk func(*html.Node)
	walk = func(h *html.Node) {
		if h.Type == html.TextNode {
			b.WriteString(h.Data)
		}
		for c := h.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk((*html.Node)(n))
	return strings.TrimSpace(b.String())
}

func (n *domNode) all(match func(*domNode) bool) []*domNode {
	var out []*domNode
	var walk func(*html.Node)
	walk = func(h *html.Node) {
		if h.Type == html.ElementNode && match((*domNode)(h)) {
			out = append(out, (*domNode)(h))
		}
		for c := h.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk((*html.Node)(n))
	return out
}

func (n *domNode) find(match func(*domNode) bool) *domNode {
	if all := n.all(match); len(all) > 0 {
		return all[0]
	}
	return nil
}

func tagIs(tag string) func(*domNode) bool { return func(n *domNode) bool { return n.Data == tag } }

// attrIs matches elements whose attribute key is val, or has any value
// when val is "".
func attrIs(key, val string) func(*domNode) bool {
	return func(n *domNode) bool {
		for _, a := range n.Attr {
			if a.Key == key && (val == "" || a.Val == val) {
				return true
			}
		}
		return false
	}
}
