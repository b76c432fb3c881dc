package fetch

import (
	"fmt"
	"testing"
	"time"

	"github.com/shoal-project/shoal/flat"
)

func TestPlan(t *testing.T) {
	t.Parallel()
	blk := func(n byte, blob uint32, off uint64, clen uint32) flat.Block {
		return flat.Block{ID: flat.BlockID{n}, Blob: blob, Offset: off, CLen: clen, ULen: clen}
	}
	a, b, c := blk(1, 0, 0, 100), blk(2, 0, 100, 100), blk(3, 0, 200, 100) // back to back
	far := blk(4, 0, 1000, 100)
	other := blk(5, 1, 100, 100)
	huge := blk(6, 0, 2000, 5000)
	tests := []struct {
		name     string
		blocks   []flat.Block
		gap, max int64
		want     string // spans as blob:start-end[ids]
	}{
		{name: "empty", gap: 64, max: 1000, want: "[]"},
		{name: "adjacent merge", blocks: []flat.Block{a, b, c}, gap: 0, max: 1000, want: "[0:0-300[1 2 3]]"},
		{name: "unsorted input", blocks: []flat.Block{c, a, b}, gap: 0, max: 1000, want: "[0:0-300[1 2 3]]"},
		{name: "duplicates", blocks: []flat.Block{a, a, b}, gap: 0, max: 1000, want: "[0:0-200[1 2]]"},
		{name: "gap within limit", blocks: []flat.Block{a, c}, gap: 100, max: 1000, want: "[0:0-300[1 3]]"},
		{name: "gap too wide", blocks: []flat.Block{a, c}, gap: 99, max: 1000, want: "[0:0-100[1] 0:200-300[3]]"},
		{name: "far block", blocks: []flat.Block{a, b, far}, gap: 64, max: 10000, want: "[0:0-200[1 2] 0:1000-1100[4]]"},
		{name: "cap splits", blocks: []flat.Block{a, b, c}, gap: 0, max: 200, want: "[0:0-200[1 2] 0:200-300[3]]"},
		{name: "cap exact", blocks: []flat.Block{a, b, c}, gap: 0, max: 300, want: "[0:0-300[1 2 3]]"},
		{name: "other blob never merges", blocks: []flat.Block{a, other}, gap: 1 << 20, max: 1 << 20, want: "[0:0-100[1] 1:100-200[5]]"},
		{name: "block over the cap goes alone", blocks: []flat.Block{far, huge}, gap: 1 << 20, max: 1000, want: "[0:1000-1100[4] 0:2000-7000[6]]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := append([]flat.Block(nil), tt.blocks...)
			var parts []string
			for _, s := range plan(tt.blocks, tt.gap, tt.max) {
				ids := make([]byte, 0, len(s.blocks))
				for _, b := range s.blocks {
					ids = append(ids, b.ID[0])
				}
				parts = append(parts, fmt.Sprintf("%d:%d-%d%v", s.blob, s.start, s.end, ids))
			}
			if got := fmt.Sprint(parts); got != tt.want && !(len(parts) == 0 && tt.want == "[]") {
				t.Errorf("plan = %s, want %s", got, tt.want)
			}
			for i := range in {
				if in[i] != tt.blocks[i] {
					t.Fatal("plan reordered its argument")
				}
			}
		})
	}
}

func TestParseContentRange(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in          string
		first, last int64
		ok          bool
	}{
		{"bytes 0-99/1000", 0, 99, true},
		{"bytes 100-199/*", 100, 199, true},
		{"bytes 5-4/10", 0, 0, false},
		{"bytes */1000", 0, 0, false},
		{"items 0-1/2", 0, 0, false},
		{"", 0, 0, false},
		{"bytes -1-5/10", 0, 0, false},
	}
	for _, tt := range tests {
		first, last, err := parseContentRange(tt.in)
		if (err == nil) != tt.ok || first != tt.first || last != tt.last {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", tt.in, first, last, err)
		}
	}
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	c := defaults()
	for n := 1; n <= 40; n++ {
		window := min(DefaultBackoff<<min(n-1, 20), c.maxBackoff)
		if d := c.retryDelay(n, nil); d <= 0 || d > window {
			t.Errorf("retry %d: delay %v outside (0, %v]", n, d, window)
		}
	}
	if d := c.retryDelay(1, &statusError{code: 429, retryAfter: 3 * time.Second}); d != 3*time.Second {
		t.Errorf("Retry-After 3s: delay %v", d)
	}
	if err := WithRetries(3, 0)(&c); err != nil {
		t.Fatal(err)
	}
	if d := c.retryDelay(5, nil); d != 0 {
		t.Errorf("no backoff: delay %v", d)
	}
}
