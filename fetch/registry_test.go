package fetch

import (
	"bytes"
	"errors"
	"io"
	"log"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
)

func TestOpenImageAndFetchEveryBlock(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	if !reflect.DeepEqual(im.Index(), f.res.Index) {
		t.Fatal("OpenImage's index differs from the one the converter built")
	}
	if want := f.reg.Host + "/app:v1-shoal@" + f.res.Digest; im.Digest() != f.res.Digest || im.Ref() != want {
		t.Errorf("Digest, Ref = %s, %s; want %s, %s", im.Digest(), im.Ref(), f.res.Digest, want)
	}
	blocks := im.Index().Blocks
	if len(blocks) < 50 {
		t.Fatalf("only %d blocks; the test wants many", len(blocks))
	}
	before := f.reg.rangeRequests.Load()
	got, err := im.Registry().FetchMany(t.Context(), blocks)
	if err != nil {
		t.Fatal(err)
	}
	requests := f.reg.rangeRequests.Load() - before
	for _, b := range blocks {
		if data, ok := got[b.ID]; !ok || !b.ID.Verify(data) || len(data) != int(b.ULen) {
			t.Fatalf("block %s: missing or wrong", b.ID)
		}
	}
	rebuilt := files(t, im.Index(), got)
	if len(rebuilt) != len(f.want) {
		t.Errorf("%d files, want %d", len(rebuilt), len(f.want))
	}
	for p, body := range f.want {
		if !bytes.Equal(rebuilt[p], body) {
			t.Errorf("%s: contents differ from the source image", p)
		}
	}
	var clen int64
	for _, b := range blocks {
		clen += int64(b.CLen)
	}
	if requests >= int64(len(blocks)) {
		t.Errorf("%d requests for %d blocks: adjacent blocks were not merged", requests, len(blocks))
	}
	st := im.Registry().Stats()
	t.Logf("all %d blocks (%d compressed bytes in %d blob(s)): %d range requests, %d body bytes; registry stats %+v",
		len(blocks), clen, len(im.Index().Blobs), requests, f.reg.rangeBytes.Load(), st)
	if st.Blocks != int64(len(blocks)) {
		t.Errorf("Stats().Blocks = %d, want %d", st.Blocks, len(blocks))
	}
}

func TestMerging(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	every := func(step int) func([]flat.Block) []flat.Block {
		return func(all []flat.Block) []flat.Block {
			var out []flat.Block
			for i := 0; i < len(all); i += step {
				out = append(out, all[i])
			}
			return out
		}
	}
	reversed := func(all []flat.Block) []flat.Block {
		out := make([]flat.Block, len(all))
		for i, b := range all {
			out[len(all)-1-i] = b
		}
		return out
	}
	tests := []struct {
		name      string
		opts      []Option
		pick      func([]flat.Block) []flat.Block
		wantFewer bool // fewer requests than blocks
		wantEach  bool // one request per block
	}{
		{name: "all blocks, defaults", pick: every(1), wantFewer: true},
		{name: "all blocks, reversed order", pick: reversed, wantFewer: true},
		{name: "all blocks, 256 KiB cap", opts: []Option{WithMaxRequestSize(256 << 10)}, pick: every(1), wantFewer: true},
		{name: "every other block, 64 KiB gap", pick: every(2), wantFewer: true},
		{name: "every other block, no gap", opts: []Option{WithMergeGap(0)}, pick: every(2), wantEach: true},
		{name: "every fifth block, 16 KiB gap", opts: []Option{WithMergeGap(16 << 10)}, pick: every(5)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Not parallel: the subtests share the registry's counters.
			im := f.open(t, tt.opts...)
			want := tt.pick(im.Index().Blocks)
			spans := plan(want, im.Registry().cfg.mergeGap, im.Registry().cfg.maxRequest)
			var spanBytes, clen int64
			for _, s := range spans {
				spanBytes += int64(s.end - s.start)
				if int64(s.end-s.start) > im.Registry().cfg.maxRequest && len(s.blocks) > 1 {
					t.Errorf("span of %d bytes over the cap", s.end-s.start)
				}
			}
			for _, b := range want {
				clen += int64(b.CLen)
			}
			req0, bytes0 := f.reg.rangeRequests.Load(), f.reg.rangeBytes.Load()
			got, err := im.Registry().FetchMany(t.Context(), want)
			if err != nil {
				t.Fatal(err)
			}
			requests, body := f.reg.rangeRequests.Load()-req0, f.reg.rangeBytes.Load()-bytes0
			if len(got) != len(want) {
				t.Fatalf("got %d blocks, want %d", len(got), len(want))
			}
			if requests != int64(len(spans)) || body != spanBytes {
				t.Errorf("registry saw %d requests, %d bytes; the plan was %d requests, %d bytes", requests, body, len(spans), spanBytes)
			}
			if tt.wantFewer && requests >= int64(len(want)) {
				t.Errorf("%d requests for %d blocks: not merged", requests, len(want))
			}
			if tt.wantEach && requests != int64(len(want)) {
				t.Errorf("%d requests for %d blocks that are not adjacent and gap 0", requests, len(want))
			}
			t.Logf("%d blocks, %d compressed bytes: %d requests (%.3f per block), %d body bytes (%.2fx the blocks)",
				len(want), clen, requests, float64(requests)/float64(len(want)), body, float64(body)/float64(clen))
		})
	}
}

