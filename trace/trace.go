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
	"strings"
	"time"
)

// Version is the trace format version this package writes and reads.
const Version = 1

// MediaType is the media type of a trace blob, and the artifactType of the
// manifest that publishes one.
const MediaType = "application/vnd.shoal.trace.v1+json"

// MaxEvents bounds a decoded trace (a 5 GB image of 256 KiB blocks has
// ~20k blocks; this leaves room for small-block images).
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

// UnmarshalJSON reads microseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var us int64
	if err := json.Unmarshal(b, &us); err != nil {
		return err
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

// Decode reads and validates a trace; at most maxBytes are read (0: 64 MiB).
func Decode(r io.Reader, maxBytes int64) (*Trace, error) {
	if maxBytes <= 0 {
		maxBytes = 64 << 20
	}
	data, err := io.ReadAll(io.LimitReader(r, maxBytes+1))
	if err != nil {
		return nil, fmt.Errorf("trace: read: %w", err)
	}
	if int64(len(data)) > maxBytes {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrMalformed, maxBytes)
	}
	return Unmarshal(data)
}

// Unmarshal decodes and validates a trace.
func Unmarshal(data []byte) (*Trace, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var t Trace
	if err := dec.Decode(&t); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data", ErrMalformed)
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &t, nil
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
