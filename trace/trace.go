// Package trace records, stores and publishes block-access traces: the order
// in which a container first touched the blocks of a flat image during its
// start-up.
//
// A trace is what lets a later mount of the same image fetch the start-up
// working set first, in order and in large merged requests, instead of
// discovering it one page fault at a time (the prefetch at mount in node and
// seeder), and it is the workload the simulator replays.
//
// Design choices:
//
//   - Block numbers, not paths: an event names a block by its position in the
//     flat index's block table. A trace therefore belongs to exactly one flat
//     image (Image, the flat manifest digest) and is ignored for any other;
//     a rebuilt image gets a new trace from its first run.
//   - First touch only, demand reads only: readahead, prefetch and the page
//     cache's later hits are not the application's working set.
//   - Time and wait per event: At is when the application first asked for
//     the block, Wait how long that read waited for it. At minus the waits
//     before it is the application's own time between reads, which is what a
//     replay (the simulator) needs: recorded gaps include the recording
//     node's fetch latency.
//   - JSON, versioned: traces are small (tens of bytes per block touched,
//     ~100 KB for 2,000 blocks), readable with jq, and are untrusted input
//     when they come from a registry, so Decode validates every field.
//   - Published as an OCI artifact whose subject is the flat manifest
//     (Push, Find): registries with the referrers API list it there, others
//     through the referrers tag schema (tag sha256-<hex> holding an index),
//     which go-containerregistry maintains. The flat image and its tags are
//     never touched.
package trace

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Version is the trace format version this package writes and reads.
const Version = 1

// MediaType is the media type of a trace blob, and the artifactType of the
// manifest that publishes one.
const MediaType = "application/vnd.shoal.trace.v1+json"

// MaxEvents bounds a decoded trace (a 5 GB image of 256 KiB blocks has
// ~20k blocks; this leaves room for small-block images). Decode stops at
// the first event past it: 1 Mi events take 32 MiB.
const MaxEvents = 1 << 20

// ErrMalformed is wrapped by every Decode error about the content.
var ErrMalformed = errors.New("trace: malformed")

// Trace is the first-touch order of the blocks of one flat image.
type Trace struct {
	Version int `json:"version"`
	// Image is the digest of the flat image's manifest ("sha256:...").
	Image string `json:"image"`
	// Blocks, ImageBytes and StoredBytes describe the whole image: the
	// number of blocks in the index, their uncompressed and stored
	// (compressed, as fetched) sizes. A replay needs them for full fills.
	Blocks      int   `json:"blocks"`
	ImageBytes  int64 `json:"image_bytes"`
	StoredBytes int64 `json:"stored_bytes"`
	// Recorded is when recording started; Window how long it lasted.
	Recorded time.Time `json:"recorded"`
	Window   Duration  `json:"window"`
	// Command is what ran, for people reading the trace.
	Command string  `json:"command,omitempty"`
	Events  []Event `json:"events"`
}

// Event is the first touch of one block.
type Event struct {
	Block  uint32   `json:"b"` // position in the index's block table
	At     Duration `json:"t"` // since recording started
	Wait   Duration `json:"w"` // how long the touching read waited for the block
	Size   uint32   `json:"s"` // uncompressed bytes
	Stored uint32   `json:"c"` // stored (compressed) bytes
}

// Duration is a time.Duration written as integer microseconds.
type Duration time.Duration

// MarshalJSON writes microseconds.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(fmt.Sprint(time.Duration(d).Microseconds())), nil
}

// UnmarshalJSON reads microseconds. It parses the number itself: an
// encoding/json decoder for each of a trace's million durations would
// cost more than the trace.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	us, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return fmt.Errorf("duration %s: not a whole number of microseconds", b)
	}
	if us < 0 || us > int64(365*24*time.Hour/time.Microsecond) {
		return fmt.Errorf("duration %dus out of range", us)
	}
	*d = Duration(time.Duration(us) * time.Microsecond)
	return nil
}

// Encode writes t as JSON.
func Encode(w io.Writer, t *Trace) error {
	if err := t.Validate(); err != nil {
		return err
	}
	enc := json.NewEncoder(w)
	return enc.Encode(t)
}

// Marshal returns t encoded.
func Marshal(t *Trace) ([]byte, error) {
	var b bytes.Buffer
	if err := Encode(&b, t); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// DefaultMaxBytes bounds a trace Decode reads when its caller sets no
// bound: MaxEvents events as the encoder writes them take about 60 MB.
const DefaultMaxBytes = 64 << 20

// Decode reads and validates a trace; at most maxBytes are read (0:
// DefaultMaxBytes). It reads as it decodes, so what it holds is the
// events read so far, never the whole input, and stops at the first event
// past MaxEvents. It reads to the end of r: nothing but white space may
// follow the trace.
func Decode(r io.Reader, maxBytes int64) (*Trace, error) {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBytes
	}
	in := &boundedReader{r: r, left: maxBytes, max: maxBytes}
	t, err := decode(in)
	switch {
	case in.tooLarge:
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrMalformed, maxBytes)
	case in.err != nil:
		return nil, fmt.Errorf("trace: read: %w", in.err)
	case err != nil:
		return nil, err
	}
	return t, nil
}

// Unmarshal decodes and validates a trace.
func Unmarshal(data []byte) (*Trace, error) {
	return Decode(bytes.NewReader(data), max(int64(len(data)), 1))
}

