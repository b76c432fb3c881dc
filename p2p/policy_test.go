package p2p

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/flat"
)

// testPeerIDs returns n real peer IDs (ed25519 keys) determined by seed.
func testPeerIDs(t testing.TB, seed uint64, n int) []peer.ID {
	t.Helper()
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	r := rand.NewChaCha8(key)
	out := make([]peer.ID, n)
	for i := range out {
		_, pub, err := crypto.GenerateEd25519Key(r)
		if err != nil {
			t.Fatal(err)
		}
		if out[i], err = peer.IDFromPublicKey(pub); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func seeded(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }

func TestChoosePeers(t *testing.T) {
	t.Parallel()
	ids := testPeerIDs(t, 1, 4)
	a, b, c, d := ids[0], ids[1], ids[2], ids[3]
	ms := time.Millisecond
	here := Labels{Zone: "z1", Rack: "r1"}
	tests := []struct {
		name  string
		self  Labels
		cands []PeerView
		want  []peer.ID
	}{
		{
			name: "same rack, then same zone, then elsewhere, whatever the latency",
			self: here,
			cands: []PeerView{
				{ID: a, Labels: Labels{"z2", "r1"}, Latency: ms},
				{ID: b, Labels: Labels{"z1", "r2"}, Latency: 80 * ms},
				{ID: c, Labels: Labels{"z1", "r1"}, Latency: 300 * ms},
				{ID: d, Latency: ms / 2},
			},
			want: []peer.ID{c, b, d, a}, // a and d are both elsewhere: d is faster
		},
		{
			name: "a rack of the same name in another zone is not near",
			self: here,
			cands: []PeerView{
				{ID: a, Labels: Labels{"z9", "r1"}},
				{ID: b, Labels: Labels{"z1", "r7"}},
			},
			want: []peer.ID{b, a},
		},
		{
			name: "then the lowest latency",
			self: here,
			cands: []PeerView{
				{ID: a, Labels: Labels{"z1", ""}, Latency: 40 * ms},
				{ID: b, Labels: Labels{"z1", ""}, Latency: 3 * ms},
				{ID: c, Labels: Labels{"z1", ""}, Latency: 900 * ms},
			},
			want: []peer.ID{b, a, c},
		},
		{
			name: "never measured ranks as a LAN round trip",
			cands: []PeerView{
				{ID: a, Latency: 20 * ms},
				{ID: b},
				{ID: c, Latency: 100 * time.Microsecond},
			},
			want: []peer.ID{c, b, a},
		},
		{
			name: "within a factor of two the least loaded goes first",
			cands: []PeerView{
				{ID: a, Latency: 5 * ms, InFlight: 3},
				{ID: b, Latency: 6 * ms, InFlight: 0},
				{ID: c, Latency: 5 * ms, InFlight: 1},
			},
			want: []peer.ID{b, c, a},
		},
		{
			name: "load does not beat latency",
			cands: []PeerView{
				{ID: a, Latency: 1 * ms, InFlight: 9},
				{ID: b, Latency: 30 * ms},
			},
			want: []peer.ID{a, b},
		},
		{
			name: "no labels on this node: zones do not count",
			cands: []PeerView{
				{ID: a, Labels: Labels{"z1", "r1"}, Latency: 50 * ms},
				{ID: b, Latency: ms},
			},
			want: []peer.ID{b, a},
		},
		{name: "no candidates", self: here, want: []peer.ID{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for seed := range uint64(20) {
				got := ChoosePeers(tc.cands, tc.self, seeded(seed))
				if !slices.Equal(got, tc.want) {
					t.Fatalf("seed %d: order %v, want %v", seed, short(got), short(tc.want))
				}
			}
		})
	}
}

func short(ids []peer.ID) []string {
	out := make([]string, len(ids))
	for i, p := range ids {
		s := p.String()
		out[i] = s[len(s)-6:]
	}
	return out
}

// Equals are ordered at random, evenly, and the same seed gives the same
// order.
func TestChoosePeersRandomAmongEquals(t *testing.T) {
	t.Parallel()
	ids := testPeerIDs(t, 2, 4)
	var cands []PeerView
	for _, p := range ids {
		cands = append(cands, PeerView{ID: p, Labels: Labels{Zone: "z"}, Latency: 4 * time.Millisecond})
	}
	first := map[peer.ID]int{}
	const runs = 4000
	for seed := range uint64(runs) {
		got := ChoosePeers(cands, Labels{Zone: "z"}, seeded(seed))
		if again := ChoosePeers(cands, Labels{Zone: "z"}, seeded(seed)); !slices.Equal(got, again) {
			t.Fatalf("seed %d: %v then %v", seed, short(got), short(again))
		}
		if len(got) != len(ids) {
			t.Fatalf("got %d peers", len(got))
		}
		first[got[0]]++
	}
	for _, p := range ids {
		if share := float64(first[p]) / runs; share < 0.2 || share > 0.3 {
			t.Errorf("peer %s first in %.1f%% of runs, want about 25%%", p, 100*share)
		}
	}
}

func TestAssign(t *testing.T) {
	t.Parallel()
	ids := testPeerIDs(t, 3, 4)
	a, b, c, d := ids[0], ids[1], ids[2], ids[3]
	order := []peer.ID{c, a, b} // d is not usable
	tests := []struct {
		name          string
		holders       []peer.ID
		first, second peer.ID
	}{
		{"best two by order", []peer.ID{b, a, c}, c, a},
		{"one holder", []peer.ID{b}, b, ""},
		{"only an unusable holder", []peer.ID{d}, "", ""},
		{"unusable holders skipped", []peer.ID{d, b, d, a}, a, b},
		{"duplicates count once", []peer.ID{b, b}, b, ""},
		{"nobody", nil, "", ""},
	}
	var holders [][]peer.ID
	for _, tc := range tests {
		holders = append(holders, tc.holders)
	}
	first, second := Assign(order, holders)
	for i, tc := range tests {
		if first[i] != tc.first || second[i] != tc.second {
			t.Errorf("%s: first %q second %q, want %q %q", tc.name, first[i], second[i], tc.first, tc.second)
		}
	}
}

func TestHedgeDelay(t *testing.T) {
	t.Parallel()
	ms := time.Millisecond
	tests := []struct {
		latency, limit, want time.Duration
	}{
		{0, 300 * ms, 300 * ms},           // never measured: the limit
		{ms, 300 * ms, 50 * ms},           // fast peer: the floor
		{40 * ms, 300 * ms, 80 * ms},      // twice the EWMA
		{time.Second, 300 * ms, 300 * ms}, // capped
		{ms, 20 * ms, 20 * ms},            // a limit under the floor wins
		{40 * ms, 0, 0},                   // off
		{40 * ms, -1, 0},                  // off
	}
	for _, tc := range tests {
		if got := HedgeDelay(tc.latency, tc.limit); got != tc.want {
			t.Errorf("HedgeDelay(%v, %v) = %v, want %v", tc.latency, tc.limit, got, tc.want)
		}
	}
}

func randomIDs(seed uint64, n int) []flat.BlockID {
	r := seeded(seed)
	out := make([]flat.BlockID, n)
	for i := range out {
		for j := 0; j < len(out[i]); j += 8 {
			binary.LittleEndian.PutUint64(out[i][j:], r.Uint64())
		}
	}
	return out
}

// Rendezvous hashing is stable (same inputs, same outputs, whatever the
// order of the providers and whether self is among them), balanced, and
// moves only the blocks of a provider that leaves.
func TestDesignated(t *testing.T) {
	t.Parallel()
	peers := testPeerIDs(t, 4, 20)
	blocks := randomIDs(5, 10000)
	self := peers[0]
	others := peers[1:]
	shuffled := slices.Clone(peers)
	seeded(6).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })

	count := map[peer.ID]int{}
	winner := make([]peer.ID, len(blocks))
	for i, id := range blocks {
		w := Designated(id, others, self)
		if w2 := Designated(id, shuffled, self); w2 != w {
			t.Fatalf("block %d: %s, or %s with providers reordered and self among them", i, w, w2)
		}
		if w3 := Designated(id, others, self); w3 != w {
			t.Fatalf("block %d: not deterministic", i)
		}
		// Every node, with its own view, agrees.
		if w4 := Designated(id, append(slices.Clone(peers[:5]), peers[6:]...), peers[5]); w4 != w {
			t.Fatalf("block %d: node 0 says %s, node 5 says %s", i, w, w4)
		}
		winner[i] = w
		count[w]++
	}
	mean := float64(len(blocks)) / float64(len(peers))
	most, least := 0, len(blocks)
	for _, p := range peers {
		most, least = max(most, count[p]), min(least, count[p])
	}
	t.Logf("blocks per node over %d nodes: mean %.0f, min %d, max %d", len(peers), mean, least, most)
	if float64(most) > 2*mean || least == 0 {
		t.Errorf("unbalanced: max %d, min %d, mean %.0f", most, least, mean)
	}

	// Provider 7 leaves: only its blocks move, spread over the others.
	gone := peers[7]
	rest := slices.DeleteFunc(slices.Clone(others), func(p peer.ID) bool { return p == gone })
	moved := map[peer.ID]int{}
	for i, id := range blocks {
		w := Designated(id, rest, self)
		switch {
		case winner[i] == gone && w == gone:
			t.Fatalf("block %d still designated to a provider that left", i)
		case winner[i] == gone:
			moved[w]++
		case w != winner[i]:
			t.Fatalf("block %d moved from %s to %s though its node stayed", i, winner[i], w)
		}
	}
	if len(moved) < len(rest)/2 {
		t.Errorf("the leaver's %d blocks went to only %d nodes", count[gone], len(moved))
	}

	if got := Designated(blocks[0], nil, self); got != self {
		t.Errorf("alone: %s, want self", got)
	}
	if got := Designated(blocks[0], nil, ""); got != "" {
		t.Errorf("nobody: %q", got)
	}
	if got := Designated(blocks[0], others, ""); got == "" || !slices.Contains(others, got) {
		t.Errorf("no self: %q", got)
	}
}

