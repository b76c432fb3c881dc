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
// classes existed). The class only rises. Only public blobs are announced,
// re-provided, returned by Recipe and fetched from peers: the swarm holds
// no proof yet that a peer may read a private repository.
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
//  2. for a public blob, peers that announced it: its digest is a DHT provider record
//     (p2p.Node.ProvideBlob, published when the blob is kept and every
//     12 h; a provide that could not reach the DHT is retried every
//     minute). A provider sends the recipe over /shoal/recipe/1 and the
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
// # Verification, and what a client may see before it
//
// A recipe from a peer is trusted for nothing. Each block is checked
// against the recipe's ID as it arrives (p2p checks it too), the assembled
// file is hashed against the blob digest, and only then is any byte
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
// After a public blob is kept its provider record is announced, so the
// next node finds it here.
//
// # Metrics
//
// Stats counts body bytes served by source (local, peers, upstream), bytes
// fetched from peers and upstream, requests, errors, fetches, bad peer
// blobs, upstream digest mismatches, announcements, access checks,
// refusals, and kept blobs (all, public); the daemon exports them as
// shoal_mirror_* metrics.
package mirror
