// Package memcheck measures what a piece of code costs in memory, for tests
// of decoders that read untrusted input: the heap bytes it allocates (cheap
// enough to call on every input of a fuzz target) and the peak resident set
// of a process that runs it (a child process, the test binary run again,
// so that nothing else in the test binary counts).
package memcheck

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"testing"
)

// Allocated returns the heap bytes allocated while f runs. The count is
// the runtime's cumulative allocation metric, which is exact for large
// objects and advances a span (a few KiB) at a time for small ones, so
// it is good to a few tens of KiB: enough for a ceiling of k·n plus a
// constant. It costs a fraction of a microsecond, unlike
// runtime.ReadMemStats, which stops the world.
func Allocated(f func()) uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	before := s[0].Value.Uint64()
	f()
	metrics.Read(s)
	return s[0].Value.Uint64() - before
}

// Live returns the bytes of live heap objects, after a garbage
// collection: what the process holds, whether or not the pages are
// resident yet (fresh pages the kernel has not had touched are not).
func Live() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// Ceiling is an allocation bound for one input of n bytes: PerByte·n +
// Const.
type Ceiling struct {
	PerByte uint64
	Const   uint64
}

// Of returns the bound for an input of n bytes.
func (c Ceiling) Of(n int) uint64 { return c.PerByte*uint64(n) + c.Const }

// checkTries is how often Check runs f before it believes an allocation
// over the ceiling: the count is the process's, and other goroutines (a
// fuzz worker's own, the garbage collector's) allocate now and then
// while f runs. The least of the tries is f's.
const checkTries = 3

// Check fails tb if f, given an input of n bytes, allocates more than c
// allows, and returns what it allocated. f runs again, up to checkTries in
// all, while it seems over the ceiling, and must give the same result
// each time (a decoder of the same input does).
func (c Ceiling) Check(tb testing.TB, n int, f func()) uint64 {
	tb.Helper()
	got := Allocated(f)
	for try := 1; got > c.Of(n) && try < checkTries; try++ {
		got = min(got, Allocated(f))
	}
	if got > c.Of(n) {
		tb.Fatalf("an input of %d bytes allocated %d bytes (the least of %d runs), over the ceiling of %d (%d·n + %d)", n, got, checkTries, c.Of(n), c.PerByte, c.Const)
	}
	return got
}

// RSSBar is the most a process may hold at its peak while it decodes any
// hostile input (issue 17).
const RSSBar = 300 << 20

// UnderBar makes an input with gen and checks, in a child process
// (PeakRSS), that f on it peaks under RSSBar, logging what it measured. It
// skips the measurement in short mode and under the race detector, and
// returns the input either way.
func UnderBar(t *testing.T, gen func() []byte, f func(in []byte) string) []byte {
	t.Helper()
	if testing.Short() || Race {
		return gen()
	}
	r, in := PeakRSS(t, gen, f)
	t.Logf("%d-byte input: %v: %s", len(in), r, r.Out)
	if r.Peak > RSSBar {
		t.Errorf("a process decoding the %d-byte input peaked at %d MB resident (bar: %d MB)", len(in), r.Peak>>20, RSSBar>>20)
	}
	return in
}

// Environment of a child process: the test it is to measure, and the file
// holding its input.
const (
	childEnv = "SHOAL_MEMCHECK_CHILD"
	inputEnv = "SHOAL_MEMCHECK_INPUT"
)

// Result is what PeakRSS measured in the child process.
type Result struct {
	// Peak is the child's peak resident set while f ran, in bytes.
	Peak int64
	// Base is its resident set just before f: the test binary's own, and
	// the input's.
	Base int64
	// Out is what f returned (an error line, say).
	Out string
}

func (r Result) String() string {
	return fmt.Sprintf("peak RSS %.1f MB (%.1f MB before)", float64(r.Peak)/1e6, float64(r.Base)/1e6)
}

// PeakRSS makes an input with gen, runs f on it in a child process (the
// test binary run again with only the calling test selected) and returns
// the child's peak resident set while f ran, and the input. The child
// reads the input from a file rather than making it, so that what gen
// costs does not count. In the child, PeakRSS runs f, reports to the
// parent and skips the rest of the test, so code after PeakRSS runs only
// in the parent; code before it runs in both, and should be cheap. A test
// calls PeakRSS at most once.
//
// The measurement is meaningless under the race detector (its shadow
// memory multiplies the resident set): callers skip it there (Race).
func PeakRSS(t *testing.T, gen func() []byte, f func(in []byte) string) (Result, []byte) {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		in, err := os.ReadFile(os.Getenv(inputEnv))
		if err != nil {
			t.Fatalf("memcheck: child: %v", err)
		}
		runtime.GC()
		// Writing 5 to clear_refs resets the peak to the current resident
		// set (Linux 4.0 and later), so the peak is f's own, from here.
		_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
		base := hwm(t)
		out := f(in)
		peak := hwm(t)
		// One line, so an error line with newlines cannot confuse the
		// parent.
		fmt.Printf("memcheck-peak %d %d %s\n", peak, base, strconv.Quote(out))
		t.SkipNow()
	}
	in := gen()
	file := filepath.Join(t.TempDir(), "input")
	if err := os.WriteFile(file, in, 0o600); err != nil {
		t.Fatalf("memcheck: %v", err)
	}
	var pat []string
	for _, part := range strings.Split(t.Name(), "/") {
		pat = append(pat, "^"+regexp.QuoteMeta(part)+"$")
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run="+strings.Join(pat, "/"), "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name(), inputEnv+"="+file)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "memcheck-peak ")
		if !ok {
			continue
		}
		var r Result
		if _, err := fmt.Sscanf(rest, "%d %d", &r.Peak, &r.Base); err != nil {
			t.Fatalf("memcheck: child said %q: %v", rest, err)
		}
		q := rest[strings.IndexByte(rest, '"')+1:]
		if r.Out, err = strconv.Unquote(`"` + q); err != nil {
			t.Fatalf("memcheck: child said %q: %v", rest, err)
		}
		return r, in
	}
	t.Fatalf("memcheck: child process reported nothing (%v)\nstdout:\n%s\nstderr:\n%s", err, out, stderr.Bytes())
	return Result{}, nil
}

// hwm reads the process's peak resident set from /proc/self/status.
func hwm(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("memcheck: no /proc/self/status: %v", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("memcheck: VmHWM %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Skip("memcheck: no VmHWM in /proc/self/status")
	return 0
}
