package trace

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"testing"

	"github.com/shoal-project/shoal/internal/memcheck"
)

// eventBomb streams a trace of n empty events, "{}" each: 3 bytes of JSON
// for a 32-byte Event.
func eventBomb(n int) io.Reader {
	head := `{"version":1,"image":"sha256:` + strings.Repeat("0", 64) + `","blocks":2147483648,"image_bytes":0,"stored_bytes":0,"recorded":"2026-01-01T00:00:00Z","window":0,"events":[{}`
	return io.MultiReader(strings.NewReader(head), &repeatReader{s: ",{}", n: n - 1}, strings.NewReader("]}"))
}

type repeatReader struct {
	s   string
	n   int
	off int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	k := 0
	for k < len(p) && r.n > 0 {
		c := copy(p[k:], r.s[r.off:])
		k += c
		if r.off += c; r.off == len(r.s) {
			r.off = 0
			r.n--
		}
	}
	if k == 0 {
		return 0, io.EOF
	}
	return k, nil
}

// The trace bomb: 64 MiB of JSON (the most a registry's trace may hold)
// holding 22 million empty events. Decode read it all, copied it, and
// decoded every event before it counted them: 1.5 GB allocated, 1.1 GB
// resident. It now stops at the first event past MaxEvents.
func TestTraceBomb(t *testing.T) {
	const n = 22_000_000
	memcheck.UnderBar(t, func() []byte { return []byte(strconv.Itoa(n)) }, func(in []byte) string {
		k, _ := strconv.Atoi(string(in))
		_, err := Decode(eventBomb(k), maxTraceBytes)
		return fmt.Sprint(err)
	})
	var err error
	got := memcheck.Allocated(func() { _, err = Decode(eventBomb(n), maxTraceBytes) })
	t.Logf("%d empty events: %d bytes allocated: %v", n, got, err)
	want := fmt.Sprintf("more than %d events", MaxEvents)
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), want) {
		t.Errorf("got %v, want ErrMalformed saying %q", err, want)
	}
	// MaxEvents events of 32 bytes, and the slice's growth.
	if got > 128<<20 {
		t.Errorf("the trace bomb allocated %d bytes", got)
	}
}

// Past maxBytes, Decode stops reading and says so; a reader's own failure
// is a read error, not a malformed trace; and it reads to the end, which a
// verifying reader needs to check its digest.
func TestDecodeBounds(t *testing.T) {
	good, err := Marshal(sample())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(strings.NewReader(string(good)), int64(len(good)-1)); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("one byte over: %v", err)
	}
	if _, err := Decode(strings.NewReader(string(good)), int64(len(good))); err != nil {
		t.Errorf("at the limit: %v", err)
	}
	boom := errors.New("connection reset")
	if _, err := Decode(io.MultiReader(strings.NewReader(string(good[:20])), errReader{boom}), 0); !errors.Is(err, boom) || errors.Is(err, ErrMalformed) {
		t.Errorf("read error: %v", err)
	}
	if _, err := Decode(io.MultiReader(strings.NewReader(string(good)), errReader{boom}), 0); !errors.Is(err, boom) {
		t.Errorf("read error after the trace: %v", err)
	}
	for _, in := range []string{string(good) + "{}", string(good) + "x", `{"events":[]} []`} {
		if _, err := Unmarshal([]byte(in)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%.40q…: %v", in, err)
		}
	}
	// Keys match as encoding/json matches them.
	upper := strings.Replace(string(good), `"events"`, `"Events"`, 1)
	if tr, err := Unmarshal([]byte(upper)); err != nil || len(tr.Events) != len(sample().Events) {
		t.Errorf("\"Events\": %v", err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }
