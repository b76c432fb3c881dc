package converter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"slices"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-project/shoal/flat"
)

// blobFile is a finished data blob on disk.
type blobFile struct {
	path   string
	digest string
	size   int64
}

// Stats describes a conversion.
type Stats struct {
	Entries         int   `json:"entries"`
	Files           int   `json:"files"`
	ImageBytes      int64 `json:"image_bytes"`        // uncompressed file contents, hard links once
	CutBlocks       int   `json:"cut_blocks"`         // blocks cut from the contents, duplicates included
	UniqueBlocks    int   `json:"unique_blocks"`      // blocks stored
	StoredBytes     int64 `json:"stored_bytes"`       // uncompressed bytes of unique blocks
	CompressedBytes int64 `json:"compressed_bytes"`   // bytes of all data blobs
	IndexBytes      int64 `json:"index_bytes"`        // the compressed index blob
	LayerBytes      int64 `json:"layer_tar_bytes"`    // uncompressed tar bytes read from the source
	SourceEntries   int   `json:"source_tar_entries"` // tar entries read from the source
	LeadFiles       int   `json:"lead_files"`         // files laid out first (WithTraceLayout)
	LeadBytes       int64 `json:"lead_bytes"`         // their bytes
	LeadBlocks      int   `json:"lead_blocks"`        // blocks cut from them
}

// fileRef is a canonical regular file whose contents go into the stream.
type fileRef struct {
	entry int // position in the entry list
	ino   *inode
}

// walk lists the tree in flat.ComparePaths order. Hard links become
// TypeHardlink entries naming the first path (in that order) of their inode.
func (t *tree) walk() ([]flat.Entry, []fileRef) {
	var entries []flat.Entry
	var files []fileRef
	first := map[*inode]string{}
	var visit func(p string, n *node)
	visit = func(p string, n *node) {
		e := flat.Entry{
			Path: p, Type: n.typ, Mode: n.mode, UID: n.uid, GID: n.gid,
			MtimeSec: n.mtimeSec, MtimeNs: n.mtimeNs, Xattrs: n.xattrs,
			DevMajor: n.devMajor, DevMinor: n.devMinor,
		}
		switch n.typ {
		case flat.TypeSymlink:
			e.Linkname = n.linkname
		case flat.TypeReg:
			if canon, ok := first[n.ino]; ok {
				e.Type, e.Linkname, e.Mode, e.UID, e.GID, e.Xattrs = flat.TypeHardlink, canon, 0, 0, 0, nil
				e.MtimeSec, e.MtimeNs = 0, 0
			} else {
				first[n.ino] = p
				e.Size = uint64(n.ino.size)
				files = append(files, fileRef{entry: len(entries), ino: n.ino})
			}
		}
		entries = append(entries, e)
		if n.typ != flat.TypeDir {
			return
		}
		names := make([]string, 0, len(n.children))
		for name := range n.children {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			cp := name
			if p != "" {
				cp = p + "/" + name
			}
			visit(cp, n.children[name])
		}
	}
	visit("", t.root)
	return entries, files
}

// Start-up files (WithTraceLayout) are cut at the average block size
// divided by LeadBlockDivisor, and no smaller than MinLeadBlockSize.
const (
	LeadBlockDivisor = 8
	MinLeadBlockSize = 4 << 10
)

// chunk is one block cut from the content stream.
type chunk struct {
	off  int64 // position in the content stream
	data []byte
	id   flat.BlockID
	comp []byte
}

type buildOptions struct {
	avgBlock   int
	blobTarget int64
	workers    int
	workDir    string
	level      zstd.EncoderLevel
	first      []string // paths laid out first, in order (WithTraceLayout)
}

type buildResult struct {
	index *flat.Index
	blobs []blobFile
	stats Stats
}

