package trace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/memcheck"
	"github.com/shoal-project/shoal/internal/testenv"
)

const img = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func index(n int) *flat.Index {
	x := &flat.Index{Blocks: make([]flat.Block, n)}
	for i := range x.Blocks {
		x.Blocks[i] = flat.Block{ULen: uint32(1000 + i), CLen: uint32(500 + i)}
	}
	return x
}

func sample() *Trace {
	return &Trace{Version: Version, Image: img, Blocks: 10, ImageBytes: 10 << 20, StoredBytes: 4 << 20,
		Recorded: time.Date(2026, 11, 24, 1, 0, 0, 0, time.UTC), Window: Duration(30 * time.Second),
		Command: "python3 -c pass",
		Events: []Event{{Block: 3, At: 0, Wait: Duration(40 * time.Millisecond), Size: 262144, Stored: 90000},
			{Block: 0, At: Duration(41 * time.Millisecond), Wait: 0, Size: 1000, Stored: 800},
			{Block: 9, At: Duration(55 * time.Millisecond), Wait: Duration(time.Millisecond), Size: 5, Stored: 5}}}
}

func TestRoundTrip(t *testing.T) {
	tr := sample()
	data, err := Marshal(tr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Unmarshal(data)
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	if fmt.Sprint(got) != fmt.Sprint(tr) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, tr)
	}
	if got := got.BlockOrder(); fmt.Sprint(got) != "[3 0 9]" {
		t.Errorf("order %v", got)
	}
	if s, c := tr.Bytes(); s != 262144+1000+5 || c != 90000+800+5 {
		t.Errorf("bytes %d %d", s, c)
	}
}

func TestRejectsMalformed(t *testing.T) {
	good, _ := Marshal(sample())
	cases := map[string]func(*Trace){
		"version":       func(t *Trace) { t.Version = 2 },
		"image":         func(t *Trace) { t.Image = "latest" },
		"block range":   func(t *Trace) { t.Events[1].Block = 10 },
		"duplicate":     func(t *Trace) { t.Events[2].Block = 3 },
		"time order":    func(t *Trace) { t.Events[2].At = 0 },
		"more than all": func(t *Trace) { t.Blocks = 2 },
		"negative size": func(t *Trace) { t.ImageBytes = -1 },
	}
	for name, mutate := range cases {
		tr := sample()
		mutate(tr)
		if _, err := Marshal(tr); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Marshal: %v", name, err)
		}
	}
	raw := map[string]string{
		"unknown field": strings.Replace(string(good), `"version"`, `"extra":1,"version"`, 1),
		"trailing":      string(good) + "{}",
		"negative time": strings.Replace(string(good), `"t":0`, `"t":-5`, 1),
		"not json":      "\x00\x01",
		"empty":         "",
	}
	for name, s := range raw {
		if _, err := Unmarshal([]byte(s)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := Decode(bytes.NewReader(good), 10); !errors.Is(err, ErrMalformed) {
		t.Errorf("size limit: %v", err)
	}
}

func TestRecorder(t *testing.T) {
	x := index(200)
	r := NewRecorder(img, x, 0)
	start := time.Now()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				b := uint32((i*7 + g) % 200)
				r.Touch(b, start.Add(time.Duration(i)*time.Millisecond), time.Microsecond)
			}
		}()
	}
	wg.Wait()
	r.Touch(5000, time.Now(), 0) // outside the table: ignored
	tr := r.Trace()
	if err := tr.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(tr.Events) != 200 || tr.Blocks != 200 {
		t.Fatalf("%d events, %d blocks", len(tr.Events), tr.Blocks)
	}
	var size int64
	for _, b := range x.Blocks {
		size += int64(b.ULen)
	}
	if tr.ImageBytes != size {
		t.Errorf("image bytes %d, want %d", tr.ImageBytes, size)
	}
	for _, e := range tr.Events {
		if e.Size != x.Blocks[e.Block].ULen || e.Stored != x.Blocks[e.Block].CLen {
			t.Fatalf("event %+v: sizes not from the index", e)
		}
	}
}

