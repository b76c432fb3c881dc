package simulation

import (
	"crypto/sha256"
	"testing"

	"golang.org/x/crypto/chacha20poly1305"
)

// BenchmarkServeCPU measures the two per-byte costs DefaultServeCPU adds
// up, on 1 MiB: SHA-256 (the block store verifies every block it reads)
// and ChaCha20-Poly1305 (libp2p's Noise transport seals every byte sent).
// Their ns/op, over 1,000,000, are the ms per MiB of each.
func BenchmarkServeCPU(b *testing.B) {
	buf := make([]byte, 1<<20)
	b.Run("sha256", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			sha256.Sum256(buf)
		}
	})
	b.Run("chacha20poly1305", func(b *testing.B) {
		aead, err := chacha20poly1305.New(make([]byte, chacha20poly1305.KeySize))
		if err != nil {
			b.Fatal(err)
		}
		nonce := make([]byte, aead.NonceSize())
		out := make([]byte, 0, len(buf)+aead.Overhead())
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			out = aead.Seal(out[:0], nonce, buf, nil)
		}
	})
}
