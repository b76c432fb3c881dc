// Package blockstore is Shoal's local cache of content-addressed blocks: the
// bytes behind a flat.BlockID, kept on disk in a badger database, bounded by
// a byte quota with least-recently-used eviction, with pins for blocks that
// must stay. It is what a node serves to its peers and reads lazily-fetched
// files from, so its one hard rule is that it never returns a wrong byte.
//
// # Key layout
//
// Every key is one prefix byte followed by the 32 digest bytes of the ID:
//
//	'd' id → block bytes
//	'a' id → last-access sequence (uint64) | size (uint64), big endian
//	'p' id → pin count (uint32, big endian); absent means unpinned
//	"v"    → format version, checked by Open
//
// Block bytes larger than 1 KiB go to badger's value log, so the LSM tree
// holds only keys and small records and stays small and fast to scan. The
// access record and the pin count are separate keys because they change at
// very different rates and neither should need a read-modify-write of the
// other. Open scans 'a', 'p' and the keys (not values) of 'd' to rebuild the
// in-memory index; the block bytes are not read.
//
// # Verification
//
// Put hashes the caller's bytes and refuses them (ErrCorrupt) unless they
// match the ID. Get hashes what badger returns again before handing it out.
// The ID is the checksum, SHA-256 runs at about a gigabyte per second per
// core, which is cheap next to the network fetch a miss costs, and the
// failure it catches is the one that matters: badger does not check value-log
// checksums on read by default, writes are not synced (a power failure may
// lose recent blocks), and disks rot. A copy that fails is removed, reported to
// OnEvict, and Get returns ErrCorrupt, so the caller fetches the block again
// instead of serving bad data. Has answers from the index and does not verify.
//
// # Quota and LRU
//
// The quota counts block bytes, not badger's files: value-log garbage stays
// on disk until GC rewrites the file it sits in, so leave the file system
// room beyond the quota. GC runs every 5 minutes (WithGCInterval). Badger
// sees garbage only once a compaction has dropped the removed blocks'
// keys, which a cache that goes quiet after evicting would not start; so
// when the blocks removed since could fill half a value-log file and
// badger finds nothing to rewrite, GC flushes the memtables and compacts
// level 0 first (tens of milliseconds; writes wait meanwhile, and during
// each file's rewrite). The recency order lives in memory as a
// container/list of unpinned blocks plus a map; Put and Get move a block to
// the front. A Put that would exceed the quota evicts from the back in the
// same badger write batch that stores the new block; if evicting every
// unpinned block would not make room it returns ErrFull and evicts nothing.
// Evicted IDs go to the OnEvict hook, which is how the DHT provider records
// get withdrawn.
//
// Recency is persisted approximately: each use takes the next value of a
// per-store sequence counter, and the counters of touched blocks are written
// in batches (every ten seconds, or once 1024 blocks have been touched) and
// on Close. Open sorts blocks by their last written sequence. After a clean
// Close the order is exact; after a crash, uses since the last batch are
// forgotten and those blocks rank by their previous use. Writing every Get
// would turn reads into writes, and for a cache an order a few seconds stale
// is good enough.
//
// # Pins
//
// A pin count per ID is persisted under 'p'. A pinned block is kept out of
// the LRU list altogether, so it is never evicted and eviction never has to
// scan past it; Delete of a pinned block returns ErrPinned. Pinning an ID
// that is not stored is allowed and protects the block once it arrives, so a
// node can pin an image's blocks before fetching them. Unpinning the last pin
// makes the block evictable again as if it had just been used. A corrupt
// pinned block is still removed; its pins stay for the good copy.
//
// # Disk space
//
// Badger writes its WAL, value log and tables through memory-mapped files
// that are created sparse. When the file system fills up, a write into such a
// file is not an error but a SIGBUS that kills the process (badger issues
// #1682 and #1801). The store therefore checks free space (statfs) before
// every write and refuses it with ErrNoSpace, which wraps syscall.ENOSPC,
// when it would leave less than a reserve free (WithMinFreeSpace; by default
// enough for a memtable flush, a value-log GC rewrite and some compaction).
// Metadata writes (pins, deletes, access order) may use half of the reserve,
// so a full store stays manageable. The guard covers the store's own writes;
// another process filling the disk can still starve badger's background work.
// Errors from badger that are ENOSPC are translated to ErrNoSpace too.
//
// Bytes written beside the store and Put into it later (the mirror's spool
// files, blobs being downloaded) ask for room first with Reserve: refused
// with ErrFull when the quota, less pinned blocks and other reservations,
// could not hold them, and with ErrNoSpace when the file system has not that
// much free beyond the reserve. Until a reservation is released, block Puts
// leave its unwritten part free as well, so neither side can take the room
// promised to the other.
//
// # Crash safety
//
// A Put (or Pin) that returned survives the process being killed (SIGKILL,
// the OOM killer, a panic): badger copies every write into its write-ahead
// log and value log, which are shared memory maps, before the write
// returns, and the kernel keeps those pages when the process dies. It need
// not survive a power failure: badger's SyncWrites would make it, at 2 to 6
// times less Put throughput (BenchmarkPutSync), and a cache can fetch a lost
// block again. Callers that cannot (local conversions) call Sync, which
// flushes the file system, once they are done.
//
// A directory Open cannot open because of what it holds (garbage, truncated
// or corrupt MANIFEST, tables, value log or key registry, a file where the
// directory should be) is damage: Open renames it to <dir>.damaged-<UTC
// time>, removing any older damaged copy (one is kept, for a post-mortem;
// more could fill the disk), starts empty and logs one error line. A
// directory that is a mount point is emptied instead. Badger opens tables
// on goroutines of its own and panics there on a malformed one, so Open
// first reads every table the manifest lists itself, on its own goroutine,
// and recovers badger's panics. Environment failures are not damage and
// still fail Open: permission denied, a full or read-only file system,
// another open store holding the directory's lock (checked again with
// flock before anything is moved), an incompatible database.
//
// Close is bounded (WithCloseTimeout, 5 s by default): badger retries a
// memtable flush that fails (the directory was removed, the disk failed)
// once a second forever. On timeout Close logs one line and returns
// ErrCloseTimeout, leaving badger's goroutines behind for the exiting
// process. Badger's own log lines during Open and Close are held and, in
// those two cases, replaced by the summary line.
//
// # Concurrency
//
// All methods are safe for concurrent use. Writes to badger (puts,
// evictions, deletes, pins, access-order batches) are serialized by one
// mutex, which keeps the index and the database in step without per-block
// locking; hashing happens before it is taken. Reads take only a short lock
// on the index and read badger concurrently. Close waits for in-flight
// operations, stops the goroutine that runs value-log GC and persists access
// order, writes the access order and closes badger; afterwards every method
// returns ErrClosed.
package blockstore
