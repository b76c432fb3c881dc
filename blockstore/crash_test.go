package blockstore

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// records is a slog handler that keeps every record, for tests that count
// what a store logged.
type records struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

// warnings returns the messages logged at warning level or above.
func (r *records) warnings() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, rec := range r.recs {
		if rec.Level >= slog.LevelWarn {
			out = append(out, rec.Message)
		}
	}
	return out
}

// attr returns the value of attribute key of the first record with msg
// containing substr.
func (r *records) attr(substr, key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range r.recs {
		if !strings.Contains(rec.Message, substr) {
			continue
		}
		var v string
		rec.Attrs(func(a slog.Attr) bool {
			if a.Key == key {
				v = a.Value.String()
				return false
			}
			return true
		})
		return v
	}
	return ""
}

// damagedCopies lists the damaged copies set aside beside dir.
func damagedCopies(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(dir + damageSuffix + "*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// storeWithBlocks creates a closed store in dir holding bs (in tables,
// value log and WAL alike: small badger sizes make them rotate).
func storeWithBlocks(t *testing.T, dir string, bs []Block) {
	t.Helper()
	s, err := Open(t.Context(), dir, WithLogger(testLogger(t)), WithMemTableSize(1<<20),
		WithValueLogFileSize(1<<20), WithGCInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, bs...)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// overwrite replaces the files of dir matching glob with garbage, or, with
// keep > 0, truncates them to keep bytes.
func overwrite(t *testing.T, dir, glob string, keep int64) {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, glob))
	if err != nil || len(m) == 0 {
		t.Fatalf("no %s in %s: %v", glob, dir, err)
	}
	for _, p := range m {
		if keep > 0 {
			err = os.Truncate(p, keep)
		} else {
			err = os.WriteFile(p, garbage(len(p)), 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func garbage(seed int) []byte {
	b := make([]byte, 4096+seed)
	_, _ = rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

// TestOpenDamaged damages a store's directory in the ways a crash, a bad
// disk or a stray command can, and checks that Open sets it aside, starts
// empty, works, and says so in exactly one line.
func TestOpenDamaged(t *testing.T) {
	t.Parallel()
	old := append(testBlocks(1, 40, 64<<10), testBlocks(100, 2000, 100)...)
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string)
	}{
		{"garbage in every file", func(t *testing.T, dir string) {
			overwrite(t, dir, "*", 0)
			for i := range 3 {
				if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("%06d.sst", 900+i)), garbage(i), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"garbage manifest", func(t *testing.T, dir string) { overwrite(t, dir, "MANIFEST", 0) }},
		{"truncated tables", func(t *testing.T, dir string) { overwrite(t, dir, "*.sst", 100) }},
		{"garbage tables", func(t *testing.T, dir string) { overwrite(t, dir, "*.sst", 0) }},
		{"garbage value log", func(t *testing.T, dir string) { overwrite(t, dir, "*.vlog", 0) }},
		{"garbage key registry", func(t *testing.T, dir string) { overwrite(t, dir, "KEYREGISTRY", 0) }},
		{"a file at the path", func(t *testing.T, dir string) {
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dir, []byte("not a directory"), 0o644); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := filepath.Join(t.TempDir(), "blocks")
			storeWithBlocks(t, dir, old)
			tt.damage(t, dir)

			logs := &records{}
			s := openTest(t, dir, WithLogger(slog.New(logs)))
			if st := s.Stats(); st.Blocks != 0 {
				t.Errorf("Stats after opening a damaged store = %+v; want an empty store", st)
			}
			b := testBlock(7777, 64<<10)
			put(t, s, b)
			mustGet(t, s, b)
			if w := logs.warnings(); len(w) != 1 || !strings.Contains(w[0], "damaged") {
				t.Errorf("warnings and errors logged: %q; want exactly one saying the store was damaged", w)
			}
			copies := damagedCopies(t, dir)
			if len(copies) != 1 {
				t.Fatalf("damaged copies beside the store: %q; want one", copies)
			}
			if got := logs.attr("damaged", "moved_to"); got != copies[0] {
				t.Errorf("the log line says the damaged copy is at %q; it is at %q", got, copies[0])
			}
		})
	}
}

// TestOpenDamagedKeepsOneCopy damages the store twice: the second time,
// the first damaged copy goes, so repeated damage cannot fill the disk.
func TestOpenDamagedKeepsOneCopy(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "blocks")
	first := dir + damageSuffix + "20000101T000000Z"
	if err := os.MkdirAll(first, 0o755); err != nil {
		t.Fatal(err)
	}
	storeWithBlocks(t, dir, testBlocks(1, 10, 64<<10))
	overwrite(t, dir, "MANIFEST", 0)
	s := openTest(t, dir)
	if copies := damagedCopies(t, dir); len(copies) != 1 || copies[0] == first {
		t.Errorf("damaged copies after a second damage: %q; want only the new one", copies)
	}
	put(t, s, testBlock(1, 100))
}

// wantRefused checks that Open of dir fails (with an error that is want,
// if want is not nil) and sets nothing aside.
func wantRefused(t *testing.T, dir string, want error, opts ...Option) {
	t.Helper()
	s, err := Open(t.Context(), dir, append([]Option{WithLogger(testLogger(t))}, opts...)...)
	if err == nil {
		s.Close()
		t.Fatal("Open succeeded")
	}
	t.Logf("Open: %v", err)
	if want != nil && !errors.Is(err, want) {
		t.Fatalf("Open: %v; want %v", err, want)
	}
	if c := damagedCopies(t, dir); len(c) != 0 {
		t.Fatalf("the directory was set aside: %q", c)
	}
}

// TestOpenEnvironmentFailures checks the failures that are not damage: Open
// returns them and leaves the directory where it is.
func TestOpenEnvironmentFailures(t *testing.T) {
	t.Parallel()
	t.Run("held by another open store", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "blocks")
		s := openTest(t, dir)
		b := testBlock(1, 64<<10)
		put(t, s, b)
		wantRefused(t, dir, nil)
		mustGet(t, s, b)
		// Even asked directly, setAside refuses a directory in use.
		if _, _, err := setAside(dir, time.Now()); err == nil {
			t.Fatal("setAside moved a store in use")
		}
		mustGet(t, s, b)
	})
	t.Run("incompatible format", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "blocks")
		s := openTest(t, dir)
		if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(versionKey, []byte("999")) }); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		wantRefused(t, dir, ErrIncompatible)
	})
	t.Run("read-only file system", func(t *testing.T) {
		t.Parallel()
		mnt := testenv.Tmpfs(t, 64<<20)
		dir := filepath.Join(mnt, "blocks")
		storeWithBlocks(t, dir, testBlocks(1, 10, 64<<10))
		overwrite(t, dir, "MANIFEST", 0) // damaged too: read-only must still win
		if err := syscall.Mount("", mnt, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
			t.Fatalf("remount read-only: %v", err)
		}
		t.Cleanup(func() { _ = syscall.Mount("", mnt, "", syscall.MS_REMOUNT, "") })
		wantRefused(t, dir, nil, WithMinFreeSpace(0))
	})
	t.Run("full file system", func(t *testing.T) {
		t.Parallel()
		mnt := testenv.Tmpfs(t, 16<<20)
		dir := filepath.Join(mnt, "blocks")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "MANIFEST"), garbage(1), 0o644); err != nil {
			t.Fatal(err)
		}
		wantRefused(t, dir, ErrNoSpace)
	})
}

