package p2p

import (
	"bytes"
	"testing"
)

func TestNewPSKRoundTrip(t *testing.T) {
	t.Parallel()
	a, err := NewPSK()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewPSK()
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != 32 || bytes.Equal(a, b) {
		t.Fatalf("keys %x and %x: want 32 random bytes each", a, b)
	}
	file := EncodePSK(a)
	if !bytes.HasPrefix(file, []byte("/key/swarm/psk/1.0.0/\n/base16/\n")) {
		t.Errorf("not a base16 swarm key file: %q", file)
	}
	got, err := ParsePSK(file)
	if err != nil || !bytes.Equal(got, a) {
		t.Fatalf("ParsePSK(EncodePSK(k)) = %x, %v; want %x", got, err, a)
	}
}
