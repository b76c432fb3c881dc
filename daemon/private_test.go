package daemon

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/fetch"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
	"github.com/shoal-project/shoal/p2p"
)

// dockerConfig writes a Docker config directory that holds credentials
// for host (none if user is ""), for registry.docker_config.
func dockerConfig(t *testing.T, host, user, pass string) string {
	t.Helper()
	dir := t.TempDir()
	auths := map[string]any{}
	if user != "" {
		auths[host] = map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))}
	}
	b, err := json.Marshal(map[string]any{"auths": auths})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// keychainOf is one account for every registry.
type keychainOf struct{ auth authn.Authenticator }

func (k keychainOf) Resolve(authn.Resource) (authn.Authenticator, error) { return k.auth, nil }

// pushAndConvertAs pushes an image of one file of n random bytes to ref
// with auth, converts it beside it, and returns ref, the bytes and the
// flat image opened with auth.
func pushAndConvertAs(t *testing.T, ref string, auth authn.Authenticator, seed byte, n int) (string, []byte, *fetch.Image) {
	t.Helper()
	body := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{seed}).Read(body)
	pushAndConvertFileAs(t, ref, "data/file", body, auth)
	flatRef, err := fetch.FlatRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	im, err := fetch.OpenImage(t.Context(), flatRef, fetch.WithPlainHTTP(true), fetch.WithLogger(slog.New(slog.DiscardHandler)), fetch.WithKeychain(keychainOf{auth}))
	if err != nil {
		t.Fatal(err)
	}
	return ref, body, im
}

// TestPrivateImageSharing is issue 16's acceptance test on real daemons, a
// real registry behind htpasswd (the private image) and one without auth
// (the public image). A and C have credentials for the private registry,
// B has none.
//   - B cannot open the private image (one clear line), and gets no byte
//     of it from peers;
//   - an outsider built from package p2p, with every digest of the private
//     image and its swarm name but not its manifest's bytes, gets nothing
//     from A: not by digest, not by name, not through ORIGIN requests, not
//     the index;
//   - C, reading after A, has at least 90% of its block bytes from peers;
//   - the public image is shared with B as before: every block from peers.
func TestPrivateImageSharing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE")
	}
	priv := testenv.StartRegistry(t, testenv.WithBasicAuth("alice", "s3cret"))
	pub := testenv.StartRegistry(t)
	privRef, privBody, privIm := pushAndConvertAs(t, priv.Ref("team/app:v1"), priv.Auth(), 1, 3<<20)
	pubRef, pubBody, _ := pushAndConvertAs(t, pub.Ref("lib/base:v1"), authn.Anonymous, 2, 2<<20)

	withCreds := RegistryConfig{DockerConfig: dockerConfig(t, priv.Host, "alice", "s3cret")}
	without := RegistryConfig{DockerConfig: dockerConfig(t, priv.Host, "", "")}
	_, ca := startDaemon(t, Config{StateDir: t.TempDir(), Registry: withCreds})
	sa, err := ca.Status(t.Context())
	if err != nil || len(sa.Addrs) == 0 {
		t.Fatalf("status of A: %+v %v", sa, err)
	}
	boot := P2PConfig{Bootstrap: sa.Addrs[:1]}
	_, cb := startDaemon(t, Config{StateDir: t.TempDir(), Registry: without, P2P: boot})
	_, cc := startDaemon(t, Config{StateDir: t.TempDir(), Registry: withCreds, P2P: boot})

	read := func(c *Client, who, ref string, want []byte) MountInfo {
		t.Helper()
		mnt := filepath.Join(t.TempDir(), who)
		mi, err := c.Mount(t.Context(), MountRequest{Ref: ref, Dir: mnt})
		if err != nil {
			t.Fatalf("%s: mount %s: %v", who, ref, err)
		}
		if got, err := os.ReadFile(filepath.Join(mnt, "data/file")); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: read %d bytes of %s, %v", who, len(got), ref, err)
		}
		fin, err := c.Unmount(t.Context(), UnmountRequest{ID: mi.ID})
		if err != nil {
			t.Fatal(err)
		}
		return fin
	}
	swarmStats := func(c *Client) p2p.Stats {
		t.Helper()
		st, err := c.Status(t.Context())
		if err != nil || st.Swarm == nil {
			t.Fatalf("status: %+v, %v", st, err)
		}
		return *st.Swarm
	}

	a := read(ca, "a", privRef, privBody)
	if a.Fetch.BytesFromRegistry == 0 {
		t.Fatalf("A read nothing from the registry: %+v", a.Fetch)
	}

	// B: no credentials. One clear line, and nothing from peers.
	_, err = cb.Mount(t.Context(), MountRequest{Ref: privRef, Dir: filepath.Join(t.TempDir(), "b")})
	if err == nil {
		t.Fatal("B mounted the private image without credentials")
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(strings.ToLower(msg), "auth") {
		t.Errorf("B's error is not one clear line about credentials: %q", msg)
	}
	t.Logf("B without credentials: %v", err)
	if st := swarmStats(cb); st.BytesDownloaded != 0 || st.BlocksFetched != 0 || st.IndexesFetched != 0 || st.ManifestsFetched != 0 {
		t.Errorf("B got %d bytes (%d blocks, %d indexes, %d manifests) from peers", st.BytesDownloaded, st.BlocksFetched, st.IndexesFetched, st.ManifestsFetched)
	}

	// The outsider: every digest, the name, no manifest bytes.
	outsider(t, sa.Addrs[:1], privIm)

	// C: from A, almost all of it.
	c := read(cc, "c", privRef, privBody)
	total := c.Fetch.BytesFromPeers + c.Fetch.BytesFromRegistry
	share := float64(c.Fetch.BytesFromPeers) / float64(total)
	t.Logf("C: %d block bytes from peers, %d from the registry (%.1f%% from peers)", c.Fetch.BytesFromPeers, c.Fetch.BytesFromRegistry, 100*share)
	if share < 0.9 {
		t.Errorf("C had %.1f%% of its block bytes from peers, want at least 90%%", 100*share)
	}
	if st := swarmStats(cc); st.ProofsSent+swarmStats(ca).ProofsSent == 0 {
		t.Error("no proof of access was exchanged between A and C")
	}

	// The public image: A reads it, then B has it from A as before.
	read(ca, "a-public", pubRef, pubBody)
	b := read(cb, "b-public", pubRef, pubBody)
	if b.Fetch.BytesFromPeers == 0 || b.Fetch.BytesFromRegistry != 0 {
		t.Errorf("B's public image: %d bytes from peers, %d from the registry; want all from peers", b.Fetch.BytesFromPeers, b.Fetch.BytesFromRegistry)
	}
	if st := swarmStats(cb); st.ProofsSent != 0 {
		t.Errorf("B ran %d proofs of access for a public image", st.ProofsSent)
	}
}

