// Package fetch is the resolution chain behind lazyfs's Fetcher: given a
// block of a flat image, return its verified, uncompressed bytes from the
// local block cache if it is there, and otherwise from the first source that
// has it — today the registry, later peers ahead of it — storing what was
// fetched in the cache on the way.
//
//	im, _ := fetch.OpenImage(ctx, "registry.example/app:v1-shoal")
//	chain, _ := fetch.NewChain(store, []fetch.Source{im.Registry()})
//	data, _ := chain.Fetch(ctx, im.Index().Blocks[i])
//
// lazyfs declares the one-method Fetcher it needs, and an optional
// Prefetcher for readahead hints; Chain satisfies both (and Registry, for a
// cacheless reader, the first) without lazyfs importing this package.
//
// # Opening an image
//
// OpenImage resolves the reference with go-containerregistry, authenticating
// through a keychain (the Docker config and credential helpers by default),
// and makes one authenticated transport (transport.NewWithContext, pull
// scope) that every later request of the image reuses; ggcr's bearer
// transport refreshes an expired token on a 401 by itself. The manifest must
// be a flat image's: config flat.MediaTypeConfig, the index first, data blobs
// after. A plain image gets ErrNotFlat and a message naming the tag its flat
// form would have (FlatRef). Manifests are bounded before they are parsed
// (bounded.Transport under the authenticated transport: 4 MiB, 65,536 JSON
// values). The index blob is size-checked against the manifest (at most
// flat.MaxIndexSize) before it is read, read into a buffer that grows as
// its bytes arrive, hashed against its digest, and decoded and validated by
// flat.DecodeBlob; every data blob it names must be a layer of the
// manifest, with the same size.
//
// # Why Range requests
//
// Containers read a few percent of their image. A data blob holds many
// compressed blocks back to back, so one block is one byte range of one blob,
// which every OCI registry (and the object stores they redirect blob GETs to)
// serves with an HTTP Range request: no registry extension, no sidecar
// service, and the registry sees about the bytes that are read. The reader
// issues plain GETs on /v2/<repo>/blobs/<digest> with "Range: bytes=a-b" and
// follows redirects (Go resends the Range header; ggcr's transports attach
// credentials only for the registry's own host). It accepts 206 with a
// Content-Range covering the range, and also 200 — a server that ignores
// Range sends the whole blob — which it reads only up to the end of the range
// before closing. It asks for identity encoding so a gzip-happy server cannot
// turn the range into one of a different representation.
//
// # Merging
//
// FetchMany sorts the wanted blocks by blob and offset and merges a block
// into the previous request when it is in the same blob, the gap between
// them is at most the merge gap (default 64 KiB), and the request stays
// within the size cap (default 8 MiB). Blocks average 256 KiB uncompressed by
// default and the converter writes a file's blocks back to back, so the
// blocks of one sequential read become one request. Reading and discarding a
// 64 KiB gap takes 5 ms at 100 Mbit/s and 0.5 ms at 1 Gbit/s, less than a
// registry round trip usually costs (often with a redirect to storage). The
// cap bounds what one failure wastes, the memory of one response, and how
// long one request holds its deadline. Up to four merged requests run at once
// per FetchMany (WithParallelRequests).
//
// The merge is only as good as the batch. The Chain hands a source all the
// blocks one FetchMany call missed at once, and lazyfs's readahead arrives as
// Prefetch hints, which the Chain fetches in the background as one batch
// (up to four batches at once; further hints are dropped) into the cache,
// where the next Fetch finds them. Against the in-memory test registry,
// fetching all 100 blocks of a 1.6 MB test image is one request, and one
// block is one request of exactly its compressed length.
//
// # Deadlines and retries
//
// Every request has a deadline (default 30 s from send to last byte; the
// index gets one second more per MiB) and a stall timer (default 10 s with no
// byte, headers included) that catches a dead connection long before the
// deadline. A failed request is retried, four attempts in all, after a pause
// drawn uniformly from a window that starts at 200 ms and doubles up to 5 s
// (full jitter, so that many nodes failing together do not retry together),
// or after the server's Retry-After if longer (capped at 10 s). Retried:
// network errors, timeouts and stalls, 5xx, 429 and 408, bodies that end
// early, and blocks that fail verification. A retry asks again only for the
// blocks still missing, merged afresh. Not retried, and reported at once with
// a sentinel to test for: 404 (ErrNotFound), 401 and 403 (ErrDenied), other
// 4xx, certificate errors, a plain-HTTP registry spoken to over HTTPS, and
// the caller's own cancellation.
//
// # Verification before cache
//
// Every block is decompressed and checked against its ID (flat.DecodeBlock)
// inside the Registry, before it is returned, so a corrupt byte from the
// registry, a proxy or the wire is a retry, never a wrong byte. A block that
// is still corrupt after the last attempt fails with an error wrapping
// flat.ErrCorruptBlock; the other blocks of the same response are still
// served. The Chain verifies again whatever any source returns before it
// stores or serves it — the chain is the trust boundary for sources yet to
// be written, and SHA-256 of a block costs far less than fetching it — and
// the blockstore verifies on Put and again on every Get. A cached copy that
// has rotted (blockstore.ErrCorrupt; the store drops it) is a miss, fetched
// again. A fetched block the cache refuses (a full disk, a quota of pinned
// blocks) is logged and served from memory anyway.
//
// # Singleflight
//
// The Chain keeps one in-flight record per block ID. A FetchMany claims the
// blocks nobody is fetching, resolves them together (so they can be merged),
// and waits for the rest; a Fetch is a FetchMany of one. Concurrent readers
// of one block therefore cause one registry request. If the caller doing the
// fetch is cancelled, the waiters that are not take over the block rather
// than fail with someone else's cancellation. Every caller gets a slice of
// its own.
//
// # Where peers slot in
//
// A Source is FetchMany plus a Name. NewChain takes an ordered list: the
// swarm's peer source goes before the Registry, and gets every block the
// cache missed; whatever it does not deliver — not found, failed, too slow,
// or bytes that do not verify — falls through to the next source, and so to
// the registry. Stats counts bytes by source: a source named RegistryName is
// the registry, any other counts as peers. Origin coalescing (one designated
// fetcher per block across the swarm) belongs in the peer source, which can
// wait a bounded time for the designated peer before it lets the block fall
// through.
package fetch
