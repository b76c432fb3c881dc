package p2p

import (
	"bytes"
	"context"
	"testing"
)

// rangeMap serves ranges from memory: data for those it holds, COMING
// with a count for those it reads, nothing for the others.
type rangeMap struct {
	data   map[int][]byte
	coming map[int]int64
}

func (r rangeMap) BlobRange(_ context.Context, _ string, i int) ([]byte, int64, bool) {
	if d, ok := r.data[i]; ok {
		return d, 0, true
	}
	if c, ok := r.coming[i]; ok {
		return nil, c, false
	}
	return nil, -1, false
}

// TestRangeProtocol: a member of a pull answers a range it holds with its
// bytes, one it reads with COMING and its progress, another with
// NOT_FOUND; a node not pulling the blob answers NOT_MEMBER. A private
// blob's ranges go only to a peer that proved access for its name: one
// that holds the secret gets them, one that does not is DENIED.
func TestRangeProtocol(t *testing.T) {
	t.Parallel()
	a := startNode(t, Config{Blocks: openStore(t, nil, nil)})
	b := startNode(t, Config{Blocks: openStore(t, nil, nil), BootstrapPeers: a.Addrs()})
	c := startNode(t, Config{Blocks: openStore(t, nil, nil), BootstrapPeers: a.Addrs()})
	r0 := testData(7, 1<<20)
	a.ServeRanges(rangeMap{data: map[int][]byte{0: r0}, coming: map[int]int64{1: 1 + 4096}})
	const key = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
	ctx := t.Context()

	// Not pulling the blob yet: NOT_MEMBER for what it does not hold.
	if _, _, notMember, err := b.askRange(ctx, a.ID(), key, 2, 1<<20); err != nil || !notMember {
		t.Fatalf("before A joined: notMember %v, err %v; want NOT_MEMBER", notMember, err)
	}
	if _, err := a.JoinPull(ctx, key); err != nil {
		t.Fatal(err)
	}
	data, _, _, err := b.askRange(ctx, a.ID(), key, 0, int64(len(r0)))
	if err != nil || !bytes.Equal(data, r0) {
		t.Fatalf("range 0: %d bytes, %v; want the range", len(data), err)
	}
	if _, coming, _, err := b.askRange(ctx, a.ID(), key, 1, 1<<20); err != nil || coming != 1+4096 {
		t.Errorf("range 1: coming %d, %v; want %d", coming, err, 1+4096)
	}
	if data, coming, notMember, err := b.askRange(ctx, a.ID(), key, 2, 1<<20); err != nil || data != nil || coming != -1 || notMember {
		t.Errorf("range 2: %d bytes, coming %d, notMember %v, %v; want NOT_FOUND", len(data), coming, notMember, err)
	}
	// A range of another length than asked is refused.
	if _, _, _, err := b.askRange(ctx, a.ID(), key, 0, int64(len(r0))-1); err == nil {
		t.Errorf("range 0 of the wrong length accepted")
	}

	// Private: under the name, to B (which holds the secret), not to C.
	name, secret := PrivateBlob("sha256:"+key[7:], testData(8, 4096))
	a.AddPrivate(secret)
	b.AddPrivate(secret)
	if data, _, _, err := b.askRange(ctx, a.ID(), name, 0, int64(len(r0))); err != nil || !bytes.Equal(data, r0) {
		t.Errorf("private range 0 to a peer with the secret: %d bytes, %v", len(data), err)
	}
	if data, _, _, err := c.askRange(ctx, a.ID(), name, 0, int64(len(r0))); err == nil || data != nil {
		t.Errorf("private range 0 to a peer without the secret: %d bytes, err %v; want DENIED", len(data), err)
	}
}
