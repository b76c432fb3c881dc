package flat

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
)

// BlockID names a block by the SHA-256 of its uncompressed bytes. On the wire
// and in the DHT it is the CIDv1 with the raw codec (0x55) and a sha2-256
// multihash; inside the index only the 32 digest bytes are stored, because the
// format version fixes the codec and the hash.
type BlockID [sha256.Size]byte

// ErrBadID is returned when a string or CID is not a Shoal block ID.
var ErrBadID = errors.New("not a shoal block id (want CIDv1, raw codec, sha2-256)")

// Sum returns the ID of data.
func Sum(data []byte) BlockID { return BlockID(sha256.Sum256(data)) }

// Verify reports whether data hashes to id.
func (id BlockID) Verify(data []byte) bool { return Sum(data) == id }

// IsZero reports whether id is the zero value (never a real block).
func (id BlockID) IsZero() bool { return id == BlockID{} }

// CID returns id as a CIDv1 (raw codec, sha2-256).
func (id BlockID) CID() cid.Cid {
	mh, err := multihash.Encode(id[:], multihash.SHA2_256)
	if err != nil {
		// Encode only fails for unknown codes or wrong lengths; both are fixed here.
		panic(fmt.Sprintf("flat: encode multihash: %v", err))
	}
	return cid.NewCidV1(cid.Raw, mh)
}

// String returns the CID string form (base32, "bafkrei...").
func (id BlockID) String() string { return id.CID().String() }

// Hex returns the digest as lowercase hex, as used in OCI digests.
func (id BlockID) Hex() string { return hex.EncodeToString(id[:]) }

// IDFromCID converts a CID back into a BlockID, rejecting any other codec or hash.
func IDFromCID(c cid.Cid) (BlockID, error) {
	if !c.Defined() || c.Version() != 1 || c.Type() != cid.Raw {
		return BlockID{}, ErrBadID
	}
	dec, err := multihash.Decode(c.Hash())
	if err != nil || dec.Code != multihash.SHA2_256 || len(dec.Digest) != sha256.Size {
		return BlockID{}, ErrBadID
	}
	return BlockID(dec.Digest), nil
}

// ParseID parses the CID string form of a block ID.
func ParseID(s string) (BlockID, error) {
	c, err := cid.Decode(s)
	if err != nil {
		return BlockID{}, fmt.Errorf("parse block id %q: %w", s, ErrBadID)
	}
	id, err := IDFromCID(c)
	if err != nil {
		return BlockID{}, fmt.Errorf("parse block id %q: %w", s, err)
	}
	return id, nil
}

// MarshalText implements encoding.TextMarshaler (the CID string).
func (id BlockID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *BlockID) UnmarshalText(b []byte) error {
	v, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}