func TestSingleBlockFetchTransfersItsBytes(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	b := im.Index().Blocks[len(im.Index().Blocks)/2]
	req0, bytes0 := f.reg.rangeRequests.Load(), f.reg.rangeBytes.Load()
	data, err := im.Registry().Fetch(t.Context(), b)
	if err != nil {
		t.Fatal(err)
	}
	if !b.ID.Verify(data) {
		t.Fatal("wrong bytes")
	}
	requests, body := f.reg.rangeRequests.Load()-req0, f.reg.rangeBytes.Load()-bytes0
	blobSize := im.Index().Blobs[b.Blob].Size
	t.Logf("one block: CLen %d, ULen %d; %d request, %d body bytes; blob is %d bytes", b.CLen, b.ULen, requests, body, blobSize)
	if requests != 1 || body != int64(b.CLen) {
		t.Errorf("%d requests, %d bytes; want 1 request of CLen = %d bytes", requests, body, b.CLen)
	}
}

// TestRegistryAnswers covers servers that ignore Range (200, whole blob) and
// registries that redirect blob GETs to storage (Range must survive).
func TestRegistryAnswers(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		fault fault
	}{
		{name: "200 whole blob", fault: faultNoRange},
		{name: "307 redirect to storage", fault: faultRedirect},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			im := f.open(t)
			f.reg.setFault(always(tt.fault))
			blocks := im.Index().Blocks
			for _, b := range []flat.Block{blocks[0], blocks[len(blocks)/2], blocks[len(blocks)-1]} {
				data, err := im.Registry().Fetch(t.Context(), b)
				if err != nil {
					t.Fatal(err)
				}
				if !b.ID.Verify(data) {
					t.Fatalf("block %s: wrong bytes", b.ID)
				}
			}
			got, err := im.Registry().FetchMany(t.Context(), blocks)
			if err != nil || len(got) != len(blocks) {
				t.Fatalf("FetchMany: %d of %d blocks, %v", len(got), len(blocks), err)
			}
		})
	}
}