func TestPlanOrigin(t *testing.T) {
	t.Parallel()
	peers := testPeerIDs(t, 7, 3)
	self, others := peers[0], peers[1:]
	var blocks []flat.Block
	for _, id := range randomIDs(8, 60) {
		blocks = append(blocks, flat.Block{ID: id, ULen: 1})
	}
	// self in the group: it is a candidate like the others.
	ask, own := PlanOrigin(blocks, peers, self, nil)
	total := len(own)
	for p, bs := range ask {
		if p == self || !slices.Contains(others, p) {
			t.Fatalf("asks %s", p)
		}
		total += len(bs)
		for _, b := range bs {
			if Designated(b.ID, others, self) != p {
				t.Fatalf("block %s asked of %s, not its designated fetcher", b.ID, p)
			}
		}
	}
	for _, b := range own {
		if Designated(b.ID, others, self) != self {
			t.Fatalf("block %s kept though not designated to self", b.ID)
		}
	}
	if total != len(blocks) || len(own) == 0 || len(ask) != 2 {
		t.Errorf("%d own, %d peers asked, %d blocks in all of %d", len(own), len(ask), total, len(blocks))
	}
	// self not in the group: every block goes to a member, the one every
	// member would pick.
	ask, own = PlanOrigin(blocks, others, self, nil)
	if len(own) != 0 {
		t.Errorf("not a member, yet designated for %d blocks", len(own))
	}
	for p, bs := range ask {
		for _, b := range bs {
			if Designated(b.ID, others, "") != p || Designate(b.ID, others, others[0]) != p {
				t.Fatalf("block %s asked of %s, not the group's designated fetcher", b.ID, p)
			}
		}
	}
	if ask, own := PlanOrigin(blocks, nil, self, nil); len(ask) != 0 || len(own) != len(blocks) {
		t.Errorf("alone: %d asked, %d own", len(ask), len(own))
	}

	// A member down: only its blocks move, each to the member next in the
	// block's rendezvous order (the fetcher over the group without it);
	// self is never down, and with every other member down self fetches
	// everything.
	gone := others[0]
	isGone := func(p peer.ID) bool { return p == gone || p == self }
	before, _ := PlanOrigin(blocks, peers, self, nil)
	ask, own = PlanOrigin(blocks, peers, self, isGone)
	if len(ask[gone]) != 0 {
		t.Errorf("%d blocks asked of the member that is down", len(ask[gone]))
	}
	for p, bs := range ask {
		for _, b := range bs {
			was := Designated(b.ID, peers, self)
			if was != gone && was != p {
				t.Errorf("block %s of %s, up, moved to %s", b.ID, was, p)
			}
			if want := Designated(b.ID, others[1:], self); was == gone && p != want {
				t.Errorf("block %s of the gone member went to %s, want %s", b.ID, p, want)
			}
		}
	}
	for _, b := range own {
		if was := Designated(b.ID, peers, self); was != self && was != gone {
			t.Errorf("block %s of %s, up, moved to self", b.ID, was)
		}
	}
	total = len(own)
	for _, bs := range ask {
		total += len(bs)
	}
	if total != len(blocks) || len(before[gone]) == 0 {
		t.Errorf("%d blocks planned of %d; the gone member had %d", total, len(blocks), len(before[gone]))
	}
	allDown := func(p peer.ID) bool { return true }
	if ask, own := PlanOrigin(blocks, peers, self, allDown); len(ask) != 0 || len(own) != len(blocks) {
		t.Errorf("every other member down: %d asked, %d own", len(ask), len(own))
	}
	if ask, own := PlanOrigin(blocks, others, self, allDown); len(ask) != 0 || len(own) != len(blocks) {
		t.Errorf("not a member, every member down: %d asked, %d own", len(ask), len(own))
	}
}

