package p2p

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"

	"github.com/libp2p/go-libp2p/core/pnet"
)

// NewPSK returns a new random 32-byte key for a private network, from the
// operating system's random source.
func NewPSK() (pnet.PSK, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("pre-shared key: %w", err)
	}
	return k, nil
}

// EncodePSK returns a key in libp2p's swarm key file format, base16
// ("/key/swarm/psk/1.0.0/", "/base16/", the key in hex, one line each), as
// ipfs-swarm-key-gen writes it; ParsePSK reads it back.
func EncodePSK(k pnet.PSK) []byte {
	return fmt.Appendf(nil, "%s\n/base16/\n%s\n", pskV1Header, hex.EncodeToString(k))
}
