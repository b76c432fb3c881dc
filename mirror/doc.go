// Package mirror is Shoal's registry mirror: an http.Handler that serves
// the read side of the OCI distribution API, so that containerd (through
// its hosts.toml) or any registry client pulls *standard*, unconverted
// images with their blobs coming from the swarm first and from the
// upstream registry only when no peer has them. See docs/mirror.md for the
// containerd and daemon configuration.
//
// # Endpoints
//
// GET and HEAD of /v2/, /v2/<name>/manifests/<tag|digest> and
// /v2/<name>/blobs/<digest>; everything else is 405 (other methods) or 404,
// with OCI error bodies ({"errors":[{"code","message"}]}). Blobs carry
// Docker-Content-Digest, Content-Type application/octet-stream,
// Content-Length, an ETag and Accept-Ranges; a single "bytes=" range (a-b,
// a-, -n) is answered 206 with Content-Range, a range starting past the end
// 416 (RANGE_INVALID, Content-Range bytes */size), and several ranges are
// ignored (the whole blob, 200, as RFC 9110 allows). Only sha256 digests
// are served.
//
// # Upstreams, and why the mirror is not an open proxy
//
// containerd sends mirror requests with ?ns=<the registry's host>. The
// mirror serves only the upstreams configured (Config.Upstreams: host,
// endpoint, plain HTTP); any other ns is 403 DENIED, and a request without
// ns goes to the one upstream marked Default, or is refused. Run the
// mirror on loopback: clients send it their registry credentials.
//
// # Who may read what (access.go)
//
// Content addressing proves what a blob is, not who may have it, so the
// mirror acts with each client's own credentials and serves what the
// upstream would serve that client, never more:
//
//   - A request's credential is its Authorization header: Basic is used
//     upstream as the client's username and password (ggcr's transport
//     trades them for a token where the registry has a token service),
//     Bearer is forwarded as a registry token, none is anonymous. The
//     daemon's keychain is used only for Upstream.SharedRepositories, for
//     every client. Upstream clients are cached per (keyed hash of the
//     credential, repository): a transport holds one credential only.
//   - A manifest or blob by digest is served — kept or not — after the
//     upstream answered 200 to a HEAD of it in the request's repository
//     with the request's credential (authorize); the answer is remembered
//     for CheckTTL (5 min) per credential, repository and digest. A tag's
//     GET upstream is its own check. A kept blob is thus never served
//     under a repository the upstream would 404 it in, nor to a client
//     the upstream would refuse. An upstream 401 becomes a 401 with a
//     Basic challenge (and /v2/ challenges clients without credentials),
//     which containerd, crane and CRI answer with the credentials they
//     hold for the registry.
//   - With the upstream unreachable, a positive answer up to OfflineGrace
//     (1 h) old still admits that credential; a repository declared
//     public (Upstream.PublicRepositories) admits anyone to public
//     content only (grantPublicOnly). Nothing else is served.
//
// Each kept blob has a class, recorded beside its recipe so that it
// survives restarts: public (its repository serves anonymous reads — the
// client's own anonymous check, or one anonymous HEAD per repository and
// CheckTTL — or is declared public), shared (daemon credentials), private
// (a client's credentials; also a recipe with no record, kept before
// classes existed). The class only rises. Public blobs go to any peer, by
// digest. Private and shared blobs go only to peers that proved they read
// the blob from the registry themselves, under a name derived from a
// window of its bytes (below); a private blob's digest is never announced
// and never answered.
//
// # Private blobs in the swarm (private.go)
//
// A private or shared blob's secret is p2p.PrivateBlob(digest, window),
// and its swarm name is derived from the secret: "sha256:<hex>" like a
// digest, of nothing a registry or DHT server sees. The window is
// windowLen (4 KiB) of the blob's bytes at offset
// sha256("shoal/mirror window v1\x00" ‖ digest ‖ size as 8 big-endian
// bytes), its first 8 bytes as a big-endian integer, mod (size − 4095):
// spread over the whole blob rather than its head, the part easiest to
// rebuild from public files.
//
//   - The rule: a blob gets a name only if it is at least 1 MiB and its
//     first bytes are gzip's (1f 8b) or zstd's (28 b5 2f fd) magic.
//     Smaller blobs (configs, tiny layers) and manifests always come from
//     upstream: a round trip saved is not worth a proof. An uncompressed
//     tar is excluded because its window may fall in bytes an outsider
//     knows (zero padding, a file of a public package). A compressed
//     window is known only to whoever can rebuild the layer's content up
//     to it, with the compressor's settings: a layer made only of public
//     files gives nothing away that an outsider could not build itself.
//   - The holder, when it keeps such a blob (and, at start, for each one
//     it kept, from the kept copy: names are never stored), reads the
//     window from its own verified copy, registers the secret with the
//     swarm (PrivatePeers.AddPrivate, p2p.Node.AddPrivate), and provides
//     the name, re-provided like public digests. Recipe and BlobBlocks
//     answer the name; p2p answers a request under the name only for a
//     peer that passed the proof-of-access handshake for it, and DENIED
//     otherwise. The name map is in memory, bounded (65,536).
//   - The asker (fetch), for a private or shared blob: the size from the
//     access check's HEAD, then one Range GET of the window upstream with
//     the client's credentials — which is also the client's proof that it
//     may read the blob — the name, and the same peer path as public
//     blobs under the name: providers, recipe, blocks, strikes, the whole
//     blob verified against its digest before any client sees a byte,
//     upstream on any failure (the window read included). The asker does
//     not see the magic before it asks, so a large uncompressed blob costs
//     one window read and a lookup that finds no holder.
//
// A node that once read a blob keeps its window as it keeps the blob, and
// can prove access after its credentials are revoked.
//
// # Manifests and tags
//
// A tag is always resolved upstream (a GET with the client's Accept
// header, bounded by TagTimeout, 10 s): a mirror must not serve a stale
// tag. The answer is checked against the Docker-Content-Digest upstream
// states, kept by its digest, and the tag's digest is remembered. Only when
// upstream is unreachable (no answer, 5xx, 429, timeout) is a tag answered
// from that remembered digest and its kept manifest; a 404 upstream is a
// 404. A manifest by digest is a blob like any other (below), capped at
// 4 MiB, fetched upstream from /manifests/ rather than /blobs/; its
// Content-Type is read from its own bytes (mediaType, or its shape), which
// the digest covers, so nothing unverified is ever stored beside it.
//
// # Blobs: kept as blocks, found by digest
//
// A kept blob lives in the node's block cache (Blocks, the badger
// blockstore) as fixed 1 MiB blocks (ChunkSize) named by their SHA-256
// like every Shoal block, plus a small recipe on disk: the blob digest,
// size, chunk size and the ordered block IDs, with a trailing checksum
// (recipe.go has the byte layout). Fixed-size chunks are enough: gzip
// layers do not share blocks with each other, and a fixed size makes the
// recipe the same on every node. A blob counts as kept while its recipe
// is on disk and every block is still cached (the cache may evict any
// block; the blob is then fetched again). The blocks are verified by the
// cache on every read.
//
// A request for a blob, once authorized, is served from, in order:
//
//  1. the kept copy (blocks read and verified as they are sent);
//  2. peers that announced it: a public blob's digest, or a private
//     one's name, is a DHT provider record (p2p.Node.ProvideBlob,
//     published when the blob is kept and every 12 h; a provide that
//     could not reach the DHT is retried every minute). A provider sends the recipe over /shoal/recipe/1 and the
//     blocks over /shoal/block/1, 8 per request, four requests at a time,
//     each batch asked of the providers in turn until one delivers. A
//     provider that answered BUSY a moment ago is still asked (last): a
//     blob often has one provider, and a batch turned away is asked again
//     for up to 6 s before the blob goes upstream;
//  3. upstream.
//
// A HEAD of a blob that is not kept starts its fetch too (a GET usually
// follows), and answers once the size may be told.
//
// Concurrent requests for a blob share one fetch (a flight): it fills an
// unlinked spool file under <Dir>/tmp and every request reads from it. A
// fetch started by a request finishes, and is kept, even if that request
// goes away (bounded by FetchTimeout, 30 min; an upstream silent for
// StallTimeout, 60 s, fails).
//
// # The spool's room (spool.go)
//
// A spool file lives on the block cache's file system, and its blob will
// be Put into the cache, so its room is reserved before a byte is written
// and writes past the reservation fail. The size reserved is the one the
// upstream stated at the access check (checks.size), else a recipe's, else
// the upstream answer's Content-Length, else 64 MiB steps as bytes arrive.
// The reservation counts against Config.MaxSpool (all flights together)
// and, when Blocks is a Space (*blockstore.Store), against the cache's
// quota less pinned blocks and other reservations — a blob the cache could
// not hold is not spooled — and against free space beyond the cache's
// reserve, which block Puts leave free while it is held. A fetch that does
// not fit fails with ErrSpoolFull; each of its requests then streams the
// blob from upstream on its own (streamUpstream: verified, last byte held
// back, nothing written or kept), or, if the upstream states no size or
// cannot be reached, gets 503 UNAVAILABLE. A manifest (4 MiB at most) is
// read into memory instead.
//
// # Verification, and what a client may see before it
//
// A recipe from a peer is trusted for nothing. It must describe the blob
// the upstream stated: the same size (when the access check's HEAD gave
// one), 1 MiB blocks, and the block count and length that follow; one that
// does not is refused before any block is asked for or a byte written, and
// its peer struck. Decoding allocates nothing from what the recipe claims,
// only in proportion to its own length (FuzzDecodeRecipe checks the
// ceiling). Without a known size (the upstream unreachable), the recipe's
// size is bounded by the spool's room. Each block is checked against the
// recipe's ID as it arrives (p2p checks it too), the assembled file is
// hashed against the blob digest, and only then is any byte
// readable by a client: the size a client is told is the verified one, and
// if the blob does not match, the peer is struck (p2p penalties: avoided
// after three strikes), the spool file is emptied and the blob comes from
// upstream instead — without the client having seen a byte.
//
// Upstream bytes are streamed to clients as they arrive, for time to first
// byte, under one rule: the last byte of the blob is held back until the
// whole blob matches its digest. If it does not, every response in
// progress is cut short of its Content-Length (the handler aborts the
// connection), so no client ever completes a wrong blob — and clients
// verify digests too. A blob whose size upstream does not announce is not
// streamed: it is served once verified. Nothing unverified is kept: blocks
// go into the cache after the whole blob matched, from the spool file.
// Manifests are never streamed.
//
// # Pulling at the same moment (coalesce.go)
//
// When many nodes pull the same image at once, nobody holds a layer when
// they look, and each would read every layer upstream. So a blob of known
// size of at least CoalesceMin (1 MiB) that no peer announced is pulled in
// ranges, when Peers is also a RangePeers (SwarmPeers is): the nodes
// pulling it join its pull (p2p.Node.JoinPull: a DHT record under a key
// derived from the blob's key, provided early, as an image's), and each
// ChunkSize range has one designated fetcher among them — rendezvous
// hashing over the pull's origin group, the designation flat blocks and
// image blobs use. The designee reads its ranges upstream, as its client,
// and serves each to the others over /shoal/range/1 as soon as it has
// landed (COMING, with progress, before); they read their own ranges and
// ask for the others. A designee that says nothing costs an asker
// BlobGrace (750 ms), then the next member is designated; one that says
// COMING and does not deliver costs OriginWait plus 4 s per MiB at most,
// then the range is read upstream; with no peer connected the blob
// streams from upstream as it did before. Upstream workers never wait on
// a peer: others wait for their queued ranges.
//
// The trust argument. Nothing upstream states a range's digest: the
// registry gives the whole blob's, and a sha256 midstate cannot be checked
// before the end. A range from a peer is therefore unverified bytes of the
// right length, and
//
//   - nothing of a blob with ranges from peers is readable by a client
//     before the whole blob matches its digest (readableLocked: not
//     streamed). Verification is where a client's bytes start, as for a
//     blob from peers' recipes; the blob is whole when the upstream has
//     sent one copy of it over its link, so a pull waits for little more
//     than its own last range would take;
//   - a node serves peers only ranges it read upstream itself, or of a
//     blob it verified whole (BlobRange): never bytes it got unverified,
//     so a wrong range always has its sender as its author;
//   - when the assembled blob fails its digest, every range from a peer is
//     read upstream again and compared: the peers whose bytes differ are
//     struck (p2p penalties), the upstream bytes replace them, and the
//     blob is verified again — a liar costs a node one more copy of what
//     it got from peers, never a wrong byte to a client;
//   - a private or shared blob is pulled under its swarm name, after the
//     window read that proves the client's access upstream; p2p serves
//     its ranges only to peers that proved access for the name, and its
//     pull record is derived from the name, so the DHT learns nothing of
//     the digest. A client the upstream refuses is refused before any of
//     this.
//
// Pulls (in progress, and the last 16) are listed with their bytes from
// peers and upstream for the status page (Pulls).
//
// After a blob is kept its provider record is announced — a public blob's
// digest, a private blob's name — so the next node finds it here.
//
// # Metrics
//
// Stats counts body bytes served by source (local, peers, upstream), bytes
// fetched from peers and upstream, requests, errors, fetches, bad peer
// blobs, upstream digest mismatches, announcements, access checks,
// refusals, window reads, the spool's room and the fetches it refused,
// kept blobs (all, public, named), and blobs pulled in ranges with their
// ranges by source and the ranges found wrong; the daemon exports them as
// shoal_mirror_* metrics.
package mirror