// Every node that found the same providers computes the same origin group,
// whatever order it found them in and whether or not it is in the group;
// a node outside the group is not in it; the group of a union is the group
// of one part's group plus the other part (which originView relies on).
func TestOriginGroup(t *testing.T) {
	t.Parallel()
	peers := testPeerIDs(t, 40, 30)
	image := flat.Sum([]byte("origin group"))
	want := OriginGroup(image, peers, "", OriginGroupSize)
	if len(want) != OriginGroupSize {
		t.Fatalf("group of %d: %v", len(want), want)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for i, self := range peers {
		found := slices.Clone(peers)
		found = slices.Delete(found, i, i+1) // a lookup does not return the node itself
		rng.Shuffle(len(found), func(a, b int) { found[a], found[b] = found[b], found[a] })
		if got := OriginGroup(image, found, self, OriginGroupSize); !slices.Equal(got, want) {
			t.Fatalf("node %d: group %v, want %v", i, got, want)
		}
	}
	a, b := peers[:17], peers[17:]
	if got := OriginGroup(image, append(OriginGroup(image, a, "", OriginGroupSize), b...), "", OriginGroupSize); !slices.Equal(got, want) {
		t.Errorf("group of a union: %v, want %v", got, want)
	}
	if got := OriginGroup(image, peers[:3], "", OriginGroupSize); len(got) != 3 {
		t.Errorf("group of 3 providers: %v", got)
	}
	if got := OriginGroup(flat.Sum([]byte("another image")), peers, "", OriginGroupSize); slices.Equal(got, want) {
		t.Error("another image has the same group")
	}
}

func TestOverShare(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		up, held int64
		share    float64
		want     bool
	}{
		{0, 0, 3, false},
		{3 * ShareFloor, 0, 3, false}, // the floor
		{3*ShareFloor + 1, 0, 3, true},
		{90 << 20, 30 << 20, 3, false},
		{91 << 20, 30 << 20, 3, true},
		{1 << 40, 1, 0, false}, // off
		{1 << 40, 1, -1, false},
	} {
		if got := OverShare(c.up, c.held, c.share); got != c.want {
			t.Errorf("OverShare(%d, %d, %v) = %v", c.up, c.held, c.share, got)
		}
	}
	if OriginSpread(3, 4) || !OriginSpread(4, 4) || !OriginSpread(1, 0) {
		t.Error("OriginSpread")
	}
}

