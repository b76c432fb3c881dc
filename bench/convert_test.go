package bench

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/shoal-project/shoal/converter"
	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/internal/testenv"
)

// TestBenchConvertThroughput: conversion of a ≥250 MB image from the real
// registry and push back, against a full standard pull and unpack of the
// same image to disk (go-containerregistry's mutate.Extract, the baseline a
// user pays today), alternating A B A B.
func TestBenchConvertThroughput(t *testing.T) {
	needBench(t)
	reg := testenv.StartRegistry(t)
	img := bigImage(t)
	src := reg.Ref("bench/big:v1")
	r, _ := name.ParseReference(src, name.Insecure)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	var shoalS, baseS, ratios []float64
	var last *converter.Result
	for i := range pairs() {
		start := time.Now()
		res, err := converter.Convert(t.Context(), src, reg.Ref(fmt.Sprintf("bench/flat%d:v1", i)),
			converter.WithPlainHTTP(true), converter.WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		a := time.Since(start)
		last = res

		start = time.Now()
		pullAndUnpack(t, src)
		b := time.Since(start)
		shoalS, baseS, ratios = append(shoalS, secs(a)), append(baseS, secs(b)), append(ratios, secs(a)/secs(b))
		t.Logf("pair %d: convert %v, pull+unpack %v", i, a, b)
	}
	mb := float64(last.Stats.ImageBytes) / 1e6
	comp, _ := img.Manifest()
	var compBytes int64
	for _, l := range comp.Layers {
		compBytes += l.Size
	}
	writeResult(t, "convert-throughput", map[string]any{
		"runs":  len(shoalS),
		"image": map[string]any{"ref": src, "bytes": last.Stats.ImageBytes, "compressed_bytes": compBytes, "files": last.Stats.Files, "entries": last.Stats.Entries},
		"shoal": map[string]any{
			"name": "shoal convert (pull, flatten, chunk, zstd, push)", "median_s": median(shoalS), "samples_s": shoalS,
			"mb_per_s": mb / median(shoalS), "blocks": last.Stats.UniqueBlocks, "flat_compressed_bytes": last.Stats.CompressedBytes,
			"index_bytes": last.Stats.IndexBytes,
		},
		"baseline":     map[string]any{"name": "full pull + unpack to disk (ggcr mutate.Extract)", "median_s": median(baseS), "samples_s": baseS, "mb_per_s": mb / median(baseS)},
		"ratio_median": median(ratios),
		"ratio_note":   "shoal time ÷ baseline time, per pair",
	})
}

// pullAndUnpack is the baseline: pull every layer and write the flattened
// tree to a fresh directory, as a standard client does before a start.
func pullAndUnpack(t *testing.T, ref string) {
	t.Helper()
	r, _ := name.ParseReference(ref, name.Insecure)
	img, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "bench-unpack-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := untar(mutate.Extract(img), dir); err != nil {
		t.Fatal(err)
	}
}

func untar(rc io.ReadCloser, dir string) error {
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			_ = os.MkdirAll(filepath.Dir(p), 0o755)
			_ = os.Symlink(h.Linkname, p)
		}
	}
}

// TestBenchIndex: index size per entry and decode time of a 100k-entry tree,
// against the same tree as a JSON table of contents (the format eStargz uses
// for its TOC), decoded alternately.
func TestBenchIndex(t *testing.T) {
	needBench(t)
	x := syntheticIndex(100_000)
	blob, err := flat.EncodeBlob(x)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := flat.Encode(x)
	toc := jsonTOC(x)
	var flatS, jsonS, ratios []float64
	for range 5 * pairs() {
		start := time.Now()
		if _, err := flat.DecodeBlob(blob); err != nil {
			t.Fatal(err)
		}
		a := time.Since(start)
		start = time.Now()
		var back tocJSON
		if err := json.Unmarshal(toc, &back); err != nil {
			t.Fatal(err)
		}
		b := time.Since(start)
		flatS, jsonS, ratios = append(flatS, secs(a)), append(jsonS, secs(b)), append(ratios, secs(a)/secs(b))
	}
	n := float64(len(x.Entries))
	writeResult(t, "index-100k", map[string]any{
		"runs":    len(flatS),
		"entries": len(x.Entries),
		"blocks":  len(x.Blocks),
		"shoal": map[string]any{
			"name": "flat index (varint, zstd)", "median_s": median(flatS), "samples_s": flatS,
			"decode_ms": 1000 * median(flatS), "bytes": len(blob), "raw_bytes": len(raw),
			"bytes_per_entry": float64(len(blob)) / n, "raw_bytes_per_entry": float64(len(raw)) / n,
		},
		"baseline":     map[string]any{"name": "JSON table of contents (eStargz-style), uncompressed", "median_s": median(jsonS), "samples_s": jsonS, "bytes": len(toc), "bytes_per_entry": float64(len(toc)) / n},
		"ratio_median": median(ratios),
		"goal":         "decode under 100 ms",
	})
}

