package flat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"

	"github.com/shoal-project/shoal/internal/hostile"
)

// FuzzDecode: any input either decodes into an index that validates and
// re-encodes to the same bytes, or fails with ErrMalformed; never a panic,
// and never an allocation over decodeCeiling for its size.
// The fuzzer mutates the body and the checksum is recomputed, so mutations
// reach the parser instead of dying at the checksum.
func FuzzDecode(f *testing.F) {
	body := func(raw []byte) []byte { return raw[:len(raw)-4] }
	raw, err := Encode(sampleIndexSorted())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(body(raw))
	f.Add(body(raw)[:len(raw)/2])
	min, _ := Encode(&Index{Entries: []Entry{{Type: TypeDir}}})
	f.Add(body(min))
	f.Add([]byte("SHOALIDX"))
	f.Fuzz(func(t *testing.T, in []byte) {
		b := binary.LittleEndian.AppendUint32(bytes.Clone(in), crc32.Checksum(in, castagnoli))
		var x *Index
		var err error
		decodeCeiling.Check(t, len(b), func() { x, err = Decode(b) })
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error without ErrMalformed: %v", err)
			}
			return
		}
		// The input need not be canonical (varints may be overlong), but
		// what it decodes to must survive a round trip unchanged.
		again, err := Encode(x)
		if err != nil {
			t.Fatalf("decoded index does not re-encode: %v", err)
		}
		y, err := Decode(again)
		if err != nil {
			t.Fatalf("re-encoded index does not decode: %v", err)
		}
		if third, _ := Encode(y); !bytes.Equal(third, again) {
			t.Fatalf("round trip changes the index")
		}
		for i := range x.Entries {
			x.Lookup(x.Entries[i].Path)
			x.Resolve(i)
		}
	})
}

// FuzzDecodeBlob covers the zstd wrapper as well, and its allocation
// ceiling: what a blob may inflate to.
func FuzzDecodeBlob(f *testing.F) {
	blob, err := EncodeBlob(sampleIndexSorted())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(blob)
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd})
	// A frame that claims a gigabyte, and one that holds a megabyte of
	// zeros: each was an allocation of what it claimed or held.
	f.Add(hostile.Zstd(17, 1<<30, hostile.Raw(magic[:])))
	f.Add(hostile.Zstd(17, -1, hostile.Raw(blob), hostile.Run(0, 1<<20)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var err error
		blobCeiling.Check(t, len(b), func() { _, err = DecodeBlob(b) })
		if err != nil && !errors.Is(err, ErrMalformed) {
			t.Fatalf("error without ErrMalformed: %v", err)
		}
	})
}
