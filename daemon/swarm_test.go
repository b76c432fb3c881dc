package daemon

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/p2p"
)

// startDaemon runs a daemon with p2p on loopback until the test ends.
// daemons numbers the daemons a test binary starts, for their logs.
var daemons atomic.Int32

func startDaemon(t *testing.T, cfg Config) (*Daemon, *Client) {
	t.Helper()
	d, c, _ := startStoppableDaemon(t, cfg)
	return d, c
}

// startStoppableDaemon is startDaemon with a stop function, which ends the
// daemon and waits for it (at most once; the test's cleanup calls it too).
// A config with P2P.Listen set keeps it (a restart on the same address).
func startStoppableDaemon(t *testing.T, cfg Config) (*Daemon, *Client, func()) {
	t.Helper()
	cfg.PlainHTTP = true
	if len(cfg.P2P.Listen) == 0 {
		cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	}
	d, err := New(cfg, testenv.Logger(t, fmt.Sprintf("daemon %d", daemons.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon exit: %v", err)
		}
	})
	t.Cleanup(stop)
	for deadline := time.Now().Add(20 * time.Second); ; {
		c, err := Dial(t.Context(), SocketPath(cfg.StateDir))
		if err == nil {
			return d, c, stop
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPeersServeBlocks: node B reads a file after node A read it: every
// block comes from A, none from the registry — even once the registry is
// down.
func TestPeersServeBlocks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	// The real registry (Debian's docker-registry), behind a proxy that
	// counts what it serves.
	reg := testenv.StartRegistry(t)
	proxy := reg.Proxy(t)
	blobBytes := func() int64 {
		var n int64
		for _, r := range proxy.Requests() {
			if strings.Contains(r.Path, "/blobs/") && r.Range != "" {
				n += r.Bytes
			}
		}
		return n
	}
	ref := pushAndConvert(t, proxy.Host)

	da, ca := startDaemon(t, Config{StateDir: t.TempDir()})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	db, cb := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})

	read := func(c *Client, name string) MountInfo {
		t.Helper()
		mnt := filepath.Join(t.TempDir(), name)
		mi, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
		if err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || len(b) != 600000 {
			t.Fatalf("%s: read %d bytes, %v", name, len(b), err)
		}
		fin, err := c.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
		if err != nil {
			t.Fatal(err)
		}
		return fin
	}
	a := read(ca, "a")
	if a.Fetch.BytesFromRegistry == 0 {
		t.Fatalf("A did not fetch from the registry: %+v", a.Fetch)
	}
	fr, _ := name.ParseReference(ref+"-shoal", name.Insecure)
	fm, err := remote.Get(fr)
	if err != nil {
		t.Fatal(err)
	}
	image := fm.Digest.String() // the image's name in the swarm
	// B's mount reads from A once its lookup finds A's record (A's bitmap
	// comes with the have session, whole).
	waitProvider(t, db, da, image)
	before := blobBytes()
	var flatManifest struct{ Layers []struct{ Digest string } }
	if err := json.Unmarshal(fm.Manifest, &flatManifest); err != nil || len(flatManifest.Layers) == 0 {
		t.Fatalf("flat manifest: %v", err)
	}
	wholeBlobs := func() (n int) { // GETs of the index blob
		for _, r := range proxy.Requests() {
			if strings.HasSuffix(r.Path, "/blobs/"+flatManifest.Layers[0].Digest) && r.Method == http.MethodGet {
				n++
			}
		}
		return n
	}
	indexGets := wholeBlobs() // A's index download
	b := read(cb, "b")
	if b.Fetch.BytesFromPeers == 0 || b.Fetch.BytesFromRegistry != 0 || blobBytes() != before {
		t.Errorf("B: peers %d bytes, registry %d bytes (blob bytes served %d), want everything from A",
			b.Fetch.BytesFromPeers, b.Fetch.BytesFromRegistry, blobBytes()-before)
	}
	// B had the index from A too: the registry served B the manifest only.
	if sb, _ := cb.Status(t.Context()); sb.Swarm == nil || sb.Swarm.IndexesFetched != 1 || wholeBlobs() != indexGets {
		t.Errorf("B's index: %d from peers, registry blob GETs %d → %d; want it from A", sb.Swarm.IndexesFetched, indexGets, wholeBlobs())
	}

	// With the registry down, a third node that had mounted the image before
	// still reads it from the swarm.
	dc, cc := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})
	mnt := filepath.Join(t.TempDir(), "c")
	mi, err := cc.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
	if err != nil {
		t.Fatal(err)
	}
	// C has a holder of every block once it has A's bitmap (A read the
	// whole image).
	waitImagePeer(t, dc, da, image)
	reg.Stop()
	if got, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || len(got) != 600000 {
		t.Fatalf("with the registry down: %d bytes, %v", len(got), err)
	}
	fin, err := cc.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
	if err != nil || fin.Fetch.BytesFromPeers == 0 || fin.Fetch.BytesFromRegistry != 0 {
		t.Errorf("C: %+v, %v", fin.Fetch, err)
	}
	st, _ := ca.Status(t.Context())
	if st.Swarm == nil || st.Swarm.BytesUploaded == 0 {
		t.Errorf("A uploaded nothing: %+v", st.Swarm)
	}
}

