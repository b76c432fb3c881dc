package testenv

import (
	"bytes"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// logKeep is how many bytes of a test's daemon log Logger keeps.
const logKeep = 256 << 10

// Logger returns a debug-level logger for a component a test starts (a
// daemon, a node). Its output is kept in memory, the last 256 KiB of it,
// and printed only if the test fails: a flaky failure in CI then comes with
// the log that explains it, and a passing run stays quiet.
func Logger(t testing.TB, name string) *slog.Logger {
	t.Helper()
	return slog.New(slog.NewTextHandler(LogWriter(t, name), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// LogWriter is Logger's output for a process a test starts: kept, and
// printed only if the test fails.
func LogWriter(t testing.TB, name string) io.Writer {
	t.Helper()
	w := &tailBuffer{}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		out := w.buf.String()
		if len(out) > logKeep {
			out, w.cut = out[len(out)-logKeep:], true
		}
		if w.cut {
			out = "[…]\n" + out[strings.IndexByte(out, '\n')+1:]
		}
		t.Logf("testenv: %s log (tail):\n%s", name, out)
	})
	return w
}

// tailBuffer keeps at least the last logKeep bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	cut bool
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	// Drop the oldest half now and then, so a write stays cheap.
	if b.buf.Len() > 2*logKeep {
		rest := append([]byte(nil), b.buf.Bytes()[b.buf.Len()-logKeep:]...)
		b.buf.Reset()
		b.buf.Write(rest)
		b.cut = true
	}
	return len(p), nil
}
