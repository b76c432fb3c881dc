package daemon

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/p2p"
)

// writeSwarmKey writes a new key file with mode perm and returns its path.
func writeSwarmKey(t *testing.T, perm os.FileMode) string {
	t.Helper()
	k, err := p2p.NewPSK()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(path, p2p.EncodePSK(k), perm); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestOpenNetworkWarning: New, which reads the configuration at start,
// warns in one line when the swarm would listen beyond loopback without a
// key, and only then. Nothing listens: New starts nothing.
func TestOpenNetworkWarning(t *testing.T) {
	t.Parallel()
	key := writeSwarmKey(t, 0o600)
	const warning = "without a private-network key"
	for _, c := range []struct {
		name   string
		p2p    P2PConfig
		warned bool
	}{
		{"0.0.0.0 without key", P2PConfig{Listen: []string{"/ip4/0.0.0.0/tcp/4701"}}, true},
		{"the default listen address without key", P2PConfig{}, true},
		{":: without key", P2PConfig{Listen: []string{"/ip6/::/tcp/0"}}, true},
		{"one of two addresses beyond loopback", P2PConfig{Listen: []string{"/ip4/127.0.0.1/tcp/0", "/ip4/192.0.2.1/tcp/0"}}, true},
		{"0.0.0.0 with key", P2PConfig{Listen: []string{"/ip4/0.0.0.0/tcp/4701"}, PSKFile: key}, false},
		{"loopback without key", P2PConfig{Listen: []string{"/ip4/127.0.0.1/tcp/0"}}, false},
		{"IPv6 loopback without key", P2PConfig{Listen: []string{"/ip6/::1/tcp/0"}}, false},
		{"p2p off", P2PConfig{Disabled: true}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var logs bytes.Buffer
			d, err := New(Config{StateDir: t.TempDir(), P2P: c.p2p}, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			n := strings.Count(logs.String(), warning)
			if want := map[bool]int{true: 1, false: 0}[c.warned]; n != want {
				t.Errorf("%d warnings, want %d; logs:\n%s", n, want, logs.String())
			}
			if c.warned && (!strings.Contains(logs.String(), "level=WARN") || strings.Count(strings.TrimSpace(logs.String()), "\n") != 0) {
				t.Errorf("the warning is not one WARN line: %q", logs.String())
			}
			if (c.p2p.PSKFile != "") != (len(d.swarmKey) == 32) {
				t.Errorf("psk_file %q, key of %d bytes", c.p2p.PSKFile, len(d.swarmKey))
			}
		})
	}
}

// TestSwarmKeyMissing: a configured key that cannot be read stops the
// daemon with one line that says how to make it, instead of running an
// open network.
func TestSwarmKeyMissing(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "swarm.key")
	_, err := New(Config{StateDir: t.TempDir(), P2P: P2PConfig{PSKFile: missing}}, slog.New(slog.DiscardHandler))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "shoal keygen "+missing) || strings.Contains(err.Error(), "\n") {
		t.Errorf("New with a missing key file: %v; want one line naming the file and shoal keygen", err)
	}
	bad := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(bad, []byte("not a key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{StateDir: t.TempDir(), P2P: P2PConfig{PSKFile: bad}}, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "psk_file") {
		t.Errorf("New with a malformed key file: %v", err)
	}
	// With p2p off the key is not needed.
	if _, err := New(Config{StateDir: t.TempDir(), P2P: P2PConfig{Disabled: true, PSKFile: missing}}, slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("New with p2p off and a missing key file: %v", err)
	}
	// A key others can read is used, with a warning.
	var logs bytes.Buffer
	if _, err := New(Config{StateDir: t.TempDir(), P2P: P2PConfig{PSKFile: writeSwarmKey(t, 0o644), Listen: []string{"/ip4/127.0.0.1/tcp/0"}}},
		slog.New(slog.NewTextHandler(&logs, nil))); err != nil || !strings.Contains(logs.String(), "chmod 0600") {
		t.Errorf("New with a key file of mode 0644: %v; logs %q", err, logs.String())
	}
}
