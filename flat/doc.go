// Package flat defines Shoal's flattened image format: one tree instead of a
// stack of layers, with file contents cut into content-addressed blocks.
//
// A flat image is an OCI manifest whose first layer is the index and whose
// other layers are data blobs: zstd-compressed blocks stored back to back. The
// index carries the whole tree (modes, owners, mtimes, xattrs, symlinks, hard
// links, device nodes), each regular file's extents (block, offset, length)
// and the block table (block ID → data blob, offset, compressed length). It is
// small, fetched whole at mount and decoded in one pass, so every metadata
// operation of a lazy mount is answered from memory.
//
// Design choices, and why:
//
//   - Block IDs are SHA-256 of the uncompressed bytes (CIDv1, raw codec), so a
//     block is the same block whatever compressor or blob carried it, peers can
//     verify what they receive, and a DHT can carry the IDs unchanged.
//   - File contents are chunked with content-defined chunking (FastCDC over a
//     gear hash) over the concatenation of all regular files in path order.
//     Small files share a block, so starting a program touches few blocks;
//     cut points depend on content, so an unchanged file keeps its blocks in
//     the next image version even when files before it change size.
//   - Each block is compressed on its own so that one block can be fetched
//     with one HTTP Range request and verified alone.
//   - The index is a compact varint encoding (paths prefix-compressed, block
//     references delta-coded) wrapped in zstd. Decoding checks every count
//     against the bytes left, every reference against its table, and the tree
//     for order, parents and link targets, so a malformed index is an error,
//     never a panic.
//   - An index is untrusted input (anyone who can push an image wrote one),
//     so what decoding it costs is bounded by its bytes, never by what its
//     headers claim: a blob inflates at most MaxIndexRatio times (and to at
//     most MaxIndexSize), and decodes to at most MaxDecodedRatio times its
//     decompressed size in memory (and at most MaxDecodedSize), counted
//     record by record as they are parsed; tables grow as their records
//     arrive. Each limit broken is one error line that names it.
//   - Entries are sorted by path component by component, so a directory's
//     subtree is one contiguous run and lookups are binary searches.
//
// The byte-level specification is docs/flat-format.md in the repository.
package flat
