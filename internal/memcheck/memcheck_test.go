package memcheck

import (
	"testing"
)

var sink []byte

func TestAllocated(t *testing.T) {
	got := Allocated(func() { sink = make([]byte, 1<<20) })
	if got < 1<<20 || got > 1<<20+64<<10 {
		t.Fatalf("a 1 MiB allocation measured as %d bytes", got)
	}
	before := Live()
	keep := make([]byte, 8<<20)
	if grew := Live() - before; grew < 8<<20-64<<10 || grew > 9<<20 {
		t.Errorf("holding 8 MiB: live heap grew %d bytes", grew)
	}
	keep[0] = 1
	c := Ceiling{PerByte: 2, Const: 1 << 10}
	if c.Of(100) != 1224 {
		t.Fatalf("ceiling of 100 bytes: %d", c.Of(100))
	}
}

func TestPeakRSS(t *testing.T) {
	if Race {
		t.Skip("resident set under the race detector")
	}
	r, in := PeakRSS(t, func() []byte { return []byte("100") }, func(in []byte) string {
		b := make([]byte, 100<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		sink = b
		return "touched\n" + string(in) + " MiB"
	})
	if string(in) != "100" {
		t.Errorf("input %q", in)
	}
	t.Logf("%v", r)
	if r.Out != "touched\n100 MiB" {
		t.Errorf("child returned %q", r.Out)
	}
	if r.Peak-r.Base < 100<<20 || r.Peak > r.Base+200<<20 {
		t.Errorf("touching 100 MiB: %v", r)
	}
}