// swarmWait bounds the polls for what a mount needs of the swarm: a
// provider lookup (p2p bounds one at 10 s) and the have session that
// follows it (bitmaps are waited for up to FirstByteTimeout, 2 s by
// default), with room for a loaded machine. On loopback both take
// milliseconds; the bound only ends a failing test.
const swarmWait = 2 * (10*time.Second + 2*time.Second)

// waitProvider polls until from's swarm finds holder as a provider of
// image (a swarm name: a public image's manifest digest): from's next
// mount of the image then opens a have session with holder, whose hello
// carries holder's whole bitmap.
func waitProvider(t *testing.T, from, holder *Daemon, image string) {
	t.Helper()
	key, err := p2p.ImageKey(image)
	if err != nil {
		t.Fatal(err)
	}
	want := holder.swarm.ID()
	for deadline := time.Now().Add(swarmWait); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(t.Context(), time.Until(deadline))
		provs, err := from.swarm.FindProviders(ctx, key, 16)
		cancel()
		if slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == want }) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not find %s as a provider of %s after %v (last lookup: %d providers, %v)", from.swarm.ID(), want, image, swarmWait, len(provs), err)
		}
	}
}

// waitImagePeer polls until from's swarm has a have session with holder
// for image, and so holder's bitmap.
func waitImagePeer(t *testing.T, from, holder *Daemon, image string) {
	t.Helper()
	want := holder.swarm.ID()
	for deadline := time.Now().Add(swarmWait); !slices.Contains(from.swarm.ImagePeers(image), want); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s has no have session with %s for %s after %v", from.swarm.ID(), want, image, swarmWait)
		}
	}
}

// flatImage returns the swarm name of the flat form of the public image
// ref: its manifest digest.
func flatImage(t *testing.T, ref string) string {
	t.Helper()
	flatRef, err := fetch.FlatRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(flatRef, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Head(r)
	if err != nil {
		t.Fatal(err)
	}
	return desc.Digest.String()
}

// countingRegistry is an in-memory registry on loopback that counts the
// bytes it serves for blob Range requests (block fetches).
func countingRegistry(t *testing.T) (host string, blobBytes *atomic.Int64) {
	t.Helper()
	blobBytes = new(atomic.Int64)
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") != "" {
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, r)
			blobBytes.Add(int64(rec.Body.Len()))
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), blobBytes
}

// pushAndConvertFile pushes an image of one file to ref and its flat form
// beside it, and returns ref.
func pushAndConvertFile(t *testing.T, ref, path string, body []byte) string {
	t.Helper()
	return pushAndConvertFileAs(t, ref, path, body, authn.Anonymous)
}

// pushAndConvertFileAs is pushAndConvertFile with the registry account
// auth, for the push and the conversion.
func pushAndConvertFileAs(t *testing.T, ref, path string, body []byte, auth authn.Authenticator) string {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: path, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg})
	_, _ = tw.Write(body)
	_ = tw.Close()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, _ := mutate.AppendLayers(empty.Image, l)
	r, _ := name.ParseReference(ref, name.Insecure)
	if err := remote.Write(r, img, remote.WithAuth(auth)); err != nil {
		t.Fatal(err)
	}
	if _, err := converter.Convert(t.Context(), ref, "", converter.WithPlainHTTP(true), converter.WithLogger(slog.New(slog.DiscardHandler)),
		converter.WithKeychain(keychainOf{auth})); err != nil {
		t.Fatal(err)
	}
	return ref
}

