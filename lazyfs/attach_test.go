package lazyfs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/keeper"
)

// attachHelperEnv makes the test binary, re-executed with
// -test.run=TestAttachHelper, mount the test image and serve it until it
// is killed; its value is "mountpoint,keeper socket,backing directory".
const attachHelperEnv = "LAZYFS_TEST_ATTACH"

// TestAttachHelper is the first server of TestAttach's mount, in a process
// of its own so that it can be SIGKILLed. It hands the connection to the
// keeper, keeps the handoff state there, and never returns a block of
// data/random3: a read of it is in flight when the process dies.
func TestAttachHelper(t *testing.T) {
	v := os.Getenv(attachHelperEnv)
	if v == "" {
		t.Skip("run by TestAttach")
	}
	args := strings.Split(v, ",")
	dir, sock, backing := args[0], args[1], args[2]
	im := buildImage(t, testLayers(t))
	stuck := blocksOf(t, im, "data/random3")
	f := newLocalFetcher(im)
	f.hook = func(ctx context.Context, b flat.Block) error {
		if stuck[b.ID] {
			fmt.Println("fetching")
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}
	k := keeper.Client{Path: sock}
	save := func(h Handoff) error {
		b, err := json.Marshal(h)
		if err != nil {
			return err
		}
		return k.SetState(context.Background(), "m", b)
	}
	m, err := Mount(context.Background(), dir, im.x, f, WithBackingDir(backing, 64<<20),
		WithPassthroughMinSize(16<<10), WithHandoff(save), WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := m.Conn()
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Put(context.Background(), "m", []byte("{}"), conn); err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	select {}
}

func blocksOf(t testing.TB, im *image, p string) map[flat.BlockID]bool {
	t.Helper()
	i, ok := im.x.Lookup(p)
	if !ok {
		t.Fatalf("%s not in index", p)
	}
	out := map[flat.BlockID]bool{}
	for _, ex := range im.x.Entries[im.x.Resolve(i)].Extents {
		out[im.x.Blocks[ex.Block].ID] = true
	}
	return out
}

// TestAttach kills the server of a mount while a read waits on it, and has
// another take the connection over from the keeper: the read completes
// with the right bytes, a file the first server passed through to the
// kernel and that a process still holds open opens again (with the same
// backing ID), and the mount goes on working.
func TestAttach(t *testing.T) {
	requireFUSE(t)
	im := buildImage(t, testLayers(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sock := filepath.Join(t.TempDir(), "keeper.sock")
	ks, err := keeper.Listen(sock, quiet())
	if err != nil {
		t.Fatal(err)
	}
	kdone := make(chan error, 1)
	go func() { kdone <- ks.Serve(ctx) }()
	defer func() { cancel(); <-kdone }()

	dir, backing := t.TempDir(), t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	helper := exec.Command(exe, "-test.run=^TestAttachHelper$", "-test.v")
	helper.Env = append(os.Environ(), attachHelperEnv+"="+dir+","+sock+","+backing)
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	helper.Stderr = os.Stderr
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	defer func() {
		if !killed {
			helper.Process.Kill()
			helper.Wait()
		}
		syscall.Unmount(dir, syscall.MNT_DETACH)
	}()
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waitLine := func(want string) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("helper exited before %q", want)
				}
				if l == want {
					return
				}
			case <-timeout:
				t.Fatalf("helper never said %q", want)
			}
		}
	}
	waitLine("ready")

	// A large file read to the end is materialized; a process that opens it
	// then holds a passthrough handle across the takeover.
	readFileCheck(t, dir, im, "data/random1")
	waitFor(t, "materialization", 10*time.Second, func() bool { return exists(backingPath(t, im, backing, "data/random1")) })
	holder := exec.Command("/bin/sh", "-c", "exec sleep 600 < "+filepath.Join(dir, "data/random1"))
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	var inherited Handoff
	waitFor(t, "the passthrough open's backing ID in the keeper", 10*time.Second, func() bool {
		for _, e := range ks.Entries() {
			if json.Unmarshal(e.State, &inherited) == nil && len(inherited.Backing) == 1 {
				return true
			}
		}
		return false
	})

	// A read the first server took and never answered.
	reader := exec.Command("sha256sum", filepath.Join(dir, "data/random3"))
	var readOut bytes.Buffer
	reader.Stdout = &readOut
	if err := reader.Start(); err != nil {
		t.Fatal(err)
	}
	readDone := make(chan error, 1)
	go func() { readDone <- reader.Wait() }()
	waitLine("fetching")

	killedAt := time.Now()
	helper.Process.Kill()
	helper.Wait()
	killed = true
	select {
	case err := <-readDone:
		t.Fatalf("the read ended with its server dead and the connection kept: %v", err)
	default:
	}

	ents, err := keeper.Client{Path: sock}.Take(ctx)
	if err != nil || len(ents) != 1 {
		t.Fatalf("take: %d entries, %v", len(ents), err)
	}
	var h Handoff
	if err := json.Unmarshal(ents[0].State, &h); err != nil {
		t.Fatal(err)
	}
	f := newLocalFetcher(im)
	m, err := Attach(ctx, ents[0].Conn, dir, im.x, f, h, WithBackingDir(backing, 64<<20),
		WithPassthroughMinSize(16<<10), WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()

	select {
	case err := <-readDone:
		if err != nil {
			t.Fatalf("read across the takeover: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the read in flight never completed after Attach")
	}
	sum := sha256.Sum256(im.contents(t, "data/random3"))
	if got := strings.Fields(readOut.String()); len(got) == 0 || got[0] != hex.EncodeToString(sum[:]) {
		t.Fatalf("read across the takeover returned other bytes: %q", readOut.String())
	}
	t.Logf("SIGKILL to the read in flight answered: %v", time.Since(killedAt).Round(time.Millisecond))

	// The held file opens again: the kernel gets the same backing ID.
	readFileCheck(t, dir, im, "data/random1")
	if s := m.Stats(); s.PassthroughOpens < 1 {
		t.Errorf("reopen of the held file: %+v, want a passthrough open", s)
	}
	for _, p := range []string{"data/random2", "data/text", "etc/passwd", "many/f07"} {
		readFileCheck(t, dir, im, p)
	}
	ents2, err := os.ReadDir(filepath.Join(dir, "many"))
	if err != nil || len(ents2) != 60 {
		t.Errorf("listing after the takeover: %d entries, %v", len(ents2), err)
	}
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	if mounted(t, dir) {
		t.Error("still mounted after Unmount")
	}
}

// readFileCheck reads file p of the image mounted at dir and compares it
// with the image's.
func readFileCheck(t testing.TB, dir string, im *image, p string) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(dir, p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	if !bytes.Equal(got, im.contents(t, p)) {
		t.Fatalf("%s: contents differ from the image", p)
	}
}
