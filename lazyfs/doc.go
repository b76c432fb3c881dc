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
// come from. A Fetcher that is also a [Prefetcher] gets readahead hints,
// and one that is also a [LocalChecker] lets lazyfs hand files whose blocks
// are all local to the kernel to read directly (WithBackingDir, below).
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
// extents by binary search). Nothing is built per lookup: lazyfs serves
// go-fuse's raw protocol, and a FUSE node ID is simply the inode number.
//
// # Inode numbers and hard links
//
// An entry's inode number is its position in the index plus one, so the
// root is 1 and the numbers are the same on every mount of the same image.
// A hard link has the number of the regular file it names: both names
// reach one kernel inode (the node ID is that number), stat shows the
// same st_ino and an st_nlink counting every name, and the
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
// Large files whose blocks are all local skip levels 3 and 4 altogether:
// see the next section.
//
// # Passthrough: local files read by the kernel
//
// Even with every block in the node's cache, a read through the daemon
// costs a FUSE round trip, a block store read and, in the block store, a
// SHA-256 per block; cold, that is well under half the speed of the same
// file on the local disk. With WithBackingDir, a regular file of at least
// WithPassthroughMinSize bytes (256 KiB by default) whose blocks are all
// local is materialized: written out, decompressed, as a plain file in the
// backing directory. Later opens hand that file to the kernel (FUSE
// passthrough, Linux 6.9 and later: the open carries a backing ID the
// kernel was given for that file), which then reads, maps and executes it as it would
// a local file: its reads never reach lazyfs. Small files stay on the block
// path, where the blocks they share with their neighbours are read once;
// a backing file each would cost an inode and an open per file for little.
//
// A backing file is named by a content key, a SHA-256 over the file's size
// and its extents' block IDs, offsets and lengths. Block IDs are hashes of
// the bytes, so the key pins down the contents: a backing file is written
// once and never changed, nothing needs invalidating when an image goes
// away, and identical files of different images (the same base layers
// under many images) share one.
//
// Files are materialized in the background, one at a time per mount, when
// they are opened or released with every block local (the Fetcher must be
// a LocalChecker; without one nothing is written, but backing files that
// exist are still used). Usually that is the release of a file that was
// just read to the end, so the next open is already passed through.
// Materializing reads local blocks only and never fetches: it would turn a
// read of a few bytes into the download of the whole file. A file is
// written to <key>.tmp, synced, and renamed, so a name without the suffix
// always holds the whole file, also after a crash; a process that starts
// using the directory removes the .tmp files, and a backing file of the
// wrong size is removed instead of used. Passthrough reads are not checked
// against block IDs (lazyfs never sees them): the bytes are checked once,
// on their way into the backing file, and from then on the directory is
// trusted like the rest of the node's state on that disk. Unmount cancels
// a materialization in flight and drops the queue; the next mount
// materializes those files when they are next opened.
//
// The directory has a byte budget, shared by the mounts of the process
// that use it, and counted from what is on disk when the first of them
// starts. To make room for a new file, the least recently opened files are
// removed (files from before the process started count as used when they
// were written); a file larger than the whole budget is never written.
// Removing a file that is open does no harm: the kernel and lazyfs keep
// reading it until it is closed.
//
// The kernel refuses a passthrough open of a file that is open through
// the page cache, and the reverse, failing the second open with EIO. So
// the handles of a file are all of one kind at a time: a file opened the
// block way before it was materialized keeps being opened that way until
// its last such handle is released, and while one passthrough handle is
// open, every open of the file is one. A passthrough open does not carry
// FOPEN_KEEP_CACHE; its reads do not use the FUSE file's page cache, and
// whatever earlier opens left there are the same bytes.
//
// Without kernel support (an older kernel, a server without
// CAP_SYS_ADMIN, or a backing directory the kernel will not stack on, such
// as one on overlayfs), the first registration of a backing file fails and
// lazyfs stops trying for the mount. The same handles are then
// served by lazyfs, by pread from the backing file: a FUSE round trip per
// read still, but no block lookup or hash. Stats tell the two apart:
// PassthroughOpens counts backed opens, BackingReads the reads of them
// that reached lazyfs. Passthrough is negotiated only when a backing
// directory is set, since it makes the kernel count the mount as one level
// of file system stacking: an overlayfs on top (a container's root) is
// then at the kernel's limit of two and cannot itself be stacked on.
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
// and materialization in flight (waiting reads fail with EIO at once),
// unmounts, and waits for the server and every goroutine lazyfs started. A mount still busy with
// open files after a few retries is detached instead (umount -l): it
// leaves the tree at once, and the open files are served from memory until
// closed, when Wait returns. lazyfs makes the mount itself (mount(2) on a
// /dev/fuse descriptor it opened close-on-exec, so programs the daemon
// starts never hold the connection) and keeps the descriptor.
//
// # Handing a mount over
//
// Node IDs are inode numbers, directory handles carry nothing and file
// handles only readahead state, so the kernel holds no ID that another
// process serving the same index would not understand. Conn hands out the
// connection's descriptor; a process that gets it (the daemon's keeper
// keeps it across restarts) serves the mount on with Attach, which first
// has the kernel send again the requests the previous server read and
// never answered (FUSE_NOTIFY_RESEND, Linux 6.9). Detach stops answering
// reads before a handover, so they wait for the next server. The kernel
// allows one backing file per inode, so a file held open through
// passthrough can only be opened again with the same backing ID:
// WithHandoff reports the IDs in use, and Attach takes them; an attached
// mount passes through only those files, since it cannot know which files
// the previous process left open through the page cache.
//
// Processes that serve a mount must not page-fault on it themselves, nor
// fork a child that touches it before exec (go-fuse's package
// documentation explains the deadlocks); the tests map and exec files from
// the mount in child processes for that reason.
package lazyfs