func TestRetries(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name         string
		schedule     func(int64) fault
		opts         []Option
		wantErr      error // nil: the fetch succeeds
		wantRequests int64
		maxTime      time.Duration
	}{
		{name: "two 500s", schedule: firstN(2, fault500), wantRequests: 3},
		{name: "429 with Retry-After", schedule: firstN(1, fault429), wantRequests: 2},
		{name: "connection dropped mid-body", schedule: firstN(1, faultDrop), wantRequests: 2},
		{name: "one corrupt answer", schedule: firstN(1, faultCorrupt), wantRequests: 2},
		{name: "one stall", schedule: firstN(1, faultStall), opts: []Option{WithStallTimeout(200 * time.Millisecond)}, wantRequests: 2},
		{name: "always 500", schedule: always(fault500), wantErr: errors.New("HTTP 500"), wantRequests: DefaultAttempts},
		{name: "always corrupt", schedule: always(faultCorrupt), wantErr: flat.ErrCorruptBlock, wantRequests: DefaultAttempts},
		{name: "404 fails fast", schedule: always(fault404), wantErr: ErrNotFound, wantRequests: 1},
		{
			name: "no answer hits the deadline", schedule: always(faultHang), wantErr: ErrTimeout, wantRequests: 2,
			opts:    []Option{WithRequestTimeout(300 * time.Millisecond), WithStallTimeout(0), WithRetries(2, time.Millisecond)},
			maxTime: 3 * time.Second,
		},
		{
			name: "stall mid-body hits the stall timeout", schedule: always(faultStall), wantErr: ErrTimeout, wantRequests: 2,
			opts:    []Option{WithStallTimeout(200 * time.Millisecond), WithRetries(2, time.Millisecond)},
			maxTime: 3 * time.Second,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			im := f.open(t, tt.opts...)
			f.reg.setFault(tt.schedule)
			b := im.Index().Blocks[len(im.Index().Blocks)/3]
			start := time.Now()
			data, err := im.Registry().Fetch(t.Context(), b)
			elapsed := time.Since(start)
			if requests := f.reg.rangeRequests.Load(); requests != tt.wantRequests {
				t.Errorf("%d requests, want %d", requests, tt.wantRequests)
			}
			if tt.maxTime > 0 && elapsed > tt.maxTime {
				t.Errorf("took %v, want under %v", elapsed, tt.maxTime)
			}
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if !b.ID.Verify(data) {
					t.Fatal("wrong bytes")
				}
				return
			}
			if data != nil {
				t.Errorf("got %d bytes with the error", len(data))
			}
			if err == nil || !(errors.Is(err, tt.wantErr) || strings.Contains(err.Error(), tt.wantErr.Error())) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			t.Logf("after %v: %v", elapsed.Round(time.Millisecond), err)
		})
	}
}

// TestCorruptRegistryNeverServesWrongBytes: a registry that corrupts every
// answer costs the blocks it corrupts and nothing else; no bad byte escapes.
func TestCorruptRegistryNeverServesWrongBytes(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	im := f.open(t)
	f.reg.setFault(always(faultCorrupt))
	blocks := im.Index().Blocks
	got, err := im.Registry().FetchMany(t.Context(), blocks)
	if !errors.Is(err, flat.ErrCorruptBlock) {
		t.Fatalf("err = %v, want flat.ErrCorruptBlock", err)
	}
	for id, data := range got {
		if !id.Verify(data) {
			t.Fatalf("block %s served with wrong bytes", id)
		}
	}
	if len(got) == len(blocks) || len(got) == 0 {
		t.Errorf("%d of %d blocks returned; want all but the corrupted ones", len(got), len(blocks))
	}
	st := im.Registry().Stats()
	t.Logf("%d of %d blocks good; %v; stats %+v", len(got), len(blocks), err, st)
	if st.CorruptBlocks == 0 || st.Retries == 0 {
		t.Errorf("stats %+v: want corrupt blocks and retries counted", st)
	}
}

