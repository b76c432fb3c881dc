package mirror

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/shoal-project/shoal/flat"
)

// rangeSwarm is the other nodes of a pull, in process: this node is
// designated for the even ranges, "liar" for the odd ones. liar sends
// the blob's bytes with one byte flipped for the ranges in bad, nothing
// (after a bounded wait) for those in silent, and the true bytes
// otherwise. It holds no whole blob (no providers).
type rangeSwarm struct {
	blob   []byte
	bad    []int
	silent []int
	down   bool // JoinPull fails: no peer connected

	mu      sync.Mutex
	strikes []string
	asked   []int
}

func (s *rangeSwarm) Providers(context.Context, string) ([]string, error) { return nil, nil }
func (s *rangeSwarm) Recipe(context.Context, string, string) ([]byte, error) {
	return nil, errors.New("no recipe")
}
func (s *rangeSwarm) Blocks(context.Context, string, string, []flat.Block) (map[flat.BlockID][]byte, error) {
	return nil, nil
}
func (s *rangeSwarm) Provide(context.Context, string) error { return nil }

func (s *rangeSwarm) Strike(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.strikes = append(s.strikes, p)
}

func (s *rangeSwarm) JoinPull(context.Context, string) (int, error) {
	if s.down {
		return 0, errors.New("no peer connected")
	}
	return 2, nil
}

func (s *rangeSwarm) Designated(_ string, i int) bool { return i%2 == 0 }

func (s *rangeSwarm) Elsewhere(context.Context, string, int, int64) ([]byte, string, bool) {
	return nil, "", false
}

func (s *rangeSwarm) Range(ctx context.Context, _ string, i int, n int64) ([]byte, string, error) {
	s.mu.Lock()
	s.asked = append(s.asked, i)
	s.mu.Unlock()
	if slices.Contains(s.silent, i) {
		select {
		case <-time.After(50 * time.Millisecond): // the swarm's bounded wait, shortened
		case <-ctx.Done():
		}
		return nil, "", errors.New("designee delivered nothing in time")
	}
	off := int64(i) * ChunkSize
	data := slices.Clone(s.blob[off : off+n])
	if slices.Contains(s.bad, i) {
		data[len(data)/2] ^= 0xff
	}
	return data, "liar", nil
}

// TestPullRanges: a blob nobody holds is pulled in ranges — the even
// ones upstream, the odd ones from the peer designated for them — and a
// client gets the exact bytes whatever that peer does: wrong bytes for a
// range (found when the blob fails its digest; the range is read upstream
// again, the peer struck once per wrong range, and nothing of the wrong
// blob reaches the client), silence (the range is read upstream after the
// wait), or the swarm down (the blob streams from upstream).
func TestPullRanges(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		bad, silent  []int
		down         bool
		wantStrikes  int
		wantUpstream func(size int64) int64 // layer bytes read upstream
	}{
		{name: "honest", wantUpstream: evenRanges},
		{name: "lying", bad: []int{1, 3}, wantStrikes: 2, wantUpstream: func(size int64) int64 { return evenRanges(size) + (size - evenRanges(size)) }},
		{name: "silent", silent: []int{1}, wantUpstream: func(size int64) int64 { return evenRanges(size) + ChunkSize }},
		{name: "swarm down", down: true, wantUpstream: func(size int64) int64 { return size }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := startUpstream(t)
			blob, digest := up.pushBlob(t, "app:v1", 5<<20+12345)
			size := int64(len(blob))
			sw := &rangeSwarm{blob: blob, bad: tc.bad, silent: tc.silent, down: tc.down}
			r := startMirror(t, up, nil, sw, nil)
			up.blobBytes.Store(0)
			r.pull(t, "app:v1")
			got := up.blobBytes.Load()
			// The config (a few hundred bytes) comes upstream whole.
			if want := tc.wantUpstream(size); got < want || got > want+4096 {
				t.Errorf("upstream sent %d bytes, want %d (+ the config)", got, want)
			}
			st := r.m.Stats()
			sw.mu.Lock()
			strikes := len(sw.strikes)
			sw.mu.Unlock()
			if strikes != tc.wantStrikes || st.RangesBad != int64(tc.wantStrikes) {
				t.Errorf("%d strikes, %d bad ranges; want %d", strikes, st.RangesBad, tc.wantStrikes)
			}
			pulls := r.m.Pulls()
			if tc.down {
				if len(pulls) != 0 || st.Pulls != 0 {
					t.Errorf("swarm down: %d pulls listed, %d counted; want none", len(pulls), st.Pulls)
				}
				return
			}
			if len(pulls) != 1 || pulls[0].Digest != digest || pulls[0].Done != pulls[0].Ranges || pulls[0].Err != "" || pulls[0].Ended.IsZero() {
				t.Fatalf("pulls: %+v, want %s done", pulls, digest)
			}
			if p := pulls[0]; p.FromPeers+p.FromUpstream < size {
				t.Errorf("pull of %d bytes: %d from peers, %d upstream", size, p.FromPeers, p.FromUpstream)
			}
		})
	}
}

// evenRanges is how many bytes of a blob of size bytes its even ranges
// hold.
func evenRanges(size int64) int64 {
	var n int64
	for off, i := int64(0), 0; off < size; off, i = off+ChunkSize, i+1 {
		if i%2 == 0 {
			n += min(ChunkSize, size-off)
		}
	}
	return n
}
