package flat

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

func sampleIndex() *Index {
	id := func(s string) BlockID { return Sum([]byte(s)) }
	return &Index{
		Source:       "sha256:" + strings.Repeat("ab", 32),
		AvgBlockSize: 1 << 16,
		Blobs:        []Blob{{Digest: "sha256:" + strings.Repeat("cd", 32), Size: 300}},
		Blocks: []Block{
			{ID: id("one"), Blob: 0, Offset: 0, CLen: 100, ULen: 1000},
			{ID: id("two"), Blob: 0, Offset: 100, CLen: 200, ULen: 2000},
		},
		Entries: []Entry{
			{Path: "", Type: TypeDir, Mode: 0o755},
			{Path: "bin", Type: TypeDir, Mode: 0o755, MtimeSec: -5, MtimeNs: 7},
			{Path: "bin/sh", Type: TypeReg, Mode: 0o4755, UID: 1, GID: 2, Size: 1500,
				Extents: []Extent{{Block: 0, Offset: 0, Length: 1000}, {Block: 1, Offset: 0, Length: 500}},
				Xattrs:  []Xattr{{Name: "security.capability", Value: []byte{1, 0, 0, 2}}, {Name: "user.a", Value: nil}}},
			{Path: "bin/sh2", Type: TypeHardlink, Linkname: "bin/sh"},
			{Path: "bin/small", Type: TypeReg, Mode: 0o644, Size: 10, Extents: []Extent{{Block: 1, Offset: 500, Length: 10}}},
			{Path: "bin/x-y", Type: TypeSymlink, Mode: 0o777, Linkname: "/abs/../target"},
			{Path: "bin-z", Type: TypeDir, Mode: 0o700},
			{Path: "bin-z/empty", Type: TypeReg},
			{Path: "dev", Type: TypeDir, Mode: 0o755},
			{Path: "dev/null", Type: TypeChar, Mode: 0o666, DevMajor: 1, DevMinor: 3},
			{Path: "dev/sda", Type: TypeBlock, Mode: 0o660, DevMajor: 8},
			{Path: "dev/fifo", Type: TypeFIFO, Mode: 0o600},
		},
	}
}

// sampleIndexSorted puts dev/fifo before dev/null and dev/sda.
var sampleIndexSorted = func() *Index {
	x := sampleIndex()
	e := x.Entries
	e[9], e[10], e[11] = e[11], e[9], e[10]
	return x
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	x := sampleIndexSorted()
	blob, err := EncodeBlob(x)
	if err != nil {
		t.Fatal(err)
	}
	y, err := DecodeBlob(blob)
	if err != nil {
		t.Fatal(err)
	}
	raw1, _ := Encode(x)
	raw2, _ := Encode(y)
	if !bytes.Equal(raw1, raw2) {
		t.Fatal("decode(encode(x)) encodes differently")
	}
	if i, ok := y.Lookup("bin/sh2"); !ok || y.Resolve(i) != 2 {
		t.Errorf("hard link does not resolve to bin/sh")
	}
	if got := y.Children(0); len(got) != 3 {
		t.Errorf("root children = %v, want bin, bin-z, dev", got)
	}
	if y.ImageBytes() != 1510 {
		t.Errorf("ImageBytes = %d", y.ImageBytes())
	}
}

func TestComparePaths(t *testing.T) {
	t.Parallel()
	ordered := []string{"", "a", "a/b", "a/b/c", "a/c", "a-b", "a.b", "ab", "b"}
	for i := range ordered {
		for j := range ordered {
			got := ComparePaths(ordered[i], ordered[j])
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got != want {
				t.Errorf("ComparePaths(%q, %q) = %d, want %d", ordered[i], ordered[j], got, want)
			}
		}
	}
}

func TestValidateRejects(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		mutate func(x *Index)
		want   string
	}{
		{"no root", func(x *Index) { x.Entries = x.Entries[1:] }, "root"},
		{"out of order", func(x *Index) { x.Entries[1], x.Entries[6] = x.Entries[6], x.Entries[1] }, "order"},
		{"duplicate", func(x *Index) {
			x.Entries[2].Path = "bin"
			x.Entries[2].Type = TypeDir
			x.Entries[2].Size = 0
			x.Entries[2].Extents = nil
		}, "duplicate"},
		{"dotdot", func(x *Index) { x.Entries[6].Path = ".." }, "clean"},
		{"missing parent", func(x *Index) { x.Entries[7].Path = "nope/empty" }, "parent"},
		{"parent not dir", func(x *Index) { x.Entries[3].Path = "bin/sh/x" }, "parent"},
		{"extent past block", func(x *Index) { x.Entries[4].Extents[0].Offset = 1995 }, "outside block"},
		{"size mismatch", func(x *Index) { x.Entries[4].Size = 11 }, "size"},
		{"block out of range", func(x *Index) { x.Entries[4].Extents[0].Block = 9 }, "out of range"},
		{"block past blob", func(x *Index) { x.Blocks[1].CLen = 201 }, "outside blob"},
		{"duplicate block", func(x *Index) { x.Blocks[1].ID = x.Blocks[0].ID }, "duplicate id"},
		{"bad digest", func(x *Index) { x.Blobs[0].Digest = "md5:00" }, "digest"},
		{"hard link forward", func(x *Index) { x.Entries[3].Linkname = "bin/small" }, "earlier regular"},
		{"hard link to symlink", func(x *Index) { x.Entries[3].Linkname = "bin" }, "earlier regular"},
		{"mode bits", func(x *Index) { x.Entries[1].Mode = 0o40755 }, "mode"},
		{"xattr order", func(x *Index) { x.Entries[2].Xattrs[0].Name = "z" }, "xattr"},
		{"symlink empty", func(x *Index) { x.Entries[5].Linkname = "" }, "symlink"},
		{"device on file", func(x *Index) { x.Entries[4].DevMajor = 1 }, "device"},
		{"unknown type", func(x *Index) { x.Entries[9].Type = 99 }, "unknown type"},
		{"huge block", func(x *Index) { x.Blocks[0].ULen = MaxBlockSize + 1 }, "bad length"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			x := sampleIndexSorted()
			tc.mutate(x)
			_, err := Encode(x)
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrMalformed mentioning %q", err, tc.want)
			}
		})
	}
}