// killChildEnv names the store directory a re-executed test binary writes
// to in TestKillDuringPuts.
const killChildEnv = "SHOAL_BLOCKSTORE_KILL_CHILD"

// TestKillDuringPuts runs a child process (this test binary again) that puts
// blocks from several goroutines and prints the ID of each as soon as Put
// returns. The parent SIGKILLs it mid-stream, reopens the store, and checks
// that every block the child saw acknowledged is there and verifies, then
// lets a new child write on: three rounds, so kills land in memtable
// flushes and value-log rotations of a store that has been killed before.
func TestKillDuringPuts(t *testing.T) {
	if dir := os.Getenv(killChildEnv); dir != "" {
		killChild(dir)
		return
	}
	t.Parallel()
	dir := t.TempDir()
	acked := map[flat.BlockID]uint64{} // ID → seed
	pinned := map[flat.BlockID]bool{}
	for round := range 3 {
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestKillDuringPuts$", "-test.count=1")
		cmd.Env = append(os.Environ(), killChildEnv+"="+dir, "SHOAL_KILL_ROUND="+strconv.Itoa(round))
		cmd.Stderr = t.Output()
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill after a number of acknowledgements that varies by round.
		killAt := 150 + 97*round
		sc := bufio.NewScanner(out)
		n := 0
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) != 3 || (f[0] != "put" && f[0] != "pin") {
				continue
			}
			seed, err := strconv.ParseUint(f[2], 10, 64)
			if err != nil {
				t.Fatalf("child printed %q", sc.Text())
			}
			id, err := flat.ParseID(f[1])
			if err != nil {
				t.Fatalf("child printed %q: %v", sc.Text(), err)
			}
			if f[0] == "pin" {
				pinned[id] = true
				continue
			}
			acked[id] = seed
			if n++; n == killAt {
				if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			}
		}
		err = cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child ended with %v after %d acknowledged puts; want killed by SIGKILL", round, err, n)
		}

		s, err := Open(t.Context(), dir, WithLogger(testLogger(t)), WithMemTableSize(1<<20),
			WithValueLogFileSize(1<<20), WithGCInterval(0))
		if err != nil {
			t.Fatalf("round %d: reopen after SIGKILL: %v", round, err)
		}
		for id, seed := range acked {
			got, err := s.Get(t.Context(), id)
			if err != nil {
				t.Errorf("round %d: acknowledged block %s (seed %d): %v", round, id, seed, err)
				continue
			}
			if want := killBlock(seed); !id.Verify(got) || len(got) != len(want.Data) {
				t.Errorf("round %d: acknowledged block %s: wrong bytes", round, id)
			}
		}
		for id := range pinned {
			if c, err := s.PinCount(id); err != nil || c != 1 {
				t.Errorf("round %d: acknowledged pin on %s: count %d, %v; want 1", round, id, c, err)
			}
		}
		checkIndex(t, s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: killed after %d acknowledged puts; all %d acknowledged blocks and %d pins present",
			round, n, len(acked), len(pinned))
		if t.Failed() {
			return
		}
	}
}

