package hostile

import (
	"bytes"
	"hash/crc32"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// The frames decode, with the reference-compatible decoder, to what they
// claim to hold.
func TestZstd(t *testing.T) {
	parts := []Part{Raw([]byte("head")), Run(0, 300<<10), Raw(bytes.Repeat([]byte("x"), 200<<10)), Run('y', 5)}
	want, _ := io.ReadAll(Reader(parts...))
	for _, fcs := range []int64{-1, int64(len(want))} {
		frame := Zstd(20, fcs, parts...)
		d, err := zstd.NewReader(bytes.NewReader(append(frame, Skippable(10)...)), zstd.WithDecoderConcurrency(1))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(d)
		d.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("content size %d: %d bytes, %v; want %d bytes", fcs, len(got), err, len(want))
		}
	}
	if got, want := CRC32C(parts...), crc32.Checksum(want, crc32.MakeTable(crc32.Castagnoli)); got != want {
		t.Fatalf("CRC32C %x, want %x", got, want)
	}
	if n := len(Zstd(17, -1, Run(0, 1<<30))); n > 33<<10 {
		t.Fatalf("a GiB of zeros takes %d bytes", n)
	}
}