func TestSampleProviders(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pool := make([]int, 256)
	for i := range pool {
		pool[i] = i
	}
	counts := make([]int, len(pool))
	for range 2000 {
		got := SampleProviders(pool, 32, rng)
		if len(got) != 32 {
			t.Fatalf("%d picked, want 32", len(got))
		}
		seen := map[int]bool{}
		for _, p := range got {
			if seen[p] {
				t.Fatalf("%d picked twice", p)
			}
			seen[p] = true
			counts[p]++
		}
	}
	// Every provider of the pool is picked about 2000×32/256 = 250 times,
	// not only the earliest ones.
	for p, c := range counts {
		if c < 150 || c > 350 {
			t.Fatalf("provider %d picked %d times of 2000, want about 250", p, c)
		}
	}
	if pool[0] != 0 || pool[255] != 255 {
		t.Fatal("SampleProviders modified its input")
	}
	if got := SampleProviders(pool[:5], 32, rng); len(got) != 5 {
		t.Fatalf("small pool: %d, want all 5", len(got))
	}
	if got := SampleProviders([]int(nil), 3, rng); len(got) != 0 {
		t.Fatalf("empty pool: %v", got)
	}
}

func TestFirstCopies(t *testing.T) {
	t.Parallel()
	peers := testPeerIDs(t, 41, 20)
	block := flat.Sum([]byte("first copies"))
	want := FirstCopies(block, peers, 4)
	if len(want) != 4 {
		t.Fatalf("picked %d of 20: %v", len(want), want)
	}
	// The k lowest scores, in order: compare against a full sort.
	sorted := slices.Clone(peers)
	slices.SortFunc(sorted, func(a, b peer.ID) int {
		sa, sb := firstCopyScore(block, a), firstCopyScore(block, b)
		return bytes.Compare(sa[:], sb[:])
	})
	if !slices.Equal(want, sorted[:4]) {
		t.Errorf("picked %v, want the 4 lowest scores %v", want, sorted[:4])
	}
	// Independent of arrival order and of duplicates.
	rng := rand.New(rand.NewPCG(5, 6))
	for range 10 {
		askers := append(slices.Clone(peers), peers[3], peers[7], peers[3])
		rng.Shuffle(len(askers), func(a, b int) { askers[a], askers[b] = askers[b], askers[a] })
		if got := FirstCopies(block, askers, 4); !slices.Equal(got, want) {
			t.Fatalf("shuffled with duplicates: %v, want %v", got, want)
		}
	}
	// Fewer askers than copies: all of them.
	if got := FirstCopies(block, append(peers[:2:2], peers[0]), 4); len(got) != 2 {
		t.Errorf("2 askers: picked %v", got)
	}
	if got := FirstCopies(block, peers, 0); len(got) != 0 {
		t.Errorf("k 0: picked %v", got)
	}
	// Another block picks others: over many blocks every asker gets
	// some first copies.
	count := map[peer.ID]int{}
	for i := range 200 {
		for _, p := range FirstCopies(flat.Sum(fmt.Appendf(nil, "block %d", i)), peers, 4) {
			count[p]++
		}
	}
	for _, p := range peers {
		if c := count[p]; c < 10 || c > 80 {
			t.Errorf("peer picked for %d of 200 blocks' first copies (4 of 20 each: 40 expected)", c)
		}
	}
}

