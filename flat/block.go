package flat

import (
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// ErrCorruptBlock is returned when a block's bytes do not match its ID.
var ErrCorruptBlock = errors.New("block does not match its id")

// blockDecoder decodes into the caller's buffer and no further
// (WithDecodeAllCapLimit): DecodeBlock gives it room for the block's
// ulen, so a frame that claims, or holds, more than its block is refused
// before it costs more than the block would.
var blockDecoder = func() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxBlockSize+1<<20),
		zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		panic(fmt.Sprintf("flat: zstd decoder: %v", err))
	}
	return d
}()

// DecodeBlock decompresses one stored block and verifies it against b.ID.
// dst, if large enough, is reused for the result; otherwise the result is
// allocated for b.ULen bytes, whatever the frame claims.
func DecodeBlock(b Block, compressed, dst []byte) ([]byte, error) {
	if len(compressed) != int(b.CLen) {
		return nil, fmt.Errorf("block %s: %d compressed bytes, want %d: %w", b.ID, len(compressed), b.CLen, ErrCorruptBlock)
	}
	if cap(dst) < int(b.ULen) {
		dst = make([]byte, 0, b.ULen)
	}
	out, err := blockDecoder.DecodeAll(compressed, dst[:0:b.ULen])
	if err != nil {
		return nil, fmt.Errorf("block %s: decompress: %v: %w", b.ID, err, ErrCorruptBlock)
	}
	if len(out) != int(b.ULen) || !b.ID.Verify(out) {
		return nil, fmt.Errorf("block %s: %w", b.ID, ErrCorruptBlock)
	}
	return out, nil
}