// TestOriginCoalescingDaemons: three daemons mount the same image and read
// the same file at the same time. Nobody holds a block when the reads
// start, so every block is fetched from the registry by its designated
// node alone and reaches the other two over the swarm: the registry serves
// about one copy of the blocks read, and every node reads the right bytes.
func TestOriginCoalescingDaemons(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	host, blobBytes := countingRegistry(t)
	ref, body, compressed, blocks := randomFileImage(t, host+"/big:v1", 7)

	_, ca := startDaemon(t, Config{StateDir: t.TempDir()})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	clients := []*Client{ca}
	for range 2 {
		_, c := startDaemon(t, Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: sa.Addrs[:1]}})
		clients = append(clients, c)
	}
	dirs := mountSeeingAll(t, clients, ref)

	before := blobBytes.Load()
	took := readAtOnce(t, dirs, []int{0, 1, 2}, body)
	served := blobBytes.Load() - before
	ratio := float64(served) / float64(compressed)
	t.Logf("%d blocks, %d compressed bytes; the registry served %d bytes of blocks: %.3f copies; read times %v",
		blocks, compressed, served, ratio, took)
	for i, c := range clients {
		st, err := c.Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		var peers, reg int64
		for _, m := range st.Mounts {
			peers += m.Fetch.BytesFromPeers
			reg += m.Fetch.BytesFromRegistry
		}
		t.Logf("node %d: %d bytes from peers, %d from the registry; origin fetches %d, blocks served from them %d, ORIGIN requests %d, blocks got from them %d",
			i, peers, reg, st.Swarm.OriginFetches, st.Swarm.OriginServed, st.Swarm.OriginRequests, st.Swarm.OriginBlocks)
		// A designated node fetches its blocks from the registry either for
		// its own read or, when a peer's ORIGIN request for them comes
		// first, as that peer's fetcher; its own read then finds them in
		// its store. Either way it ran registry fetches.
		if peers == 0 || (reg == 0 && st.Swarm.OriginFetches == 0) {
			t.Errorf("node %d: want blocks from peers and registry fetches of its own (it is designated for some)", i)
		}
	}
	if ratio > 1.3 {
		t.Errorf("the registry served %.2f copies of the blocks read, want about one", ratio)
	}
}

// TestOriginRestartedMember: four daemons mount an image; one restarts (same
// identity, same address) and does not mount it again, so the image's
// records still name it but it is not in the swarm. The other three read
// the same file at once. The restarted daemon answers their ORIGIN requests
// NOT_MEMBER, and its share of the blocks is fetched from the registry once,
// by the next member of the group, not once by each reader.
func TestOriginRestartedMember(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	host, blobBytes := countingRegistry(t)
	ref, body, compressed, blocks := randomFileImage(t, host+"/restarted:v1", 8)

	const restarted = 1
	cfgs := make([]Config, 4)
	clients := make([]*Client, len(cfgs))
	stops := make([]func(), len(cfgs))
	var boot []string
	for i := range cfgs {
		cfgs[i] = Config{StateDir: t.TempDir(), P2P: P2PConfig{Bootstrap: boot}}
		_, clients[i], stops[i] = startStoppableDaemon(t, cfgs[i])
		if i == 0 {
			st, err := clients[0].Status(t.Context())
			if err != nil || len(st.Addrs) == 0 {
				t.Fatalf("status of node 0: %+v %v", st, err)
			}
			boot = st.Addrs[:1]
		}
	}
	dirs := mountSeeingAll(t, clients, ref)

	// The restart: same state directory (identity), same address.
	st, err := clients[restarted].Status(t.Context())
	if err != nil || len(st.Addrs) == 0 {
		t.Fatalf("status of node %d: %+v %v", restarted, st, err)
	}
	listen, _, _ := strings.Cut(st.Addrs[0], "/p2p/")
	stops[restarted]()
	cfg := cfgs[restarted]
	cfg.P2P.Listen = []string{listen}
	_, clients[restarted], _ = startStoppableDaemon(t, cfg)
	readers := []int{0, 2, 3}

	before := blobBytes.Load()
	readAtOnce(t, dirs, readers, body)
	served := blobBytes.Load() - before
	ratio := float64(served) / float64(compressed)
	var notMemberRecv int64
	for _, i := range readers {
		st, err := clients[i].Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		notMemberRecv += st.Swarm.NotMemberReceived
		t.Logf("node %d: %d NOT_MEMBER answers received, %d unreachable, %d blocks planned again, %d origin fetches",
			i, st.Swarm.NotMemberReceived, st.Swarm.Unreachable, st.Swarm.OriginReplanned, st.Swarm.OriginFetches)
	}
	rs, err := clients[restarted].Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the registry served %.3f copies of the %d blocks; the restarted node answered NOT_MEMBER %d times, ran %d origin fetches",
		ratio, blocks, rs.Swarm.NotMemberSent, rs.Swarm.OriginFetches)
	if rs.Swarm.NotMemberSent == 0 || notMemberRecv == 0 {
		t.Errorf("NOT_MEMBER sent %d, received %d: the restarted node was never asked", rs.Swarm.NotMemberSent, notMemberRecv)
	}
	if rs.Swarm.OriginFetches != 0 {
		t.Errorf("the restarted node, not in the swarm, ran %d origin fetches", rs.Swarm.OriginFetches)
	}
	if ratio > 1.1 {
		t.Errorf("the registry served %.2f copies of the blocks read, want about one", ratio)
	}
}

