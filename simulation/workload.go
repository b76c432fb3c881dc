package simulation

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"time"

	"github.com/shoal-project/shoal/flat"
	"github.com/shoal-project/shoal/trace"
)

// read is one read of the replayed application: the blocks it touched first
// (events of the trace with the same start time), the application's own
// time before it (since the previous read was served), and how long the
// recording waited for it.
type read struct {
	blocks []uint32
	think  time.Duration
	wait   time.Duration
}

// groupReads turns a trace into reads. Events that start at the same instant
// are one read (a FUSE read spanning several blocks). The application's own
// time before read k is its start minus the previous read's start and wait
// (never negative: reads of several threads overlap).
func groupReads(tr *trace.Trace) []read {
	var out []read
	var prevEnd time.Duration
	for i := 0; i < len(tr.Events); {
		at := time.Duration(tr.Events[i].At)
		r := read{}
		j := i
		for ; j < len(tr.Events) && time.Duration(tr.Events[j].At) == at; j++ {
			r.blocks = append(r.blocks, tr.Events[j].Block)
			r.wait = max(r.wait, time.Duration(tr.Events[j].Wait))
		}
		r.think = max(at-prevEnd, 0)
		prevEnd = max(prevEnd, at+r.wait)
		out = append(out, r)
		i = j
	}
	return out
}

// image is the block table the simulation works on: one flat.Block per
// table position, with a synthetic ID (the policies hash IDs; any uniform
// 32 bytes do) and the sizes of the trace where it has them, the average of
// the untouched blocks elsewhere.
type image struct {
	// id is the flat manifest's digest as a block ID: the key origin
	// groups are computed for (p2p.OriginGroup), and the manifest's ID.
	id     flat.BlockID
	blocks []flat.Block
	pos    map[flat.BlockID]uint32
	reads  []read
	// traceStored and traceSize are the stored and uncompressed bytes of
	// the blocks the trace touches.
	traceStored, traceSize int64
}

func newImage(w *Workload) *image {
	tr := w.Trace
	im := &image{blocks: make([]flat.Block, tr.Blocks), pos: make(map[flat.BlockID]uint32, tr.Blocks), reads: groupReads(tr)}
	if d, err := hex.DecodeString(strings.TrimPrefix(tr.Image, "sha256:")); err == nil && len(d) == len(im.id) {
		im.id = flat.BlockID(d)
	} else {
		im.id = sha256.Sum256([]byte(tr.Image))
	}
	known := make([]bool, tr.Blocks)
	for _, e := range tr.Events {
		im.blocks[e.Block].ULen, im.blocks[e.Block].CLen = e.Size, e.Stored
		known[e.Block] = true
		im.traceSize += int64(e.Size)
		im.traceStored += int64(e.Stored)
	}
	var avgU, avgC uint32
	if rest := int64(tr.Blocks - len(tr.Events)); rest > 0 {
		avgU = uint32(max(tr.ImageBytes-im.traceSize, 0) / rest)
		avgC = uint32(max(tr.StoredBytes-im.traceStored, 0) / rest)
	}
	var off uint64
	for i := range im.blocks {
		b := &im.blocks[i]
		if !known[i] {
			b.ULen, b.CLen = avgU, avgC
		}
		h := sha256.New()
		h.Write([]byte(tr.Image))
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(i))
		h.Write(n[:])
		h.Sum(b.ID[:0])
		im.pos[b.ID] = uint32(i)
		b.Offset = off
		off += uint64(b.CLen)
	}
	return im
}
