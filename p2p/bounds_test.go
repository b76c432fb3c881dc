package p2p

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"testing"

	"github.com/shoal-project/shoal/internal/memcheck"
)

// stalled is a stream that delivers a frame's length prefix and then
// nothing until it is closed: a peer that waits out the read deadline.
type stalled struct {
	prefix  []byte
	waiting chan struct{} // closed at the first Read after the prefix: the reader wants the payload
	done    chan struct{}
}

func newStalled(n int) *stalled {
	return &stalled{prefix: binary.AppendUvarint(nil, uint64(n)), waiting: make(chan struct{}), done: make(chan struct{})}
}

// Read is called by one reader at a time.
func (s *stalled) Read(p []byte) (int, error) {
	if len(s.prefix) > 0 {
		n := copy(p, s.prefix)
		s.prefix = s.prefix[n:]
		return n, nil
	}
	select {
	case <-s.waiting:
	default:
		close(s.waiting)
	}
	<-s.done
	return 0, io.EOF
}

// holdPrefixes starts n readers of have hellos (as handleHave reads them)
// on streams that send a full-size hello's length and then stall, waits
// until every prefix is read, and returns a function that ends them.
func holdPrefixes(n int) (release func()) {
	var wg sync.WaitGroup
	streams := make([]*stalled, n)
	for i := range streams {
		streams[i] = newStalled(maxHelloFrame)
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = readFrame(bufio.NewReaderSize(streams[i], 4096), maxHelloFrame, nil)
		}()
	}
	// A reader that asks for the payload has read the length and done
	// whatever it does with it (allocate the frame, or not): what the
	// caller measures has happened.
	for _, s := range streams {
		<-s.waiting
	}
	return func() {
		for _, s := range streams {
			close(s.done)
		}
		wg.Wait()
	}
}

// A have hello's length prefix alone, with no payload behind it, held
// 1 MiB until the read deadline (issue 17). The reader now allocates as
// the payload arrives: a few KiB for a prefix.
func TestBarePrefixAllocatesLittle(t *testing.T) {
	// The count is the process's: the least of a few tries is the
	// reader's own, without what other goroutines allocated meanwhile.
	got := uint64(math.MaxUint64)
	for range 3 {
		var release func()
		got = min(got, memcheck.Allocated(func() { release = holdPrefixes(1) }))
		release()
	}
	t.Logf("a stalled hello prefix claiming %d bytes holds %d bytes", maxHelloFrame, got)
	if got > 64<<10 {
		t.Errorf("a stalled hello prefix claiming %d bytes holds %d bytes", maxHelloFrame, got)
	}

	// A prefix and then the end of the stream: one clear error, little
	// allocated.
	r := bufio.NewReader(newEOFAfterPrefix(maxHelloFrame))
	var err error
	got = memcheck.Allocated(func() { _, err = readFrame(r, maxHelloFrame, nil) })
	if !errors.Is(err, io.ErrUnexpectedEOF) || got > 64<<10 {
		t.Errorf("prefix then EOF: %v, %d bytes allocated", err, got)
	}

	// Bytes that arrive are read whole, whatever their chunks.
	for _, n := range []int{0, 1, frameChunk - 1, frameChunk, frameChunk + 1, 3*frameChunk + 7, maxHelloFrame} {
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte(i)
		}
		frame := appendFrame(nil, payload)
		for _, buf := range [][]byte{nil, make([]byte, 0, 10), make([]byte, 0, n)} {
			p, err := readFrame(bufio.NewReaderSize(&trickle{b: frame}, 16), maxHelloFrame, buf)
			if err != nil || string(p) != string(payload) {
				t.Fatalf("%d bytes (buf cap %d): %d bytes back, %v", n, cap(buf), len(p), err)
			}
		}
	}
}

// A node that many peers open have streams to, each sending a bare hello
// prefix and then waiting: 200 of them held 200 MiB of heap. (Not all of
// it resident at once in a fresh process, whose new pages are not touched
// until written; in a daemon whose heap has been used, it is.)
func TestBarePrefixesHeap(t *testing.T) {
	const peers = 200
	held := func() (live uint64) {
		before := memcheck.Live()
		release := holdPrefixes(peers)
		live = memcheck.Live() - before
		release()
		return live
	}
	memcheck.UnderBar(t, func() []byte { return nil }, func([]byte) string {
		return fmt.Sprintf("%d stalled hello prefixes hold %d bytes of heap", peers, held())
	})
	live := held()
	t.Logf("%d stalled hello prefixes hold %d bytes of heap", peers, live)
	if live > peers*16<<10 {
		t.Errorf("%d stalled hello prefixes hold %d bytes of heap, over 16 KiB each", peers, live)
	}
}

// newEOFAfterPrefix is a stream that ends right after a length prefix.
func newEOFAfterPrefix(n int) io.Reader { return &trickle{b: binary.AppendUvarint(nil, uint64(n))} }

// trickle delivers its bytes a few at a time.
type trickle struct{ b []byte }

func (t *trickle) Read(p []byte) (int, error) {
	if len(t.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 7)], t.b)
	t.b = t.b[n:]
	return n, nil
}