func TestAuth(t *testing.T) {
	t.Parallel()
	shared := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	open := serveRegistry(t, shared, nil)
	locked := serveRegistry(t, shared, &[2]string{"shoal", "s3cret"})
	layers, _ := testLayers()
	push(t, open.Host+"/private:v1", imageOf(t, layers[2:]))
	if _, err := converter.Convert(t.Context(), open.Host+"/private:v1", "", converter.WithPlainHTTP(true),
		converter.WithLogger(quiet())); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		keys    authn.Keychain
		wantErr error
	}{
		{name: "static keychain", keys: staticKeychain{&authn.Basic{Username: "shoal", Password: "s3cret"}}},
		{name: "credential helper keychain", keys: helperKeychain(t, locked.Host, "shoal", "s3cret")},
		{name: "no credentials", keys: staticKeychain{authn.Anonymous}, wantErr: ErrDenied},
		{name: "wrong password", keys: staticKeychain{&authn.Basic{Username: "shoal", Password: "guess"}}, wantErr: ErrDenied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			im, err := OpenImage(t.Context(), locked.Host+"/private:v1-shoal", WithPlainHTTP(true), WithKeychain(tt.keys),
				WithLogger(quiet()), WithRetries(DefaultAttempts, time.Millisecond))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), "access denied") || strings.Contains(err.Error(), "\n") {
					t.Errorf("error is not one clear line: %q", err)
				}
				t.Logf("error: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := im.Registry().FetchMany(t.Context(), im.Index().Blocks)
			if err != nil || len(got) != len(im.Index().Blocks) {
				t.Fatalf("FetchMany behind basic auth: %d blocks, %v", len(got), err)
			}
		})
	}
}

type staticKeychain struct{ auth authn.Authenticator }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k.auth, nil }

// helperKeychain is a keychain over a Docker credential helper that knows
// one registry, as authn.FromConfig builds it.
func helperKeychain(t *testing.T, host, user, pass string) authn.Keychain {
	t.Helper()
	return authn.NewKeychainFromHelper(helperFunc(func(server string) (string, string, error) {
		if server != host {
			return "", "", errors.New("credentials not found in native keychain")
		}
		return user, pass, nil
	}))
}

type helperFunc func(string) (string, string, error)

func (h helperFunc) Get(server string) (string, string, error) { return h(server) }

func TestOpenImageRefusesWhatIsNotFlat(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t)
	layers, _ := testLayers()
	img := imageOf(t, layers[2:])
	push(t, reg.Host+"/plain:v1", img)
	ref, _ := name.ParseReference(reg.Host+"/plain:multi", name.Insecure)
	if err := remote.WriteIndex(ref, mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img})); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		ref     string
		wantErr error
		wantMsg string
	}{
		{name: "plain image", ref: "/plain:v1", wantErr: ErrNotFlat, wantMsg: "no flat form"},
		{name: "image index", ref: "/plain:multi", wantErr: ErrNotFlat, wantMsg: "no flat form"},
		{name: "missing tag", ref: "/plain:v1-shoal", wantErr: ErrNotFound, wantMsg: "not found"},
		{name: "missing repository", ref: "/nothing:v1", wantErr: ErrNotFound, wantMsg: "not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := OpenImage(t.Context(), reg.Host+tt.ref, WithPlainHTTP(true), WithLogger(quiet()))
			if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("err = %v, want %v saying %q", err, tt.wantErr, tt.wantMsg)
			}
			t.Logf("%v", err)
		})
	}
}

func TestFlatRef(t *testing.T) {
	t.Parallel()
	hex := strings.Repeat("ab", 32)
	tests := []struct{ src, want string }{
		{"127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1-shoal"},
		{"127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest-shoal"},
		{"127.0.0.1:5000/app@sha256:" + hex, "127.0.0.1:5000/app:sha256-" + hex + "-shoal"},
		{"debian:bookworm", "index.docker.io/library/debian:bookworm-shoal"},
	}
	for _, tt := range tests {
		got, err := FlatRef(tt.src)
		if err != nil || got != tt.want {
			t.Errorf("FlatRef(%q) = %q, %v; want %q", tt.src, got, err, tt.want)
		}
	}
	if _, err := FlatRef("Not A Reference"); err == nil {
		t.Error("FlatRef accepted a bad reference")
	}
}
