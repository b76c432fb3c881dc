package testenv

import (
	"bufio"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// FileReader is a process that reads every regular file under a directory
// once, in name order, printing each file's SHA-256 as it goes
// (sha256sum): a reader of a lazily mounted image whose every first read
// reaches the daemon. It records when each file's line arrived, so tests
// can see how long reads paused across something done to the daemon.
type FileReader struct {
	cmd  *exec.Cmd
	done chan struct{}
	tick chan struct{}

	mu    sync.Mutex
	sums  map[string]string // path (relative, clean) → SHA-256
	times []time.Time
	err   error
}

// ReadFilesScript is the shell command a FileReader runs in the directory
// it reads: sha256sum of every regular file under "." in name order, 16
// files to a process.
const ReadFilesScript = "find . -type f -print0 | sort -z | xargs -0 -n 16 sha256sum"

// ReadFiles starts a FileReader of dir; it is killed when the test ends.
func ReadFiles(tb testing.TB, dir string) *FileReader {
	tb.Helper()
	return StartReader(tb, exec.Command("/bin/sh", "-c", "cd '"+dir+"' && "+ReadFilesScript))
}

// StartReader starts cmd, which must print ReadFilesScript's output (in a
// container, say), as a FileReader; it is killed when the test ends.
func StartReader(tb testing.TB, cmd *exec.Cmd) *FileReader {
	tb.Helper()
	r := &FileReader{cmd: cmd, done: make(chan struct{}), tick: make(chan struct{}, 1), sums: map[string]string{}}
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	r.cmd.Stderr = LogWriter(tb, "reader")
	if err := r.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		r.cmd.Process.Kill()
		<-r.done
	})
	go r.scan(out)
	return r
}

func (r *FileReader) scan(out io.Reader) {
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		sum, p, _ := strings.Cut(sc.Text(), "  ./")
		r.mu.Lock()
		r.sums[p] = sum
		r.times = append(r.times, time.Now())
		r.mu.Unlock()
		select {
		case r.tick <- struct{}{}:
		default:
		}
	}
	err := r.cmd.Wait()
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
	close(r.done)
}

// Files is how many files have been read so far.
func (r *FileReader) Files() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.times)
}

// WaitFiles waits until n files have been read, and returns when the n-th
// line came. It fails the test if the reader ends first or d passes.
func (r *FileReader) WaitFiles(tb testing.TB, n int, d time.Duration) time.Time {
	tb.Helper()
	timeout := time.After(d)
	for {
		r.mu.Lock()
		if len(r.times) >= n {
			at := r.times[n-1]
			r.mu.Unlock()
			return at
		}
		r.mu.Unlock()
		select {
		case <-r.tick:
		case <-r.done:
			if r.Files() < n {
				tb.Fatalf("the reader ended after %d files, before %d: %v", r.Files(), n, r.Err())
			}
		case <-timeout:
			tb.Fatalf("the reader read %d files in %v, not %d", r.Files(), d, n)
		}
	}
}

// Across waits until n more files have been read, then calls stop (a
// SIGKILL of the daemon serving them, say) and start (the next daemon),
// and returns how long after stop began the next file came.
func (r *FileReader) Across(tb testing.TB, n int, stop, start func()) time.Duration {
	tb.Helper()
	const wait = 2 * time.Minute
	r.WaitFiles(tb, r.Files()+n, wait)
	at := time.Now()
	stop()
	start()
	return r.WaitFiles(tb, r.Files()+1, wait).Sub(at)
}

// Wait waits for the reader to end and returns its error.
func (r *FileReader) Wait() error {
	<-r.done
	return r.Err()
}

// Err is the reader's exit error, once it ended.
func (r *FileReader) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Sums maps the files read to their SHA-256.
func (r *FileReader) Sums() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]string, len(r.sums))
	for k, v := range r.sums {
		out[k] = v
	}
	return out
}

// LongestGap is the longest time between two consecutive lines of output.
func (r *FileReader) LongestGap() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var worst time.Duration
	for i := 1; i < len(r.times); i++ {
		worst = max(worst, r.times[i].Sub(r.times[i-1]))
	}
	return worst
}

// CheckTree compares what the reader read with the regular files of want.
func (r *FileReader) CheckTree(tb testing.TB, want Tree) { r.CheckTreeUnder(tb, want, "") }

// CheckTreeUnder compares what the reader read with the regular files of
// want under prefix ("usr/", say; "" for all), whose paths the reader
// printed relative to the tree's root.
func (r *FileReader) CheckTreeUnder(tb testing.TB, want Tree, prefix string) {
	tb.Helper()
	got := r.Sums()
	files := 0
	for p, e := range want {
		if e.Kind != "file" || !strings.HasPrefix(p, prefix) {
			continue
		}
		files++
		if got[p] != e.SHA256 {
			tb.Errorf("%s: read %q, the image has %s", p, got[p], e.SHA256)
		}
	}
	if len(got) != files {
		tb.Errorf("read %d files, the image has %d", len(got), files)
	}
}

// StartProcess starts cmd, a daemon or helper a test runs, with its
// stderr kept as name's log (LogWriter); it is killed when the test ends
// unless it was waited for.
func StartProcess(tb testing.TB, name string, cmd *exec.Cmd) *exec.Cmd {
	tb.Helper()
	cmd.Stderr = LogWriter(tb, name)
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", name, err)
	}
	tb.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}
