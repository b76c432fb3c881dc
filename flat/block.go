package flat

import (
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// ErrCorruptBlock is returned when a block's bytes do not match its ID.
var ErrCorruptBlock = errors.New("block does not match its id")

var blockDecoder = func() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxBlockSize+1<<20))
	if err != nil {
		panic(fmt.Sprintf("flat: zstd decoder: %v", err))
	}
	return d
}()

// DecodeBlock decompresses one stored block and verifies it against b.ID.
// dst, if large enough, is reused for the result.
func DecodeBlock(b Block, compressed, dst []byte) ([]byte, error) {
	if len(compressed) != int(b.CLen) {
		return nil, fmt.Errorf("block %s: %d compressed bytes, want %d: %w", b.ID, len(compressed), b.CLen, ErrCorruptBlock)
	}
	out, err := blockDecoder.DecodeAll(compressed, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("block %s: decompress: %v: %w", b.ID, err, ErrCorruptBlock)
	}
	if len(out) != int(b.ULen) || !b.ID.Verify(out) {
		return nil, fmt.Errorf("block %s: %w", b.ID, ErrCorruptBlock)
	}
	return out, nil
}
