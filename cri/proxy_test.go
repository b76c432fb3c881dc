package cri

import (
	"context"
	"encoding/base64"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// fakeRuntime is a CRI image service that records the pulls it is asked
// for and fails those of images named "deny".
type fakeRuntime struct {
	runtimeapi.UnimplementedImageServiceServer
	mu    sync.Mutex
	pulls []*runtimeapi.PullImageRequest
	calls []string
}

func (f *fakeRuntime) note(call string) {
	f.mu.Lock()
	f.calls = append(f.calls, call)
	f.mu.Unlock()
}

func (f *fakeRuntime) PullImage(_ context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	f.mu.Lock()
	f.pulls = append(f.pulls, req)
	f.mu.Unlock()
	if strings.Contains(req.GetImage().GetImage(), "deny") {
		return nil, status.Error(codes.Unknown, "401 Unauthorized")
	}
	return &runtimeapi.PullImageResponse{ImageRef: "sha256:abc"}, nil
}

func (f *fakeRuntime) ListImages(context.Context, *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	f.note("ListImages")
	return &runtimeapi.ListImagesResponse{Images: []*runtimeapi.Image{{Id: "sha256:abc"}}}, nil
}

func (f *fakeRuntime) ImageStatus(context.Context, *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	f.note("ImageStatus")
	return &runtimeapi.ImageStatusResponse{Image: &runtimeapi.Image{Id: "sha256:abc"}}, nil
}

func (f *fakeRuntime) RemoveImage(context.Context, *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	f.note("RemoveImage")
	return &runtimeapi.RemoveImageResponse{}, nil
}

func (f *fakeRuntime) ImageFsInfo(context.Context, *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	f.note("ImageFsInfo")
	return &runtimeapi.ImageFsInfoResponse{}, nil
}

// startProxy serves a fake runtime and a proxy to it on unix sockets and
// returns a client of the proxy.
func startProxy(t *testing.T) (runtimeapi.ImageServiceClient, *fakeRuntime, *Credentials) {
	t.Helper()
	dir, err := os.MkdirTemp("", "cri")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	rt := &fakeRuntime{}
	rln, err := net.Listen("unix", filepath.Join(dir, "rt.sock"))
	if err != nil {
		t.Fatal(err)
	}
	rsrv := grpc.NewServer()
	runtimeapi.RegisterImageServiceServer(rsrv, rt)
	go rsrv.Serve(rln)
	t.Cleanup(rsrv.Stop)

	conn, err := DialRuntime("unix://" + filepath.Join(dir, "rt.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	creds := NewCredentials(0, 0)
	pln, err := net.Listen("unix", filepath.Join(dir, "proxy.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, NewProxy(conn, creds, slog.New(slog.DiscardHandler)), pln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	cc, err := DialRuntime(filepath.Join(dir, "proxy.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return runtimeapi.NewImageServiceClient(cc), rt, creds
}

// basicOf resolves repo in kc and returns its user:password ("" when
// anonymous).
func basicOf(t *testing.T, kc authn.Keychain, repo string) string {
	t.Helper()
	r, err := name.NewRepository(repo)
	if err != nil {
		t.Fatal(err)
	}
	a, err := kc.Resolve(r)
	if err != nil {
		t.Fatal(err)
	}
	if a == authn.Anonymous {
		return ""
	}
	cfg, err := a.Authorization()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RegistryToken != "" {
		return "token:" + cfg.RegistryToken
	}
	return cfg.Username + ":" + cfg.Password
}

func pull(image string, auth *runtimeapi.AuthConfig) *runtimeapi.PullImageRequest {
	return &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: image}, Auth: auth}
}

// TestProxyRecordsPullCredentials: each pull's credentials are kept for
// its repository, replaced by the next pull's (anonymous too), and the
// request reaches the runtime unchanged.
func TestProxyRecordsPullCredentials(t *testing.T) {
	t.Parallel()
	c, rt, creds := startProxy(t)
	ctx := t.Context()
	kc := creds.Keychain()
	b64 := base64.StdEncoding.EncodeToString([]byte("bob:s3cret"))
	for _, tc := range []struct {
		name  string
		image string
		auth  *runtimeapi.AuthConfig
		repo  string
		want  string
	}{
		{"username and password", "reg.test:5000/team/app:v1", &runtimeapi.AuthConfig{Username: "alice", Password: "pw"}, "reg.test:5000/team/app", "alice:pw"},
		{"another repository is not lent them", "reg.test:5000/team/app:v1", &runtimeapi.AuthConfig{Username: "alice", Password: "pw"}, "reg.test:5000/team/other", ""},
		{"auth field", "reg.test:5000/team/app:v2", &runtimeapi.AuthConfig{Auth: b64}, "reg.test:5000/team/app", "bob:s3cret"},
		{"a later anonymous pull replaces them", "reg.test:5000/team/app@sha256:" + strings.Repeat("a", 64), nil, "reg.test:5000/team/app", ""},
		{"server address of the registry", "reg.test:5000/team/app:v1", &runtimeapi.AuthConfig{Username: "carol", Password: "pw", ServerAddress: "https://reg.test:5000/v1/"}, "reg.test:5000/team/app", "carol:pw"},
		{"server address of another registry", "reg.test:5000/team/app:v1", &runtimeapi.AuthConfig{Username: "carol", Password: "pw", ServerAddress: "other.test"}, "reg.test:5000/team/app", ""},
		{"docker hub's names", "debian:12", &runtimeapi.AuthConfig{Username: "dan", Password: "pw", ServerAddress: "https://index.docker.io/v1/"}, "docker.io/library/debian", "dan:pw"},
		{"registry token", "reg.test:5000/team/app:v1", &runtimeapi.AuthConfig{RegistryToken: "tok"}, "reg.test:5000/team/app", "token:tok"},
	} {
		if _, err := c.PullImage(ctx, pull(tc.image, tc.auth)); err != nil {
			t.Fatalf("%s: pull: %v", tc.name, err)
		}
		if got := basicOf(t, kc, tc.repo); got != tc.want {
			t.Errorf("%s: credentials for %s = %q, want %q", tc.name, tc.repo, got, tc.want)
		}
		rt.mu.Lock()
		last := rt.pulls[len(rt.pulls)-1]
		rt.mu.Unlock()
		if last.GetImage().GetImage() != tc.image || last.GetAuth().GetUsername() != tc.auth.GetUsername() ||
			last.GetAuth().GetServerAddress() != tc.auth.GetServerAddress() || last.GetAuth().GetAuth() != tc.auth.GetAuth() {
			t.Errorf("%s: the runtime got %v, want the request unchanged", tc.name, last)
		}
	}
	// A registry alone is never given a repository's credentials.
	reg, _ := name.NewRegistry("reg.test:5000")
	if a, err := kc.Resolve(reg); err != nil || a != authn.Anonymous {
		t.Errorf("a registry resolved to %v, %v; want anonymous", a, err)
	}
	// A pull the runtime refuses is refused with the runtime's code, and
	// the credentials it carried stay recorded (the latest pull's).
	_, err := c.PullImage(ctx, pull("reg.test:5000/deny:v1", &runtimeapi.AuthConfig{Username: "eve", Password: "wrong"}))
	if status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "401") {
		t.Errorf("refused pull: %v", err)
	}
	if got := basicOf(t, kc, "reg.test:5000/deny"); got != "eve:wrong" {
		t.Errorf("after a refused pull: %q", got)
	}
	// Every other call goes through.
	if _, err := c.ListImages(ctx, &runtimeapi.ListImagesRequest{}); err != nil {
		t.Error(err)
	}
	if _, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: "x"}}); err != nil {
		t.Error(err)
	}
	if _, err := c.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: "x"}}); err != nil {
		t.Error(err)
	}
	if _, err := c.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{}); err != nil {
		t.Error(err)
	}
	rt.mu.Lock()
	calls := strings.Join(rt.calls, ",")
	rt.mu.Unlock()
	if calls != "ListImages,ImageStatus,RemoveImage,ImageFsInfo" {
		t.Errorf("the runtime saw %s", calls)
	}
	// A runtime without StreamImages answers Unimplemented through the proxy.
	s, err := c.StreamImages(ctx, &runtimeapi.StreamImagesRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("StreamImages: %v, want Unimplemented", err)
	}
}