// build chunks, hashes and compresses the contents of the tree and returns
// the index and the data blobs. Hashing and compression run in parallel;
// block order, dedup and blob layout are decided in stream order, so the
// result does not depend on scheduling.
func (t *tree) build(ctx context.Context, o buildOptions) (*buildResult, error) {
	chunker, err := flat.NewChunker(o.avgBlock)
	if err != nil {
		return nil, err
	}
	// Start-up files are cut at an eighth of the average: a start reads
	// parts of large files and shares blocks with files it does not read,
	// so smaller blocks fetch less it does not need, and as they lie back
	// to back, a prefetch still fetches them in a few merged requests.
	leadChunker, err := flat.NewChunker(max(o.avgBlock/LeadBlockDivisor, MinLeadBlockSize))
	if err != nil {
		return nil, err
	}
	entries, files := t.walk()
	res := &buildResult{index: &flat.Index{AvgBlockSize: uint32(o.avgBlock)}}
	st := &res.stats
	st.Entries = len(entries)
	st.Files = len(files)
	for _, f := range files {
		st.ImageBytes += f.ino.size
	}
	// The content stream is the lead files (start-up's, in first-touch
	// order), then the rest in path order. Each part is chunked on its
	// own: no block holds bytes of both, so start-up's blocks end where
	// its files end, and the rest cuts the same blocks whatever the lead.
	lead, rest := layoutOrder(entries, files, o.first)
	st.LeadFiles = len(lead)
	for _, f := range lead {
		st.LeadBytes += f.ino.size
	}
	files = append(lead, rest...)

	g, ctx := errgroup.WithContext(ctx)
	type job struct {
		c    *chunk
		done chan *chunk
	}
	jobs := make(chan job, 2*o.workers)
	order := make(chan chan *chunk, 4*o.workers)

	// Producer: cut the stream of file contents into blocks, each part
	// (lead, rest) on its own.
	leadBlocks := 0
	g.Go(func() error {
		defer close(jobs)
		defer close(order)
		buf := make([]byte, 0, 2*chunker.Max())
		var off int64
		for pi, part := range [][]fileRef{lead, rest} {
			chunker := chunker
			if pi == 0 {
				chunker = leadChunker
			}
			readers := make([]io.Reader, 0, len(part))
			for _, f := range part {
				if f.ino.size > 0 {
					readers = append(readers, io.NewSectionReader(t.spool, f.ino.off, f.ino.size))
				}
			}
			stream := io.MultiReader(readers...)
			eof := false
			for {
				for !eof && len(buf) < chunker.Max() {
					n, err := stream.Read(buf[len(buf):cap(buf)])
					buf = buf[:len(buf)+n]
					if err == io.EOF {
						eof = true
					} else if err != nil {
						return fmt.Errorf("read spooled contents: %w", err)
					}
				}
				if len(buf) == 0 {
					break
				}
				n := chunker.Cut(buf)
				j := job{c: &chunk{off: off, data: slices.Clone(buf[:n])}, done: make(chan *chunk, 1)}
				off += int64(n)
				buf = buf[:copy(buf, buf[n:])]
				if pi == 0 {
					leadBlocks++
				}
				select {
				case order <- j.done:
				case <-ctx.Done():
					return ctx.Err()
				}
				select {
				case jobs <- j:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
		return nil
	})

	// Workers: hash and compress.
	for range o.workers {
		g.Go(func() error {
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(o.level), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
			if err != nil {
				return fmt.Errorf("zstd encoder: %w", err)
			}
			defer enc.Close()
			for j := range jobs {
				j.c.id = flat.Sum(j.c.data)
				j.c.comp = enc.EncodeAll(j.c.data, make([]byte, 0, len(j.c.data)/2))
				j.done <- j.c
			}
			return nil
		})
	}

	// Sequencer: dedup, lay blocks out in blobs, and record extents, in order.
	g.Go(func() error {
		bw := &blobWriter{dir: o.workDir, target: o.blobTarget}
		defer bw.abort()
		known := map[flat.BlockID]uint32{}
		fi := 0           // next file to receive extents
		var fileOff int64 // bytes of files[fi] already covered
		for done := range order {
			var c *chunk
			select {
			case c = <-done:
			case <-ctx.Done():
				return ctx.Err()
			}
			st.CutBlocks++
			blk, ok := known[c.id]
			if !ok {
				blob, off, err := bw.write(c.comp)
				if err != nil {
					return err
				}
				blk = uint32(len(res.index.Blocks))
				known[c.id] = blk
				res.index.Blocks = append(res.index.Blocks, flat.Block{
					ID: c.id, Blob: uint32(blob), Offset: uint64(off),
					CLen: uint32(len(c.comp)), ULen: uint32(len(c.data)),
				})
				st.UniqueBlocks++
				st.StoredBytes += int64(len(c.data))
				st.CompressedBytes += int64(len(c.comp))
			}
			// Hand the chunk's bytes to the files it covers, in order.
			var pos uint32
			for pos < uint32(len(c.data)) {
				for fi < len(files) && fileOff == files[fi].ino.size {
					fi, fileOff = fi+1, 0
				}
				if fi == len(files) {
					return fmt.Errorf("internal error: content stream longer than its files")
				}
				n := min(int64(uint32(len(c.data))-pos), files[fi].ino.size-fileOff)
				e := &entries[files[fi].entry]
				e.Extents = append(e.Extents, flat.Extent{Block: blk, Offset: pos, Length: uint32(n)})
				pos += uint32(n)
				fileOff += n
			}
		}
		blobs, err := bw.finish()
		if err != nil {
			return err
		}
		res.blobs = blobs
		for _, b := range blobs {
			res.index.Blobs = append(res.index.Blobs, flat.Blob{Digest: b.digest, Size: uint64(b.size)})
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	st.LeadBlocks = leadBlocks
	res.index.Entries = entries
	return res, nil
}

// blobWriter appends compressed blocks to data blob files, starting a new
// blob once the current one reaches the target size.
type blobWriter struct {
	dir    string
	target int64
	cur    *os.File
	h      hash.Hash
	size   int64
	done   []blobFile
}

func (w *blobWriter) write(p []byte) (blob int, off int64, err error) {
	if w.cur != nil && w.size >= w.target {
		if err := w.seal(); err != nil {
			return 0, 0, err
		}
	}
	if w.cur == nil {
		f, err := os.CreateTemp(w.dir, "blob-*")
		if err != nil {
			return 0, 0, fmt.Errorf("create data blob: %w", err)
		}
		w.cur, w.h, w.size = f, sha256.New(), 0
	}
	off = w.size
	if _, err := w.cur.Write(p); err != nil {
		return 0, 0, fmt.Errorf("write data blob: %w", err)
	}
	w.h.Write(p)
	w.size += int64(len(p))
	return len(w.done), off, nil
}

func (w *blobWriter) seal() error {
	name := w.cur.Name()
	if err := w.cur.Close(); err != nil {
		return fmt.Errorf("close data blob: %w", err)
	}
	w.done = append(w.done, blobFile{path: name, digest: "sha256:" + hex.EncodeToString(w.h.Sum(nil)), size: w.size})
	w.cur = nil
	return nil
}

func (w *blobWriter) finish() ([]blobFile, error) {
	if w.cur != nil {
		if err := w.seal(); err != nil {
			return nil, err
		}
	}
	return w.done, nil
}

// abort closes a half-written blob; the work dir is removed by the caller.
func (w *blobWriter) abort() {
	if w.cur != nil {
		w.cur.Close()
		w.cur = nil
	}
}
