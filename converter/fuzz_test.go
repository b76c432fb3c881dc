package converter

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/hostile"
	"github.com/shoal-project/shoal/internal/memcheck"
)

// FuzzLayerTar feeds arbitrary bytes to the layer handling as two layers:
// decompression (a layer that starts with gzip's or zstd's magic is
// decompressed, as from a registry), then the tar entries. Whatever the
// input, the converter must not panic nor allocate past layerCeiling, and
// whatever it accepts must flatten into an index that validates, with no
// path outside the root.
func FuzzLayerTar(f *testing.F) {
	// Small seeds: the fuzzer slows to a crawl on inputs of hundreds of KB.
	for _, l := range oracleLayers() {
		small := l[:0:0]
		for _, e := range l {
			if len(e.body) < 1024 {
				small = append(small, e)
			}
		}
		f.Add(layerTar(f, small), layerTar(f, []ent{{name: ".wh.etc"}, {name: "etc/x", body: "x"}}))
	}
	f.Add(layerTar(f, []ent{{name: "../x", body: "x"}}), []byte{})
	f.Add(layerTar(f, []ent{{name: "a", typ: tar.TypeLink, link: "a"}, {name: "b/c", typ: tar.TypeSymlink, link: "../../.."}}), []byte("garbage"))
	// Compressed layers, and a zstd frame that asks for a 512 MiB window
	// (allocated up front, and filled, before the window limit).
	plain := layerTar(f, []ent{{name: "etc/hosts", body: "127.0.0.1 localhost\n"}, {name: "bin", typ: tar.TypeDir}})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(plain)
	zw.Close()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(gz.Bytes(), enc.EncodeAll(plain, nil))
	f.Add(hostile.Zstd(29, -1, hostile.Raw(plain), hostile.Run(0, 1<<20)), []byte{})
	lim := limits{maxBytes: 256 << 10, maxRatio: 1000, ratioFloor: 64 << 10, maxEntries: 1000}
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, l1, l2 []byte) {
		layerCeiling.Check(t, len(l1)+len(l2), func() { fuzzLayers(t, lim, log, l1, l2) })
	})
}

// layerCeiling bounds what converting two layers of n bytes in all may
// allocate, for FuzzLayerTar's limits (256 KiB of tar, zstd windows of
// fuzzWindow): the tree, which grows with the entries, and constants: a
// 1 MiB read buffer and a decompressor per layer, and the build's chunker
// and encoders.
var layerCeiling = memcheck.Ceiling{PerByte: 64, Const: 8 << 20}

// fuzzWindow is the largest zstd window FuzzLayerTar's layers may ask for.
// A decoder allocates the window a frame asks for before it decodes a
// byte, so a 9-byte frame under the converter's own limit (maxLayerWindow,
// 128 MiB) costs up to that much, whatever its size: a bound that
// TestZstdLayerWindow measures, not one proportional to the input.
const fuzzWindow = 1 << 20

func fuzzLayers(t *testing.T, lim limits, log *slog.Logger, layers ...[]byte) {
	spool, err := os.CreateTemp(t.TempDir(), "spool")
	if err != nil {
		t.Fatal(err)
	}
	defer spool.Close()
	tr := newTree(spool, lim, log)
	for i, l := range layers {
		r, err := decompressLayer(io.NopCloser(bytes.NewReader(l)), fuzzWindow)
		if err != nil {
			return // rejected input: fine, as long as there was no panic
		}
		err = tr.apply(i, "fuzz", r, int64(len(l)))
		r.Close()
		if err != nil {
			return
		}
	}
	res, err := tr.build(t.Context(), buildOptions{avgBlock: 4 << 10, blobTarget: 1 << 20, workers: 2, workDir: t.TempDir(), level: zstd.SpeedFastest})
	if err != nil {
		t.Fatalf("accepted layers failed to build: %v", err)
	}
	if err := res.index.Validate(); err != nil {
		if errors.Is(err, flat.ErrMalformed) {
			t.Fatalf("converter produced an invalid index: %v", err)
		}
		t.Fatal(err)
	}
}