func TestSpreadPolicy(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		copies, limit int
		want          bool
	}{{0, 2, false}, {1, 2, false}, {2, 2, true}, {5, 2, true}, {100, 0, false}, {100, -1, false}} {
		if got := Spread(c.copies, c.limit); got != c.want {
			t.Errorf("Spread(%d, %d) = %v, want %v", c.copies, c.limit, got, c.want)
		}
	}
	const wait = 100 * time.Millisecond
	for _, c := range []struct {
		waited time.Duration
		others bool
		want   bool
	}{{0, false, false}, {99 * time.Millisecond, false, false}, {wait, false, true}, {time.Second, true, false}} {
		if got := ForceSpread(c.waited, wait, c.others); got != c.want {
			t.Errorf("ForceSpread(%v, %v, others %v) = %v, want %v", c.waited, wait, c.others, got, c.want)
		}
	}
}

// A block's recipients list keeps the last MaxHints peers, oldest first;
// a peer that gets the block again moves to the end, once.
func TestAddRecipient(t *testing.T) {
	t.Parallel()
	var to []int
	for p := 1; p <= MaxHints+2; p++ {
		to = AddRecipient(to, p)
	}
	want := []int{3, 4, 5, 6}
	if !slices.Equal(to, want) {
		t.Fatalf("after %d recipients: %v, want %v", MaxHints+2, to, want)
	}
	kept := slices.Clone(to)
	to = AddRecipient(to, 4)
	if want := []int{3, 5, 6, 4}; !slices.Equal(to, want) {
		t.Errorf("4 again: %v, want %v", to, want)
	}
	if want := []int{3, 4, 5, 6}; !slices.Equal(kept, want) {
		t.Errorf("a clone taken before changed: %v", kept)
	}
	if to := AddRecipient(nil, 7); !slices.Equal(to, []int{7}) {
		t.Errorf("first recipient: %v", to)
	}
}
