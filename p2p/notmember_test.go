package p2p

import (
	"testing"

	"github.com/shoal-project/shoal/flat"
)

// A node asked about an image it is not a member of answers NOT_MEMBER
// only to an asker that reads it (flagMember), NOT_FOUND to others; it
// serves nothing of the image, not even blocks its cache still holds
// (it serves only blocks of images it holds). Opening the image
// (ImageBlob) or joining it makes it a member again.
func TestNotMemberAnswers(t *testing.T) {
	t.Parallel()
	im := newTestImage("not-member", 4, 16<<10)
	nodes := startSwarm(t, im, 2, 0, nil)
	a, b := nodes[0].n, nodes[1].n
	held, other := im.index.Blocks[0], im.index.Blocks[1]
	if got, err := nodes[1].chain.FetchMany(t.Context(), []flat.Block{held}); err != nil || len(got) != 1 {
		t.Fatalf("node 1 fetching a block: %d, %v", len(got), err)
	}
	b.LeaveImage(im.digest)
	before := b.Stats()

	ask := func(what string, blocks []flat.Block, flags uint64, wantNotMember bool, wantGot int) {
		t.Helper()
		o := a.request(t.Context(), b.ID(), im.digest, blocks, reqOpts{flags: flags})
		if o.err != nil || o.notMember != wantNotMember || len(o.got) != wantGot || len(o.got)+len(o.notFound) != len(blocks) {
			t.Errorf("%s: not member %v, %d got, %d not found, err %v; want not member %v, %d got",
				what, o.notMember, len(o.got), len(o.notFound), o.err, wantNotMember, wantGot)
		}
	}
	// A node serves only blocks of images it holds: once it left, not
	// even those its cache keeps.
	ask("left, a block it holds", []flat.Block{held}, flagMember, true, 0)
	ask("left, blocks it holds one of", []flat.Block{held, other}, flagMember, true, 0)
	ask("left, a block it lacks", []flat.Block{other}, flagMember, true, 0)
	ask("left, ORIGIN", []flat.Block{held, other}, flagOrigin|flagMember, true, 0)
	ask("left, an asker without flagMember", []flat.Block{held}, 0, false, 0)
	ask("left, ORIGIN from an asker without flagMember", []flat.Block{other}, flagOrigin, false, 0)
	if st := b.Stats(); st.NotMemberSent != 4 || st.OriginFetches != before.OriginFetches {
		t.Errorf("node 1: %d NOT_MEMBER answers, %d origin fetches since it left; want 4 and 0", st.NotMemberSent, st.OriginFetches-before.OriginFetches)
	}

	key, err := ImageKey(im.digest)
	if err != nil {
		t.Fatal(err)
	}
	b.startEarlyProvide(key) // what ImageBlob does when a mount opens the image
	ask("opening, a block it lacks", []flat.Block{other}, flagMember, false, 0)
	b.LeaveImage(im.digest)
	ask("left again", []flat.Block{other}, flagMember, true, 0)
	if err := b.JoinImage(t.Context(), im.digest, im.index); err != nil {
		t.Fatal(err)
	}
	b.ServeOrigin(im.digest, nodes[1].origin) // forgotten when it left
	ask("joined, ORIGIN", []flat.Block{other}, flagOrigin|flagMember, false, 1)
}