type tocEntry struct {
	Name    string            `json:"name"`
	Type    string            `json:"type"`
	Size    uint64            `json:"size,omitempty"`
	Mode    uint32            `json:"mode"`
	UID     uint32            `json:"uid"`
	GID     uint32            `json:"gid"`
	ModTime int64             `json:"modtime"`
	Link    string            `json:"linkName,omitempty"`
	Xattrs  map[string][]byte `json:"xattrs,omitempty"`
	Chunks  []tocChunk        `json:"chunks,omitempty"`
}

type tocChunk struct {
	Digest string `json:"chunkDigest"`
	Offset uint32 `json:"chunkOffset"`
	Size   uint32 `json:"chunkSize"`
}

type tocJSON struct {
	Version int        `json:"version"`
	Entries []tocEntry `json:"entries"`
}

func jsonTOC(x *flat.Index) []byte {
	toc := tocJSON{Version: 1}
	for _, e := range x.Entries {
		te := tocEntry{Name: e.Path, Type: e.Type.String(), Size: e.Size, Mode: e.Mode, UID: e.UID, GID: e.GID, ModTime: e.MtimeSec, Link: e.Linkname}
		for _, ex := range e.Extents {
			te.Chunks = append(te.Chunks, tocChunk{Digest: "sha256:" + x.Blocks[ex.Block].ID.Hex(), Offset: ex.Offset, Size: ex.Length})
		}
		toc.Entries = append(toc.Entries, te)
	}
	b, _ := json.Marshal(toc)
	return b
}

// syntheticIndex builds an index shaped like a large distribution image:
// nested directories of ~25 entries, file sizes drawn from a log-normal-ish
// distribution (median ~4 KB, a tail of MB-sized files), contents laid out
// in 256 KiB blocks in path order as the converter does.
func syntheticIndex(n int) *flat.Index {
	rng := rand.New(rand.NewPCG(7, 7))
	x := &flat.Index{Source: "sha256:" + strings.Repeat("0", 64), AvgBlockSize: flat.DefaultAvgBlockSize}
	x.Entries = append(x.Entries, flat.Entry{Type: flat.TypeDir, Mode: 0o755})
	var paths []string
	var walk func(prefix string, depth int)
	walk = func(prefix string, depth int) {
		for i := 0; i < 25 && len(paths) < n-1; i++ {
			p := fmt.Sprintf("%sentry_%03d", prefix, i)
			if depth < 3 && i%5 == 0 {
				paths = append(paths, p+"/")
				walk(p+"/", depth+1)
			} else {
				paths = append(paths, p)
			}
		}
	}
	for len(paths) < n-1 {
		walk(fmt.Sprintf("usr/lib/pkg%04d/", len(paths)/1000), 0)
	}
	dirs := map[string]bool{}
	var all []string
	for _, p := range paths {
		for d := flat.ParentPath(strings.TrimSuffix(p, "/")); d != "" && !dirs[d]; d = flat.ParentPath(d) {
			dirs[d] = true
			all = append(all, d+"/")
		}
		if strings.HasSuffix(p, "/") {
			dirs[strings.TrimSuffix(p, "/")] = true
		}
		all = append(all, p)
	}
	seen := map[string]bool{}
	var uniq []string
	for _, p := range all {
		if !seen[p] {
			seen[p] = true
			uniq = append(uniq, p)
		}
	}
	sortPaths(uniq)
	blobSize := uint64(0)
	var stream uint64
	blockOf := func(off uint64) uint32 {
		i := off / flat.DefaultAvgBlockSize
		for uint64(len(x.Blocks)) <= i {
			id := flat.Sum([]byte(fmt.Sprint(len(x.Blocks))))
			x.Blocks = append(x.Blocks, flat.Block{ID: id, Offset: blobSize, CLen: 100 << 10, ULen: flat.DefaultAvgBlockSize})
			blobSize += 100 << 10
		}
		return uint32(i)
	}
	for _, p := range uniq {
		if strings.HasSuffix(p, "/") {
			x.Entries = append(x.Entries, flat.Entry{Path: strings.TrimSuffix(p, "/"), Type: flat.TypeDir, Mode: 0o755, MtimeSec: 1700000000})
			continue
		}
		size := uint64(rng.ExpFloat64() * 4096 * (1 + 30*float64(rng.IntN(100)/99)))
		e := flat.Entry{Path: p, Type: flat.TypeReg, Mode: 0o644, MtimeSec: 1700000000, Size: size}
		for left := size; left > 0; {
			b := blockOf(stream)
			off := uint32(stream % flat.DefaultAvgBlockSize)
			l := min(left, uint64(flat.DefaultAvgBlockSize-off))
			e.Extents = append(e.Extents, flat.Extent{Block: b, Offset: off, Length: uint32(l)})
			stream += l
			left -= l
		}
		x.Entries = append(x.Entries, e)
	}
	x.Blobs = []flat.Blob{{Digest: "sha256:" + strings.Repeat("1", 64), Size: blobSize}}
	return x
}