// TestProxyRefusesHostileInput: a reference or credentials the proxy cannot
// read are refused before anything is kept or sent to the runtime.
func TestProxyRefusesHostileInput(t *testing.T) {
	t.Parallel()
	c, rt, creds := startProxy(t)
	for _, tc := range []struct {
		name  string
		image string
		auth  *runtimeapi.AuthConfig
	}{
		{"bad reference", "reg.test:5000/UPPER/../x:v1", nil},
		{"empty reference", "", nil},
		{"auth not base64", "reg.test/app:v1", &runtimeapi.AuthConfig{Auth: "%%%"}},
		{"auth without a colon", "reg.test/app:v1", &runtimeapi.AuthConfig{Auth: base64.StdEncoding.EncodeToString([]byte("nocolon"))}},
		{"huge password", "reg.test/app:v1", &runtimeapi.AuthConfig{Username: "u", Password: strings.Repeat("p", MaxCredentialBytes+1)}},
		{"bad server address", "reg.test/app:v1", &runtimeapi.AuthConfig{Username: "u", ServerAddress: "https://"}},
	} {
		_, err := c.PullImage(t.Context(), pull(tc.image, tc.auth))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", tc.name, err)
		}
	}
	// A request over the proxy's size limit is refused by gRPC itself.
	_, err := c.PullImage(t.Context(), pull("reg.test/app:v1", &runtimeapi.AuthConfig{Password: strings.Repeat("p", maxRequestBytes)}))
	if err == nil {
		t.Error("a request over the size limit went through")
	}
	rt.mu.Lock()
	n := len(rt.pulls)
	rt.mu.Unlock()
	if n != 0 || creds.Len() != 0 {
		t.Errorf("refused pulls reached the runtime %d times and left %d entries", n, creds.Len())
	}
}

// TestCredentialsBounded: the store keeps at most max repositories,
// dropping the oldest, and forgets credentials ttl after their pull.
func TestCredentialsBounded(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_000_000, 0)
	c := NewCredentials(3, time.Hour)
	c.now = func() time.Time { return now }
	kc := c.Keychain()
	for i, repo := range []string{"a", "b", "c", "d"} {
		now = now.Add(time.Minute)
		if _, err := c.Record("reg.test/"+repo+":v1", &runtimeapi.AuthConfig{Username: repo, Password: "pw"}); err != nil {
			t.Fatal(err)
		}
		if c.Len() != min(i+1, 3) {
			t.Errorf("after %d pulls the store holds %d", i+1, c.Len())
		}
	}
	if got := basicOf(t, kc, "reg.test/a"); got != "" {
		t.Errorf("the oldest repository kept %q", got)
	}
	if got := basicOf(t, kc, "reg.test/d"); got != "d:pw" {
		t.Errorf("the newest: %q", got)
	}
	now = now.Add(time.Hour + time.Second - 2*time.Minute) // b (the oldest kept) is past its hour, d is not
	if got := basicOf(t, kc, "reg.test/b"); got != "" {
		t.Errorf("expired credentials were used: %q", got)
	}
	if got := basicOf(t, kc, "reg.test/d"); got != "d:pw" {
		t.Errorf("unexpired: %q", got)
	}
}
