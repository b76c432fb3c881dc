package blockstore

import (
	"encoding/binary"

	"github.com/shoal-project/shoal/flat"
)

// Key layout: one prefix byte followed by the 32 digest bytes of the block ID.
// Separate keys (rather than one record per block) let the frequently
// rewritten access record and the rarely written pin count change without a
// read-modify-write of each other, and keep the block bytes alone in the value
// log.
const (
	prefixData   byte = 'd' // block bytes
	prefixAccess byte = 'a' // last-access sequence (8 bytes) | size (8 bytes), big endian
	prefixPin    byte = 'p' // pin count, uint32 big endian; absent means zero
)

// versionKey holds formatVersion; Open refuses a directory holding another.
var versionKey = []byte("v")

// compactKey is written and dropped at once by Store.compactDeleted, which
// uses the drop to flush the memtables and compact level 0. Open ignores
// one left behind by a crash.
var compactKey = []byte("g")

const formatVersion = "shoal-blockstore/1"

const keyLen = 1 + len(flat.BlockID{})

func blockKey(prefix byte, id flat.BlockID) []byte {
	k := make([]byte, keyLen)
	k[0] = prefix
	copy(k[1:], id[:])
	return k
}

func idFromKey(k []byte) (flat.BlockID, bool) {
	if len(k) != keyLen {
		return flat.BlockID{}, false
	}
	return flat.BlockID(k[1:]), true
}

func encodeAccess(seq uint64, size int64) []byte {
	v := make([]byte, 16)
	binary.BigEndian.PutUint64(v, seq)
	binary.BigEndian.PutUint64(v[8:], uint64(size))
	return v
}

func decodeAccess(v []byte) (seq uint64, size int64, ok bool) {
	if len(v) != 16 {
		return 0, 0, false
	}
	size = int64(binary.BigEndian.Uint64(v[8:]))
	if size < 0 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(v), size, true
}

func encodePins(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }

func decodePins(v []byte) (uint32, bool) {
	if len(v) != 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}
