package converter

import (
	"archive/tar"
	"bytes"
	"errors"
	"log/slog"
	"os"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/shoal-project/shoal/flat"
)

// FuzzLayerTar feeds arbitrary bytes to the tar-entry handling as two
// layers. Whatever the input, the converter must not panic, and whatever it
// accepts must flatten into an index that validates, with no path outside
// the root.
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
	lim := limits{maxBytes: 256 << 10, maxRatio: 1000, ratioFloor: 64 << 10, maxEntries: 1000}
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, l1, l2 []byte) {
		spool, err := os.CreateTemp(t.TempDir(), "spool")
		if err != nil {
			t.Fatal(err)
		}
		defer spool.Close()
		tr := newTree(spool, lim, log)
		for i, l := range [][]byte{l1, l2} {
			if err := tr.apply(i, "fuzz", bytes.NewReader(l), int64(len(l))); err != nil {
				return // rejected input: fine, as long as there was no panic
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
	})
}
