package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/shoal-project/shoal/p2p"
)

// The swarm's private-network key (libp2p pnet) keeps every host that does
// not hold it from connecting at all. The daemon reads it once, at New: a
// configured key that cannot be read stops the daemon with one line rather
// than let it run an open network, and a daemon that listens beyond
// loopback with no key configured says so once, at start.

// loadSwarmKey reads the key file p2p.psk_file names; "" means none.
func loadSwarmKey(path string, log *slog.Logger) (pnet.PSK, error) {
	if path == "" {
		return nil, nil
	}
	k, err := p2p.LoadPSK(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("p2p.psk_file %s: %w: make the swarm's key once (shoal keygen %s) and copy that file to every node",
			path, fs.ErrNotExist, path)
	case err != nil:
		return nil, fmt.Errorf("p2p.psk_file: %w", err)
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		log.Warn("p2p.psk_file is readable by other users than its owner, and whoever holds it can join the swarm: chmod 0600 it",
			"file", path, "mode", st.Mode().Perm().String())
	}
	return k, nil
}

// warnOpenNetwork logs one line when the swarm listens beyond loopback
// with no key: any host that reaches those addresses can join it.
func warnOpenNetwork(log *slog.Logger, listen []string, key pnet.PSK) {
	if len(key) != 0 {
		return
	}
	if open := beyondLoopback(listen); len(open) > 0 {
		log.Warn("p2p listens beyond loopback without a private-network key: any host that reaches it can join the swarm; set p2p.psk_file (shoal keygen)",
			"listen", open)
	}
}

// beyondLoopback returns the listen multiaddrs (p2p's default when none
// are given) that are not on a loopback address: unspecified (0.0.0.0,
// ::), routable, or a DNS name. Addresses that do not parse are left to
// p2p.New to refuse.
func beyondLoopback(listen []string) []string {
	if len(listen) == 0 {
		listen = []string{p2p.DefaultListenAddr}
	}
	var out []string
	for _, s := range listen {
		ma, err := multiaddr.NewMultiaddr(s)
		if err == nil && !manet.IsIPLoopback(ma) {
			out = append(out, s)
		}
	}
	return out
}