// outsider runs a p2p node that knows everything of im but its manifest's
// bytes — the manifest, index and block digests, and the swarm name (which
// the DHT shows) — and tries every way of getting its bytes from the node
// at boot. It must get none.
func outsider(t *testing.T, boot []string, im *fetch.Image) {
	t.Helper()
	ctx := t.Context()
	e, err := p2p.New(ctx, p2p.Config{ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, BootstrapPeers: boot,
		Logger: testenv.Logger(t, "outsider")})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(rctx) }()
	defer func() { cancel(); <-done }()
	info, err := peer.AddrInfoFromString(boot[0])
	if err != nil {
		t.Fatal(err)
	}
	ai := info.ID
	if err := e.Connect(ctx, boot[0]); err != nil {
		t.Fatal(err)
	}
	digest := im.Digest()
	m := im.Manifest()
	swarmName, _ := p2p.PrivateImage(m.Raw) // what the DHT key shows; the secret stays unknown
	idxDesc, idxRaw := im.IndexBlob()
	indexID := flat.Sum(idxRaw)
	blocks := im.Index().Blocks
	asked := append([]flat.Block{{ID: indexID, ULen: uint32(len(idxRaw))}}, blocks...)
	if len(asked) > p2p.MaxRequestBlocks {
		asked = asked[:p2p.MaxRequestBlocks]
	}
	for _, image := range []string{digest, swarmName} {
		got, err := e.FetchBlobBlocks(ctx, ai, image, asked)
		if len(got) != 0 {
			t.Errorf("outsider: %d blocks asked under %s", len(got), image)
		}
		if image == swarmName && !errors.Is(err, p2p.ErrDenied) {
			t.Errorf("outsider under the swarm name: %v, want DENIED", err)
		}
		if x, err := e.ImageIndex(ctx, image, indexID, idxDesc.Size); err == nil || len(x) != 0 {
			t.Errorf("outsider: the index under %s: %d bytes", image, len(x))
		}
		// Joined as if the image were public under that name: the reads
		// ask holders and designated fetchers (ORIGIN); nobody answers.
		if err := e.JoinImage(ctx, image, im.Index()); err != nil {
			t.Fatal(err)
		}
		fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
		got, _ = e.Source(image).FetchMany(fctx, blocks)
		fcancel()
		if len(got) != 0 {
			t.Errorf("outsider: %d blocks through the swarm under %s", len(got), image)
		}
	}
	st := e.Stats()
	t.Logf("outsider: %d ORIGIN requests, %d DENIED, %d bytes received", st.OriginRequests, st.DeniedReceived, st.BytesDownloaded)
	if st.BytesDownloaded != 0 || st.BlocksFetched != 0 || st.IndexesFetched != 0 {
		t.Errorf("outsider got %d bytes (%d blocks, %d indexes)", st.BytesDownloaded, st.BlocksFetched, st.IndexesFetched)
	}
	if st.DeniedReceived == 0 {
		t.Error("the outsider was never told DENIED")
	}
}
