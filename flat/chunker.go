package flat

import (
	"fmt"
	"math/bits"
)

// DefaultAvgBlockSize is the chunker's default target block size. Smaller
// blocks fetch less that a program does not read; larger ones mean fewer
// requests and provider records. 256 KiB keeps a typical interpreter start
// under a few percent of a large image while a 5 GB image stays near 20k blocks.
const DefaultAvgBlockSize = 256 << 10

// Chunker finds content-defined cut points with FastCDC (normalized chunking,
// level 2) over a gear rolling hash. A cut point depends only on the bytes
// since the previous cut (hashing starts avg/4 bytes after it, and the hash
// remembers the last 64 bytes), so an insertion or deletion moves only the
// blocks around it and the cuts resynchronise after. The gear table is fixed by the format: changing it, or the
// size limits derived from the average, changes every block ID.
type Chunker struct {
	min, avg, max int
	maskS, maskL  uint64
}

// NewChunker returns a chunker whose blocks average about avg bytes, longer
// than avg/4 (except the last) and at most 4*avg. avg must be a
// power of two between 4 KiB and MaxBlockSize/4.
func NewChunker(avg int) (*Chunker, error) {
	if avg < 4<<10 || avg > MaxBlockSize/4 || avg&(avg-1) != 0 {
		return nil, fmt.Errorf("average block size %d: want a power of two between 4 KiB and %d", avg, MaxBlockSize/4)
	}
	b := bits.TrailingZeros(uint(avg))
	return &Chunker{
		min:   avg / 4,
		avg:   avg,
		max:   avg * 4,
		maskS: ^uint64(0) << (64 - (b + 2)), // harder to match below avg
		maskL: ^uint64(0) << (64 - (b - 2)), // easier to match above avg
	}, nil
}

// Max returns the longest block the chunker cuts.
func (c *Chunker) Max() int { return c.max }

// Cut returns the length of the next block at the start of data. Callers
// pass at least Max() bytes unless data is the end of the stream.
func (c *Chunker) Cut(data []byte) int {
	n := len(data)
	if n <= c.min {
		return n
	}
	n = min(n, c.max)
	normal := min(c.avg, n)
	var fp uint64
	i := c.min
	for ; i < normal; i++ {
		fp = fp<<1 + gear[data[i]]
		if fp&c.maskS == 0 {
			return i + 1
		}
	}
	for ; i < n; i++ {
		fp = fp<<1 + gear[data[i]]
		if fp&c.maskL == 0 {
			return i + 1
		}
	}
	return n
}

// gear is the gear hash table: 256 values from splitmix64 seeded with
// 0x5348_4f41_4c00_0001 ("SHOAL", format 1). It is part of the format.
var gear = func() (t [256]uint64) {
	s := uint64(0x53484f414c000001)
	for i := range t {
		s += 0x9e3779b97f4a7c15
		z := s
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		t[i] = z ^ z>>31
	}
	return t
}()
