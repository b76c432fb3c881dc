// Package lazyfs serves a flat image as a read-only FUSE file system whose
// file contents arrive lazily, block by block, the first time something
// reads them.
//
//	m, err := lazyfs.Mount(ctx, "/run/shoal/mnt/abc", index, fetcher)
//	...
//	defer m.Unmount()
//
// The tree comes from a [flat.Index], which is in memory before the mount
// exists. Block bytes come from a [Fetcher], an interface this package
// declares and the daemon implements with its resolution chain (local block
// cache, then peers, then the registry); lazyfs knows nothing of where bytes
// come from. A Fetcher that is also a [Prefetcher] gets readahead hints.
//
// # What is answered where
//
// Lookup, getattr, readdir, readlink, getxattr, listxattr and statfs are
// answered from the index and never touch the Fetcher, so walking,
// stat-ing and listing the whole tree costs no I/O at all; only reading a
// regular file's contents does. At mount, one pass over the index builds
// what those operations need, in a few flat arrays indexed by entry
// position: each directory's children in name order (lookup is a binary
// search), the parent of every entry, link counts, and for every regular
// file the file offset at which each extent starts (a read finds its
// extents by binary search). Nothing is built per lookup beyond the
// go-fuse inode the kernel asks for.
//
// # Inode numbers and hard links
//
// An entry's inode number is its position in the index plus one, so the
// root is 1 and the numbers are the same on every mount of the same image.
// A hard link has the number of the regular file it names: both names
// reach one go-fuse inode (go-fuse merges inodes with equal numbers), stat
// shows the same st_ino and an st_nlink counting every name, and the
// kernel shares one page cache between them. Directories have the usual
// link count of 2 plus their subdirectories.
//
// # Caching, from the kernel down
//
//  1. Names, attributes and failed lookups: the tree cannot change while
//     mounted, so entry, attribute and negative timeouts are an hour,
//     directory listings are cached (FOPEN_CACHE_DIR), and so are symlink
//     targets. The kernel stops asking almost at once.
//  2. File contents: every open returns FOPEN_KEEP_CACHE, so pages read once
//     stay in the page cache across opens and processes until memory
//     pressure evicts them; the data cache is under explicit control, so the
//     kernel never drops pages because an attribute looked changed. A read
//     that hits the page cache never reaches lazyfs, and runs as fast as
//     tmpfs (BenchmarkReadCached against BenchmarkReadTmpfs). The mount
//     also raises the kernel's readahead window (WithKernelReadahead, 1 MiB
//     by default, as root; the FUSE handshake cannot go past 128 KiB), so a
//     sequential reader sends fewer, larger READs, each spanning more blocks
//     whose fetches then run in parallel (BenchmarkReadBuffered).
//  3. Decompressed blocks: a small in-memory LRU (WithCacheBytes, 64 MiB by
//     default) of recently fetched blocks. The page cache holds what was
//     read; this cache exists because the kernel reads a block in several
//     requests (a block is up to 1 MiB at the default chunker settings,
//     kernel reads are 128 KiB to 1 MiB and not aligned to blocks), because
//     small files share blocks, and to hold readahead until it is read.
//     Replies are slices of the cached blocks, written to the kernel with
//     writev, with no copy in between.
//  4. Everything below (the local block store, peers) is the Fetcher's.
//
// # Reads
//
// A read maps its byte range to extents, looks up every block it needs at
// once, and waits for the missing ones together, so a read spanning
// several missing blocks takes as long as the slowest fetch, not their sum.
// Concurrent misses for one block, from any number of readers and from
// readahead, become one Fetch (singleflight per mount). The fetch is bound
// to the mount's lifetime and to the fetch timeout (WithFetchTimeout),
// never to the request that happened to start it, so one reader giving up
// does not fail the others.
//
// Reads ignore FUSE interrupts on purpose. The kernel interrupts a request
// whenever the reading thread receives any signal (Go programs receive
// SIGURG constantly), and an EINTR answered to a read that serves a page
// fault, as in exec or mmap, becomes SIGBUS in the application. A read
// waits until its blocks arrive, the fetch timeout passes, or the mount
// closes.
//
// # Readahead
//
// Each open file tracks its reader. A read that starts where the previous
// one ended, or that extends the furthest point read so far (the kernel's
// own readahead requests may arrive out of order), counts as sequential,
// and then the next WithReadahead blocks (4 by default) past the current
// one are requested ahead of need: passed to Prefetch when the Fetcher is
// a Prefetcher (so the chain can merge them into one ranged request), and
// otherwise fetched by lazyfs itself into the block cache, at most a few
// at a time; a hint that finds no free slot is dropped, since the read
// that needs the block fetches it anyway. Blocks already cached or already
// hinted are not asked for again, and a file that names one block many
// times (runs of zeros) does not make readahead walk all its extents.
//
// # Errors
//
// A fetch that fails, times out, or returns bytes that do not match the
// block (wrong length, or wrong SHA-256 when WithVerify is on, the
// default) fails every read waiting for that block with EIO, and is logged
// once with the block's ID. Nothing wrong is ever returned: bytes reach
// the kernel only from blocks that passed the checks. Failures are not
// remembered, so the next read of the block asks the Fetcher again; it is
// the chain's job to have tried every source before giving up. For a page
// fault, EIO becomes SIGBUS, as on any file system.
//
// # Files larger than 4 GiB, exec and mmap
//
// Offsets are 64-bit throughout (extent start offsets are uint64), so
// files beyond 4 GiB work, including extents that name the same block many
// times. Files are ordinary page-cache-backed FUSE files (no direct I/O),
// so mmap and exec work; the loader maps binaries through the same page
// cache.
//
// # Mount and unmount
//
// The mount is read-only in the VFS and the superblock, nosuid and nodev,
// with default_permissions: the kernel checks modes and owners from the
// index, so a mode-0600 file is private to its owner as in the image.
// WithAllowOther lets other users in at all. Unmount cancels every fetch
// in flight (waiting reads fail with EIO at once), unmounts, and waits for
// the server and every goroutine lazyfs started. A mount still busy with
// open files after a few retries is detached instead (umount -l): it
// leaves the tree at once, and the open files are served from memory until
// closed, when Wait returns. The mount's /dev/fuse descriptor is marked
// close-on-exec (go-fuse's direct mount leaves it inheritable), so programs
// the daemon starts never hold the connection open after the daemon exits.
//
// Processes that serve a mount must not page-fault on it themselves, nor
// fork a child that touches it before exec (go-fuse's package
// documentation explains the deadlocks); the tests map and exec files from
// the mount in child processes for that reason.
package lazyfs