// decode parses a trace token by token: the fields of the object, and the
// events one at a time, so that the events slice grows with the events
// read and stops at MaxEvents. Keys match as encoding/json matches them
// (case-insensitively); unknown keys and trailing data are errors.
func decode(r io.Reader) (*Trace, error) {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	var t Trace
	fields := []field{
		{"version", &t.Version}, {"image", &t.Image}, {"blocks", &t.Blocks},
		{"image_bytes", &t.ImageBytes}, {"stored_bytes", &t.StoredBytes},
		{"recorded", &t.Recorded}, {"window", &t.Window}, {"command", &t.Command},
	}
	bad := func(err error) (*Trace, error) { return nil, fmt.Errorf("%w: %v", ErrMalformed, err) }
	if err := expect(dec, json.Delim('{')); err != nil {
		return bad(err)
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return bad(err)
		}
		key, _ := tok.(string) // an object's keys are strings, or Token fails
		if strings.EqualFold(key, "events") {
			if err := decodeEvents(dec, &t.Events); err != nil {
				return bad(err)
			}
			continue
		}
		i := slices.IndexFunc(fields, func(f field) bool { return strings.EqualFold(f.name, key) })
		if i < 0 {
			return bad(fmt.Errorf("unknown field %q", key))
		}
		if err := dec.Decode(fields[i].v); err != nil {
			return bad(fmt.Errorf("%s: %w", fields[i].name, err))
		}
	}
	if err := expect(dec, json.Delim('}')); err != nil {
		return bad(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: trailing data", ErrMalformed)
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &t, nil
}

// field is a trace field other than the events: its JSON name, and where
// it goes.
type field struct {
	name string
	v    any
}

// decodeEvents decodes the events array (or null) one event at a time.
func decodeEvents(dec *json.Decoder, events *[]Event) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil {
		*events = nil
		return nil
	}
	if tok != json.Delim('[') {
		return fmt.Errorf("events: %v, want an array", tok)
	}
	ev := (*events)[:0]
	for dec.More() {
		n := len(ev)
		if n == MaxEvents {
			return fmt.Errorf("more than %d events", MaxEvents)
		}
		if n == cap(ev) {
			// Doubling: half the garbage of append's growth, whose
			// copies of a large slice would outweigh the events.
			ev = append(make([]Event, 0, min(MaxEvents, max(2*n, 64))), ev...)
		}
		ev = ev[:n+1]
		ev[n] = Event{}
		if err := dec.Decode(&ev[n]); err != nil {
			return fmt.Errorf("event %d: %w", n, err)
		}
	}
	*events = ev
	return expect(dec, json.Delim(']'))
}

func expect(dec *json.Decoder, d json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok != d {
		return fmt.Errorf("%v where %v belongs", tok, d)
	}
	return nil
}

// boundedReader reads at most max bytes of r; one byte more makes it fail.
// It keeps the error it met, so that Decode can tell a read error, or too
// large an input, from a malformed one.
type boundedReader struct {
	r        io.Reader
	left     int64
	max      int64
	tooLarge bool
	err      error
}

var errTooLarge = errors.New("too large")

func (b *boundedReader) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, errTooLarge
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		b.tooLarge = true
		return n, errTooLarge
	}
	if err != nil && !errors.Is(err, io.EOF) && b.err == nil {
		b.err = err
	}
	return n, err
}

// ReadFile reads and validates a trace file.
func ReadFile(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	defer f.Close()
	t, err := Decode(f, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// WriteFile writes t to path atomically.
func WriteFile(path string, t *Trace) error {
	data, err := Marshal(t)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("trace: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("trace: %w", err)
	}
	return nil
}

// Validate checks the invariants Decode relies on: a known version, an image
// digest, events naming distinct blocks inside the table, in time order.
func (t *Trace) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, a...))
	}
	switch {
	case t.Version != Version:
		return bad("version %d, want %d", t.Version, Version)
	case !strings.HasPrefix(t.Image, "sha256:") || len(t.Image) != len("sha256:")+64:
		return bad("image %q is not a sha256 digest", t.Image)
	case t.Blocks < 0 || t.Blocks > 1<<31:
		return bad("%d blocks", t.Blocks)
	case t.ImageBytes < 0 || t.StoredBytes < 0:
		return bad("negative image size")
	case len(t.Events) > MaxEvents || len(t.Events) > t.Blocks:
		return bad("%d events for %d blocks", len(t.Events), t.Blocks)
	}
	seen := make(map[uint32]struct{}, len(t.Events))
	var last Duration
	for i, e := range t.Events {
		if int64(e.Block) >= int64(t.Blocks) {
			return bad("event %d: block %d outside the table of %d", i, e.Block, t.Blocks)
		}
		if _, dup := seen[e.Block]; dup {
			return bad("event %d: block %d touched twice", i, e.Block)
		}
		seen[e.Block] = struct{}{}
		if e.At < last {
			return bad("event %d: time goes backwards", i)
		}
		last = e.At
	}
	return nil
}

// BlockOrder returns the touched blocks in first-touch order.
func (t *Trace) BlockOrder() []uint32 {
	out := make([]uint32, len(t.Events))
	for i, e := range t.Events {
		out[i] = e.Block
	}
	return out
}

// Bytes returns the uncompressed and stored bytes of the touched blocks.
func (t *Trace) Bytes() (size, stored int64) {
	for _, e := range t.Events {
		size += int64(e.Size)
		stored += int64(e.Stored)
	}
	return size, stored
}