// killBlock is the block a kill child writes for seed: sizes from 100 bytes
// (inline in the LSM tree) to 256 KiB (value log).
func killBlock(seed uint64) Block {
	sizes := []int{100, 4 << 10, 64 << 10, 256 << 10}
	return testBlock(seed, sizes[seed%uint64(len(sizes))])
}

// killChild puts blocks until it is killed, printing "put <id> <seed>"
// after each Put returns and "pin <id> <seed>" after each Pin.
func killChild(dir string) {
	round, _ := strconv.Atoi(os.Getenv("SHOAL_KILL_ROUND"))
	ctx := context.Background()
	s, err := Open(ctx, dir, WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))),
		WithMemTableSize(1<<20), WithValueLogFileSize(1<<20), WithGCInterval(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "kill child:", err)
		os.Exit(2)
	}
	var mu sync.Mutex // one line at a time on stdout
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(0); ; i++ {
				seed := uint64(round)<<40 | uint64(w)<<32 | i
				b := killBlock(seed)
				if err := s.Put(ctx, b.ID, b.Data); err != nil {
					fmt.Fprintln(os.Stderr, "kill child: put:", err)
					os.Exit(2)
				}
				mu.Lock()
				fmt.Printf("put %s %d\n", b.ID, seed)
				mu.Unlock()
				if i%16 == 0 {
					if err := s.Pin(ctx, b.ID); err != nil {
						fmt.Fprintln(os.Stderr, "kill child: pin:", err)
						os.Exit(2)
					}
					mu.Lock()
					fmt.Printf("pin %s %d\n", b.ID, seed)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
}

// TestCloseDiskGone removes a store's directory under it, the way a failed
// disk or a mistaken cleanup does, and checks that Close still returns
// within its timeout, with ErrCloseTimeout or success, and at most one line.
func TestCloseDiskGone(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "blocks")
	logs := &records{}
	const timeout = 2 * time.Second
	s, err := Open(t.Context(), dir, WithLogger(slog.New(logs)), WithMemTableSize(1<<20),
		WithValueLogFileSize(1<<20), WithGCInterval(0), WithCloseTimeout(timeout))
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, testBlocks(1, 8, 64<<10)...) // the memtable holds their keys
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = s.Close()
	took := time.Since(start)
	t.Logf("Close with its directory gone: %v (took %v)", err, took.Round(time.Millisecond))
	if took > timeout+time.Second {
		t.Errorf("Close took %v; want at most %v", took, timeout)
	}
	if !errors.Is(err, ErrCloseTimeout) {
		t.Errorf("Close with its directory gone: %v; want ErrCloseTimeout", err)
	}
	if w := logs.warnings(); len(w) != 1 {
		t.Errorf("warnings and errors logged: %q; want exactly one", w)
	}
	if err2 := s.Close(); err2 != err {
		t.Errorf("second Close: %v; want the first one's %v", err2, err)
	}
	if _, err := s.Get(t.Context(), testBlock(1, 64<<10).ID); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after an abandoned Close: %v; want ErrClosed", err)
	}
}

// BenchmarkPutSync measures what fsync on every write would cost: Put
// throughput of new blocks as the store runs (badger's SyncWrites off; an
// acknowledged block survives the process being killed) and with
// SyncWrites on (it would survive a power failure too), from one writer and
// from four (badger then commits their writes together).
func BenchmarkPutSync(b *testing.B) {
	for _, synced := range []bool{false, true} {
		for _, size := range []int{64 << 10, 1 << 20} {
			for _, writers := range []int{1, 4} {
				b.Run(fmt.Sprintf("sync=%v/%dKiB/writers=%d", synced, size>>10, writers), func(b *testing.B) {
					opts := []Option{WithLogger(testLogger(b)), WithQuota(256 << 20), WithGCInterval(0)}
					if synced {
						opts = append(opts, withSyncWrites())
					}
					s, err := Open(b.Context(), b.TempDir(), opts...)
					if err != nil {
						b.Fatal(err)
					}
					defer s.Close()
					b.SetBytes(int64(size))
					var wg sync.WaitGroup
					b.ResetTimer()
					for w := range writers {
						wg.Add(1)
						go func() {
							defer wg.Done()
							data := testBlock(uint64(w), size).Data
							for i := w; i < b.N; i += writers {
								binary.LittleEndian.PutUint64(data, uint64(i)) // a new block each time
								if err := s.Put(b.Context(), flat.Sum(data), data); err != nil {
									b.Error(err)
									return
								}
							}
						}()
					}
					wg.Wait()
				})
			}
		}
	}
}
