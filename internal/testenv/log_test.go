package testenv

import (
	"fmt"
	"strings"
	"testing"
)

// TestTailBuffer: the buffer keeps at least the last logKeep bytes and at
// most twice that, whole lines at the end, and says when it cut.
func TestTailBuffer(t *testing.T) {
	var b tailBuffer
	line := func(i int) string { return fmt.Sprintf("line %07d %s\n", i, strings.Repeat("x", 100)) }
	n := 0
	for total := 0; total < 5*logKeep; n++ {
		l := line(n)
		if _, err := b.Write([]byte(l)); err != nil {
			t.Fatal(err)
		}
		total += len(l)
		if got := b.buf.Len(); got > 2*logKeep+len(l) {
			t.Fatalf("buffer holds %d bytes, over twice %d", got, logKeep)
		}
	}
	out := b.buf.String()
	if !b.cut || len(out) < logKeep {
		t.Fatalf("cut %v, %d bytes kept, want at least %d", b.cut, len(out), logKeep)
	}
	if !strings.HasSuffix(out, line(n-1)) {
		t.Errorf("last line lost: ends %q", out[len(out)-40:])
	}
}
