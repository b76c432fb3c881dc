package daemon

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/shoal-project/shoal/internal/testenv"
)

// TestStatusPageHidesPrivateImages mounts a private and a public image and
// loads everything the TCP port serves without authentication (the page
// and its files, as served and as Chromium renders them, /api/status,
// /metrics): the public image is named, the private one only as "private
// image" and a tag, with nothing of its repository, tag, digest or mount
// directory, also in a background prefetch's entry. The unix socket's
// status (root) names both.
func TestStatusPageHidesPrivateImages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		testenv.SkipOrFatal(t, "status page test: no chromium (apt-get install chromium): %v", err)
	}
	// One registry, two doors: the private image behind basic auth (the
	// daemon holds the account), the public one open to all.
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)
	locked := httptest.NewServer(testenv.BasicAuth(reg, "payroll", "s3cret", nil))
	t.Cleanup(locked.Close)
	host, lockedHost := strings.TrimPrefix(srv.URL, "http://"), strings.TrimPrefix(locked.URL, "http://")
	private := pushAndConvertFileAs(t, lockedHost+"/secret-team/payroll:v7", "data/file", []byte(strings.Repeat("private ", 10000)),
		&authn.Basic{Username: "payroll", Password: "s3cret"})
	public := pushAndConvertFile(t, host+"/library/tools:v1", "data/file", []byte(strings.Repeat("public ", 10000)))

	addr := freeAddr(t)
	d, c := startDaemon(t, Config{StateDir: t.TempDir(), MetricsAddr: addr,
		Registry: RegistryConfig{DockerConfig: dockerConfig(t, lockedHost, "payroll", "s3cret")}})
	privDir := filepath.Join(t.TempDir(), "payroll-mnt")
	for ref, dir := range map[string]string{private: privDir, public: filepath.Join(t.TempDir(), "tools-mnt")} {
		if _, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: dir}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.ReadFile(filepath.Join(dir, "data/file")); err != nil {
			t.Fatal(err)
		}
	}
	// Background prefetches of the private image: one whose image was
	// resolved as private and failed (its error names the repository),
	// one not resolved yet.
	d.jobs.mu.Lock()
	d.jobs.byRef[private] = &Job{Ref: private, KeepWarm: true, Started: time.Now(), Private: true, resolved: true,
		Error: "prefetch " + private + ": GET http://" + host + "/v2/secret-team/payroll/blobs/x: 500"}
	d.jobs.byRef[host+"/secret-team/payroll:v8"] = &Job{Ref: host + "/secret-team/payroll:v8", Started: time.Now()}
	d.jobs.mu.Unlock()

	// Root, on the socket, sees everything: the references to hide.
	st, err := c.Status(t.Context())
	if err != nil || len(st.Mounts) != 2 {
		t.Fatalf("socket status: %d mounts, %v", len(st.Mounts), err)
	}
	secrets := []string{"payroll", "secret-team", privDir}
	var shown string
	for _, m := range st.Mounts {
		if m.Source != private {
			shown = m.Source
			continue
		}
		if !m.Private || m.Dir != privDir {
			t.Fatalf("socket status of the private mount: private %v, dir %s", m.Private, m.Dir)
		}
		_, digest, _ := strings.Cut(m.Ref, "@sha256:")
		secrets = append(secrets, m.Ref, digest)
	}
	if shown != public {
		t.Fatalf("socket status names %q, want the public image %s", shown, public)
	}

	check := func(what, body string) {
		t.Helper()
		for _, s := range secrets {
			if strings.Contains(body, s) {
				t.Errorf("%s shows %q of the private image", what, s)
			}
		}
	}
	get := func(path string) string {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s, %v", path, resp.Status, err)
		}
		return string(b)
	}
	for _, p := range []string{"/", "/app.js", "/style.css", "/api/status", "/metrics"} {
		check("GET "+p, get(p))
	}
	ps := pageStatusOf(t, addr)
	var privateLabel string
	for _, m := range ps.Mounts {
		if m.Private {
			privateLabel = m.Source
		}
	}
	if !strings.HasPrefix(privateLabel, "private image ") || len(privateLabel) != len("private image ")+8 {
		t.Errorf("api/status labels the private mount %q, want \"private image\" and an 8-digit tag", privateLabel)
	}
	if len(ps.Jobs) != 2 {
		t.Errorf("api/status lists %d jobs, want 2", len(ps.Jobs))
	}
	if !strings.Contains(get("/metrics"), "shoal_mounts 2") {
		t.Error("metrics do not count both mounts")
	}

	dom := loadPage(t, chromium, addr)
	page := dom.text()
	check("the rendered page", page)
	for _, n := range dom.all(func(*domNode) bool { return true }) {
		for _, a := range n.Attr {
			check("attribute "+a.Key+" of the rendered page", a.Val)
		}
	}
	if !strings.Contains(page, public) || !strings.Contains(page, privateLabel) {
		t.Errorf("the rendered page does not name the public image %s and the private one as %q: %s", public, privateLabel, page)
	}
}

func TestPublicNames(t *testing.T) {
	t.Parallel()
	a, b := newPublicNames(), newPublicNames()
	const ref = "registry.example/team/app:v1"
	if tag := a.tag(ref); a.tag(ref) != tag || len(tag) != 8 || tag == a.tag(ref+"x") {
		t.Error("a daemon's tag is not a function of the reference")
	}
	if a.tag(ref) == b.tag(ref) {
		t.Error("two daemons give the same tag: their pages could be linked")
	}
	pub := MountInfo{Source: ref, Ref: ref + "-shoal@sha256:ab", Dir: "/mnt/app", Env: []string{"TOKEN=x"}}
	if got := a.mount(pub); got.Source != ref || got.Dir != "/mnt/app" || got.Env != nil {
		t.Errorf("public mount shown as %+v: want its names, no environment", got)
	}
	for _, c := range []struct {
		name  string
		job   Job
		shown bool
	}{
		{"resolved public", Job{Ref: ref, resolved: true, Error: "x"}, true},
		{"resolved private", Job{Ref: ref, resolved: true, Private: true, Error: "x " + ref}, false},
		{"not resolved", Job{Ref: ref, Error: "resolve " + ref + ": denied"}, false},
	} {
		got := a.job(c.job)
		if shown := got.Ref == ref && got.Error == c.job.Error; shown != c.shown {
			t.Errorf("%s job shown as %+v", c.name, got)
		}
		if !c.shown && (strings.Contains(got.Ref, "team") || strings.Contains(got.Error, "team")) {
			t.Errorf("%s job shows its reference: %+v", c.name, got)
		}
	}
}