func TestRecorderWindow(t *testing.T) {
	r := NewRecorder(img, index(10), 50*time.Millisecond)
	now := time.Now()
	r.Touch(1, now, 0)
	r.Touch(1, now.Add(time.Millisecond), 0) // second touch: ignored
	r.Touch(2, now.Add(time.Second), 0)      // after the window: ends recording
	select {
	case <-r.Done():
	default:
		t.Fatal("recording did not end after the window")
	}
	r.Touch(3, now.Add(2*time.Millisecond), 0)
	if tr := r.Trace(); len(tr.Events) != 1 || tr.Events[0].Block != 1 {
		t.Fatalf("events %+v", tr.Events)
	}
}

// pushSubject pushes a small image to stand for the flat image and returns
// its reference and digest.
func pushSubject(t *testing.T, ref string) (string, string) {
	t.Helper()
	im, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, im); err != nil {
		t.Fatal(err)
	}
	d, _ := im.Digest()
	return ref, d.String()
}

func testPublish(t *testing.T, host string) {
	ctx := context.Background()
	ref, digest := pushSubject(t, host+"/app:v1-shoal")
	no := []name.Option{name.Insecure}

	if _, err := Find(ctx, ref, digest, no); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Find before any push: %v", err)
	}
	old := sample()
	old.Image = digest
	if _, err := Push(ctx, ref, old, no); err != nil {
		t.Fatal(err)
	}
	newer := sample()
	newer.Image = digest
	newer.Events = newer.Events[:2]
	time.Sleep(2 * time.Millisecond) // distinct creation times
	if _, err := Push(ctx, ref, newer, no); err != nil {
		t.Fatal(err)
	}
	got, err := Find(ctx, ref, digest, no)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got.Events) != fmt.Sprint(newer.Events) {
		t.Fatalf("found %+v, want the newest %+v", got.Events, newer.Events)
	}

	// The tag still names the same image.
	r, _ := name.ParseReference(ref, name.Insecure)
	d, err := remote.Head(r)
	if err != nil || d.Digest.String() != digest {
		t.Fatalf("tag moved: %v %v", d, err)
	}

	// A trace for another image cannot be pushed as this image's.
	other := sample()
	if _, err := Push(ctx, ref, other, no); err == nil {
		t.Fatal("pushed a trace for an image the repository does not hold")
	}
}

// TestPublishRealRegistry runs against Debian's docker-registry, which has no
// referrers API: the trace is found through the referrers tag schema.
func TestPublishRealRegistry(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testPublish(t, reg.Host)
}

// TestPublishReferrersAPI runs against go-containerregistry's registry,
// which serves the referrers API.
func TestPublishReferrersAPI(t *testing.T) {
	s := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(s.Close)
	testPublish(t, strings.TrimPrefix(s.URL, "http://"))
}

// FuzzUnmarshal: traces come from registries and are untrusted; whatever
// the bytes, Unmarshal returns a valid trace or ErrMalformed, never panics
// nor allocates past traceCeiling, and what it accepts re-encodes to a
// trace that decodes the same.
// traceCeiling bounds what decoding n bytes of trace may allocate: events
// of 32 bytes for as few as 3 bytes of JSON, in a slice that doubles, the
// decoder's buffer, and strings no longer than the input.
var traceCeiling = memcheck.Ceiling{PerByte: 64, Const: 64 << 10}

func FuzzUnmarshal(f *testing.F) {
	good, _ := Marshal(sample())
	f.Add(good)
	f.Add([]byte(`{"version":1,"image":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","blocks":1,"image_bytes":1,"stored_bytes":1,"recorded":"2026-01-01T00:00:00Z","window":0,"events":[{"b":0,"t":0,"w":0,"s":1,"c":1}]}`))
	f.Add([]byte(`{}`))
	// A stream of empty events: 32 bytes each out of 3.
	f.Add([]byte(`{"events":[{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var tr *Trace
		var err error
		traceCeiling.Check(t, len(data), func() { tr, err = Unmarshal(data) })
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not ErrMalformed: %v", err)
			}
			return
		}
		again, err := Marshal(tr)
		if err != nil {
			t.Fatalf("accepted trace does not re-encode: %v", err)
		}
		tr2, err := Unmarshal(again)
		if err != nil || fmt.Sprint(tr2) != fmt.Sprint(tr) {
			t.Fatalf("round trip changed the trace: %v", err)
		}
	})
}