func TestDecodeRejectsDamage(t *testing.T) {
	t.Parallel()
	raw, err := Encode(sampleIndexSorted())
	if err != nil {
		t.Fatal(err)
	}
	for i := range raw {
		for _, b := range []byte{0x00, 0xff, raw[i] ^ 1} {
			if b == raw[i] {
				continue
			}
			bad := bytes.Clone(raw)
			bad[i] = b
			if _, err := Decode(bad); err == nil {
				t.Fatalf("byte %d set to %#x: decoded without error", i, b)
			}
		}
	}
	for n := range len(raw) {
		if _, err := Decode(raw[:n]); !errors.Is(err, ErrMalformed) {
			t.Fatalf("truncated to %d bytes: err = %v", n, err)
		}
	}
	if _, err := DecodeBlob([]byte("not zstd")); !errors.Is(err, ErrMalformed) {
		t.Fatalf("garbage blob: err = %v", err)
	}
}

func TestBlockIDs(t *testing.T) {
	t.Parallel()
	id := Sum([]byte("hello"))
	s := id.String()
	if !strings.HasPrefix(s, "bafkrei") {
		t.Errorf("CID %s is not CIDv1 raw sha2-256", s)
	}
	back, err := ParseID(s)
	if err != nil || back != id {
		t.Fatalf("ParseID(%s) = %v, %v", s, back, err)
	}
	for _, bad := range []string{"", "bafy", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
		"bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"} {
		if _, err := ParseID(bad); !errors.Is(err, ErrBadID) {
			t.Errorf("ParseID(%q) err = %v, want ErrBadID", bad, err)
		}
	}
}

func TestDecodeBlock(t *testing.T) {
	t.Parallel()
	data := bytes.Repeat([]byte("block"), 1000)
	enc := indexEncoder()
	comp := enc.EncodeAll(data, nil)
	b := Block{ID: Sum(data), CLen: uint32(len(comp)), ULen: uint32(len(data))}
	got, err := DecodeBlock(b, comp, nil)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("DecodeBlock = %v", err)
	}
	bad := bytes.Clone(comp)
	bad[len(bad)/2] ^= 0xff
	if _, err := DecodeBlock(b, bad, nil); !errors.Is(err, ErrCorruptBlock) {
		t.Errorf("corrupt block: err = %v", err)
	}
	other := enc.EncodeAll(bytes.Repeat([]byte("kcolb"), 1000), nil)
	b2 := b
	b2.CLen = uint32(len(other))
	if _, err := DecodeBlock(b2, other, nil); !errors.Is(err, ErrCorruptBlock) {
		t.Errorf("wrong block: err = %v", err)
	}
}

func TestChunker(t *testing.T) {
	t.Parallel()
	c, err := NewChunker(16 << 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []int{0, 1000, 3 << 10, 5 << 20, 24 << 10} {
		if _, err := NewChunker(bad); err == nil {
			t.Errorf("NewChunker(%d) accepted", bad)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	cuts := func(d []byte) []int {
		var out []int
		for off := 0; off < len(d); {
			n := c.Cut(d[off:])
			if n <= 0 || n > c.Max() || (n < c.min && off+n != len(d)) {
				t.Fatalf("bad cut %d at %d", n, off)
			}
			off += n
			out = append(out, off)
		}
		return out
	}
	a := cuts(data)
	if avg := len(data) / len(a); avg < 8<<10 || avg > 32<<10 {
		t.Errorf("average block %d bytes, want about 16 KiB", avg)
	}
	// Insert bytes near the start: cut points after it move by the same amount.
	ins := append(append(bytes.Clone(data[:1000]), []byte("inserted bytes")...), data[1000:]...)
	b := cuts(ins)
	set := map[int]bool{}
	for _, x := range b {
		set[x-14] = true
	}
	same := 0
	for _, x := range a {
		if set[x] {
			same++
		}
	}
	if same < len(a)-3 {
		t.Errorf("after an insertion only %d of %d cut points survive", same, len(a))
	}
}
