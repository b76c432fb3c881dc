package mirror

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/shoal-project/shoal/flat"
)

// ChunkSize is the block size blobs are cut into when kept. Fixed-size
// chunks are enough: gzip layers do not share blocks with each other
// anyway, and a fixed size makes a blob's recipe the same on every node.
const ChunkSize = 1 << 20

const (
	// maxRecipe matches p2p.MaxRecipeSize: a 64 GiB blob of 1 MiB blocks
	// has a 2 MiB recipe.
	maxRecipe = 4 << 20
	// maxRecipeBlob bounds the size field of any recipe; the real bound
	// is the caller's (MaxBlobSize, or 4 MiB for a manifest).
	maxRecipeBlob = 1 << 50
)

var recipeMagic = []byte("SHRC1")

// ErrBadRecipe is returned for a recipe that does not decode or does not
// describe the blob asked for.
var ErrBadRecipe = errors.New("mirror: bad blob recipe")

// recipe is how a kept blob is cut into blocks: chunk-size blocks in order,
// the last one shorter. Its bytes (encode) are
//
//	"SHRC1" | 32-byte blob digest | uvarint(size) | uvarint(chunk) | n × 32-byte block ID | sha256 of all before
//
// with n = ceil(size/chunk). The trailing checksum catches a kept recipe
// that rotted on disk; a recipe from a peer is trusted for nothing — its
// blocks are verified against its IDs and the blob against its digest.
type recipe struct {
	digest [32]byte
	size   int64
	chunk  int64
	ids    []flat.BlockID
}

// parseDigest accepts "sha256:<64 lowercase hex>" only.
func parseDigest(s string) ([32]byte, bool) {
	var d [32]byte
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok || len(h) != 64 || strings.ToLower(h) != h {
		return d, false
	}
	if _, err := hex.Decode(d[:], []byte(h)); err != nil {
		return d, false
	}
	return d, true
}

func (r *recipe) digestString() string { return "sha256:" + hex.EncodeToString(r.digest[:]) }

// block returns the i-th block: its ID, offset in the blob and length.
func (r *recipe) block(i int) (flat.BlockID, int64, int64) {
	off := int64(i) * r.chunk
	return r.ids[i], off, min(r.chunk, r.size-off)
}

func (r *recipe) encode() []byte {
	b := make([]byte, 0, len(recipeMagic)+32+20+32*len(r.ids)+32)
	b = append(b, recipeMagic...)
	b = append(b, r.digest[:]...)
	b = binary.AppendUvarint(b, uint64(r.size))
	b = binary.AppendUvarint(b, uint64(r.chunk))
	for _, id := range r.ids {
		b = append(b, id[:]...)
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

// recipeLen is the length of the recipe of a blob of size bytes.
func recipeLen(size int64) int {
	n := (size + ChunkSize - 1) / ChunkSize
	return len(recipeMagic) + 32 + uvarintLen(uint64(size)) + uvarintLen(ChunkSize) + 32*int(n) + 32
}

func uvarintLen(v uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], v)
}

// decodeRecipe decodes and checks a recipe of the blob digest, cut into
// ChunkSize blocks (the only chunk size: every node cuts a blob the same
// way). When size is known (≥ 0: the upstream's answer to the access
// check), the recipe must describe a blob of exactly that size, and its
// length, which follows from it, is checked before anything else; when it
// is not, the blob may be at most maxSize. Either way nothing is allocated
// from what the recipe claims: the block IDs are counted from the bytes
// present, so memory stays within the recipe's own size.
func decodeRecipe(b []byte, digest string, size, maxSize int64) (*recipe, error) {
	bad := func(format string, args ...any) (*recipe, error) {
		return nil, fmt.Errorf("%w: %s", ErrBadRecipe, fmt.Sprintf(format, args...))
	}
	wd, ok := parseDigest(digest)
	if !ok {
		return bad("digest %q", digest)
	}
	if size > maxSize {
		return bad("blob of %d bytes, limit %d", size, maxSize)
	}
	if len(b) > maxRecipe || len(b) < len(recipeMagic)+32+2+32 {
		return bad("%d bytes", len(b))
	}
	if size >= 0 && len(b) != recipeLen(size) {
		return bad("%d bytes, where a blob of %d bytes has a recipe of %d", len(b), size, recipeLen(size))
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return bad("checksum")
	}
	if !bytes.HasPrefix(body, recipeMagic) {
		return bad("magic")
	}
	body = body[len(recipeMagic):]
	r := &recipe{}
	copy(r.digest[:], body[:32])
	if r.digest != wd {
		return bad("for %s, want %s", r.digestString(), digest)
	}
	body = body[32:]
	rsize, n := binary.Uvarint(body)
	if n <= 0 {
		return bad("size")
	}
	body = body[n:]
	chunk, n := binary.Uvarint(body)
	if n <= 0 {
		return bad("chunk size")
	}
	body = body[n:]
	switch {
	case chunk != ChunkSize:
		return bad("chunk size %d, want %d", chunk, ChunkSize)
	case size >= 0 && rsize != uint64(size):
		return bad("blob of %d bytes, upstream states %d", rsize, size)
	case rsize > uint64(maxSize):
		return bad("blob of %d bytes, limit %d", rsize, maxSize)
	}
	count := (rsize + chunk - 1) / chunk
	if uint64(len(body)) != count*32 {
		return bad("%d bytes of block IDs for %d blocks", len(body), count)
	}
	r.size, r.chunk = int64(rsize), int64(chunk)
	r.ids = make([]flat.BlockID, count)
	for i := range r.ids {
		copy(r.ids[i][:], body[32*i:])
	}
	return r, nil
}