func sortPaths(p []string) {
	key := func(s string) string { return strings.TrimSuffix(s, "/") }
	slices.SortFunc(p, func(a, b string) int { return flat.ComparePaths(key(a), key(b)) })
}

// TestBenchBlockReuse: two versions of the real Debian image that differ in
// the contents of one ~1 MB file. Shoal shares blocks; a layered image must
// ship the whole layer that holds the file again (the baseline).
func TestBenchBlockReuse(t *testing.T) {
	needBench(t)
	tarV1 := testenv.DebianTarball(t)
	tarV2, changed := rewriteOneFile(t, tarV1)
	imgV1 := testenv.ImageFromTarball(t, tarV1)
	imgV2 := testenv.ImageFromTarball(t, tarV2)
	quiet := converter.WithLogger(slog.New(slog.DiscardHandler))
	build := func(img v1.Image) *flat.Index {
		res, _, cleanup, err := converter.Build(t.Context(), img, quiet)
		if err != nil {
			t.Fatal(err)
		}
		cleanup()
		return res.Index
	}
	x1, x2 := build(imgV1), build(imgV2)
	have := map[flat.BlockID]bool{}
	for _, b := range x1.Blocks {
		have[b.ID] = true
	}
	var shared, total, sharedC, totalC int64
	for _, b := range x2.Blocks {
		total += int64(b.ULen)
		totalC += int64(b.CLen)
		if have[b.ID] {
			shared += int64(b.ULen)
			sharedC += int64(b.CLen)
		}
	}
	m1, _ := imgV1.Manifest()
	m2, _ := imgV2.Manifest()
	layers := map[v1.Hash]bool{}
	for _, l := range m1.Layers {
		layers[l.Digest] = true
	}
	var lShared, lTotal int64
	for _, l := range m2.Layers {
		lTotal += l.Size
		if layers[l.Digest] {
			lShared += l.Size
		}
	}
	writeResult(t, "block-reuse", map[string]any{
		"changed_file": changed,
		"shoal": map[string]any{
			"name": "flat blocks shared by v2 with v1", "shared_bytes": shared, "total_bytes": total,
			"shared_ratio": float64(shared) / float64(total), "new_compressed_bytes": totalC - sharedC,
		},
		"baseline": map[string]any{
			"name": "layers shared by v2 with v1 (standard image)", "shared_bytes": lShared, "total_bytes": lTotal,
			"shared_ratio": float64(lShared) / float64(lTotal), "new_compressed_bytes": lTotal - lShared,
		},
		"goal": "shared_ratio >= 0.95",
	})
}