// randomFileImage pushes an image of one 6 MiB file, data/big, of random
// bytes from seed, converts it, and returns the image's reference, the
// file, and the compressed size and number of its flat image's blocks.
// The bytes are incompressible, so that blocks are far apart in their blob
// and no registry request reads past the blocks it wants.
func randomFileImage(t *testing.T, ref string, seed byte) (string, []byte, int64, int) {
	t.Helper()
	body := make([]byte, 6<<20)
	_, _ = rand.NewChaCha8([32]byte{seed}).Read(body)
	ref = pushAndConvertFile(t, ref, "data/big", body)
	flatRef, err := fetch.FlatRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	im, err := fetch.OpenImage(t.Context(), flatRef, fetch.WithPlainHTTP(true))
	if err != nil {
		t.Fatal(err)
	}
	var compressed int64
	for _, b := range im.Index().Blocks {
		compressed += int64(b.CLen)
	}
	return ref, body, compressed, len(im.Index().Blocks)
}

// mountSeeingAll mounts ref on every client and returns the mount
// directories once every node sees all the others as image peers: they
// must, before reads, or they would not agree on the designated nodes. A
// node that has not found all its peers yet looks again when it mounts the
// image again.
func mountSeeingAll(t *testing.T, clients []*Client, ref string) []string {
	t.Helper()
	dirs := make([]string, len(clients))
	mount := func(i int) {
		t.Helper()
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("m%d", i))
		if _, err := clients[i].Mount(t.Context(), MountRequest{Ref: ref, Dir: dir}); err != nil {
			t.Fatal(err)
		}
		dirs[i] = dir
	}
	for i := range clients {
		mount(i)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		var lonely []int
		for i, c := range clients {
			if st, err := c.Status(t.Context()); err != nil || st.Swarm == nil || st.Swarm.ImagePeers < len(clients)-1 {
				lonely = append(lonely, i)
			}
		}
		if len(lonely) == 0 {
			return dirs
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes %v do not see all %d others", lonely, len(clients)-1)
		}
		time.Sleep(500 * time.Millisecond)
		for _, i := range lonely {
			mount(i)
		}
	}
}

// readAtOnce has the nodes in readers read data/big from their mounts
// (dirs) at the same moment, checks the bytes against body, and returns
// how long each read took.
func readAtOnce(t *testing.T, dirs []string, readers []int, body []byte) []time.Duration {
	t.Helper()
	var wg sync.WaitGroup
	start := make(chan struct{})
	took := make([]time.Duration, len(dirs))
	for _, i := range readers {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			got, err := os.ReadFile(filepath.Join(dirs[i], "data/big"))
			took[i] = time.Since(t0)
			if err != nil || !bytes.Equal(got, body) {
				t.Errorf("node %d: read %d bytes (want %d), equal %v, err %v", i, len(got), len(body), bytes.Equal(got, body), err)
			}
		})
	}
	close(start)
	wg.Wait()
	return took
}
