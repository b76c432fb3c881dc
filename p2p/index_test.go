package p2p

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/shoal-project/shoal/blockstore"
	"github.com/shoal-project/shoal/flat"
)

// blobStore is a node's block cache that can be made to lie: with corrupt
// set it serves every block with one byte flipped.
type blobStore struct {
	*blockstore.Store
	corrupt atomic.Bool
}

func (b *blobStore) Get(ctx context.Context, id flat.BlockID) ([]byte, error) {
	d, err := b.Store.Get(ctx, id)
	if err == nil && b.corrupt.Load() {
		d[len(d)/2] ^= 0xff
	}
	return d, err
}

// blobSwarm is k nodes on loopback that all provide one image's record and
// have found each other through the DHT, with nothing cached.
type blobSwarm struct {
	nodes    []*Node
	stores   []*blobStore
	ids      []peer.ID
	manifest []byte // the image's manifest: its sha256 is the image digest
	index    []byte // a stand-in index blob
	digest   string
	key      cid.Cid
	image    flat.BlockID
}

// newBlobImage makes a manifest-like blob (about a kilobyte of JSON) and an
// index-like one (120 KB) for name.
func newBlobImage(name string) (manifest, index []byte) {
	var b strings.Builder
	fmt.Fprintf(&b, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","name":%q,"layers":[`, name)
	for i := range 8 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"digest":"sha256:%x","size":%d}`, testData(uint64(len(name)+i), 32), 1000+i)
	}
	b.WriteString("]}")
	return []byte(b.String()), testData(uint64(len(name))<<8, 120<<10)
}

func startBlobSwarm(t *testing.T, name string, k int, tweak func(c *Config)) *blobSwarm {
	t.Helper()
	ctx := t.Context()
	bs := &blobSwarm{}
	bs.manifest, bs.index = newBlobImage(name)
	bs.image = flat.Sum(bs.manifest)
	bs.digest = "sha256:" + bs.image.Hex()
	var err error
	if bs.key, err = ImageKey(bs.digest); err != nil {
		t.Fatal(err)
	}
	for i := range k {
		st := &blobStore{Store: openStore(t, nil, nil)}
		cfg := Config{Blocks: st}
		if i > 0 {
			cfg.BootstrapPeers = bs.nodes[0].Addrs()
		}
		if tweak != nil {
			tweak(&cfg)
		}
		n := startNode(t, cfg)
		bs.nodes, bs.stores, bs.ids = append(bs.nodes, n), append(bs.stores, st), append(bs.ids, n.ID())
	}
	// Each node opens the image as ImageBlob does: it provides the
	// image's record early and counts as a member of the swarm (opening)
	// though it has not joined it.
	for i, n := range bs.nodes {
		eventually(t, 10*time.Second, fmt.Sprintf("node %d to provide the image", i), func() bool {
			n.startEarlyProvide(bs.key)
			return n.recentlyProvided(ctx, bs.key)
		})
	}
	for i, n := range bs.nodes {
		eventually(t, 10*time.Second, fmt.Sprintf("node %d to find the %d other providers", i, k-1), func() bool {
			provs, err := n.FindProviders(ctx, bs.key, 100)
			return err == nil && len(provs) == k-1
		})
	}
	return bs
}

// designated is the node every member designates for a blob: with at most
// OriginGroupSize nodes, the group is the whole swarm.
func (bs *blobSwarm) designated(id flat.BlockID) int {
	group := OriginGroup(bs.image, bs.ids, "", OriginGroupSize)
	return slices.Index(bs.ids, Designate(id, group, ""))
}

// indexRoles returns the index's ID, its designated node, and the others.
func (bs *blobSwarm) indexRoles() (id flat.BlockID, d int, others []int) {
	id = flat.Sum(bs.index)
	d = bs.designated(id)
	for i := range bs.nodes {
		if i != d {
			others = append(others, i)
		}
	}
	return id, d, others
}

// lookUp has node i look the image up now, while every node is there: a
// DHT lookup with a silent peer in its path waits out its dial (5 s;
// kad-dht's, not ImageBlob's), and ImageBlob reuses a recent lookup's
// answer.
func (bs *blobSwarm) lookUp(t *testing.T, i int) {
	t.Helper()
	if provs, err := bs.nodes[i].providers(t.Context(), bs.key, len(bs.nodes)-1); err != nil || len(provs) != len(bs.nodes)-1 {
		t.Fatalf("node %d found %d providers, %v", i, len(provs), err)
	}
}

// put gives node i a blob of the image, as ImageBlob (or the registry
// read after it) does: in its store, and served under the image.
func (bs *blobSwarm) put(t *testing.T, i int, blob []byte) {
	t.Helper()
	if err := bs.stores[i].Put(context.Background(), flat.Sum(blob), blob); err != nil {
		t.Error(err)
	}
	bs.nodes[i].addImageBlob(bs.digest, flat.Sum(blob))
}

// A node alone is its own designated fetcher: it hears so at once and
// reads the registry without waiting out OriginWait.
func TestImageBlobAlone(t *testing.T) {
	t.Parallel()
	manifest, index := newBlobImage("alone")
	digest := "sha256:" + flat.Sum(manifest).Hex()
	// A node that waited for anyone would wait at least BlobGrace: with
	// OriginWait 8 s that is 2 s, where the answer takes milliseconds.
	const wait = 8 * time.Second
	n := startNode(t, Config{Blocks: &blobStore{Store: openStore(t, nil, nil)}, OriginWait: wait})
	for _, call := range []struct {
		what string
		f    func() ([]byte, error)
	}{
		{"manifest", func() ([]byte, error) { return n.ImageManifest(t.Context(), digest, int64(len(manifest))) }},
		{"index", func() ([]byte, error) {
			return n.ImageIndex(t.Context(), digest, flat.Sum(index), int64(len(index)))
		}},
	} {
		start := time.Now()
		got, err := call.f()
		took := time.Since(start)
		if got != nil || !errors.Is(err, ErrNoIndex) || !strings.Contains(err.Error(), "designated fetcher") {
			t.Errorf("%s: %d bytes, err %v; want ErrNoIndex, designated", call.what, len(got), err)
		}
		if limit := BlobGrace(wait); took >= limit {
			t.Errorf("%s: the lone node waited %v for its answer (a grace is %v)", call.what, took, limit)
		}
		t.Logf("%s: %v after %v", call.what, err, took)
	}
	if g := n.imageGroup(digest); len(g) != 1 || g[0] != n.ID() {
		t.Errorf("lone node's origin group %v, want itself", g)
	}
	if st := n.Stats(); st.ManifestsFetched != 0 || st.IndexesFetched != 0 || st.ComingUndelivered != 0 {
		t.Errorf("stats %+v", st)
	}
}

// Five nodes provide the image; one that is not the designated fetcher
// holds the manifest and the index in its block cache. Every other node
// gets both from the swarm, verified: the designated one from its quick
// pass over the other providers (a swarm that has run a while holds the
// blob), the others from their passes.
func TestImageBlobFromHolder(t *testing.T) {
	t.Parallel()
	// OriginWait is what the designated node must not wait out; 6 s
	// leaves a loaded machine room under the limit below.
	const wait = 6 * time.Second
	bs := startBlobSwarm(t, "from-holder", 5, func(c *Config) { c.OriginWait = wait })
	d := bs.designated(bs.image)
	holder := (d + 1) % len(bs.nodes)
	bs.put(t, holder, bs.manifest)
	bs.put(t, holder, bs.index)
	indexID := flat.Sum(bs.index)

	var wg sync.WaitGroup
	for i, n := range bs.nodes {
		if i == holder {
			continue
		}
		wg.Go(func() {
			start := time.Now()
			m, merr := n.ImageManifest(t.Context(), bs.digest, int64(len(bs.manifest)))
			mtook := time.Since(start)
			x, xerr := n.ImageIndex(t.Context(), bs.digest, indexID, int64(len(bs.index)))
			took := time.Since(start)
			// One quick pass takes tens of milliseconds, up to about 500
			// on a loaded machine (the other nodes then take as long),
			// where waiting out OriginWait would take all of it.
			if limit := wait / 2; i == d && mtook > limit {
				t.Errorf("designated node %d: manifest after %v (limit %v); want one quick pass", i, mtook, limit)
			}
			// The designated fetcher of a blob asks 3 of the 4 others: it
			// may miss the holder, and then reads the registry.
			check := func(what string, got, want []byte, err error, designated bool) {
				if designated && errors.Is(err, ErrNoIndex) {
					return
				}
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("node %d: %s %d bytes, err %v", i, what, len(got), err)
				}
			}
			check("manifest", m, bs.manifest, merr, i == d)
			check("index", x, bs.index, xerr, i == bs.designated(indexID))
			st := n.Stats()
			if (st.ManifestsFetched != 1 && i != d) || st.BadBlocks != 0 {
				t.Errorf("node %d stats %+v", i, st)
			}
			t.Logf("node %d: manifest in %v, index in %v", i, mtook, took-mtook)
		})
	}
	wg.Wait()
	want := OriginGroup(bs.image, bs.ids, "", OriginGroupSize)
	for i, n := range bs.nodes {
		if i == holder {
			continue
		}
		if g := n.imageGroup(bs.digest); !slices.Equal(g, want) {
			t.Errorf("node %d: origin group %v, want %v", i, short(g), short(want))
		}
	}
	if st := bs.nodes[holder].Stats(); st.BlocksServed == 0 {
		t.Errorf("the holder served nothing: %+v", st)
	}
	// The early provide is done once per image while it is fresh.
	asker := bs.nodes[(holder+1)%len(bs.nodes)]
	eventually(t, 10*time.Second, "the early provide to succeed", func() bool { return asker.recentlyProvided(t.Context(), bs.key) })
	before := asker.Stats().DHTProvides
	if _, err := asker.ImageManifest(t.Context(), bs.digest, int64(len(bs.manifest))); err != nil && !errors.Is(err, ErrNoIndex) {
		t.Error(err)
	}
	// A second early provide would be marked running before ImageManifest
	// returns; recentlyProvided waits for a running one to end, and
	// Provide counts before it publishes: the count is final here.
	if !asker.recentlyProvided(t.Context(), bs.key) {
		t.Error("the early provide is no longer recorded")
	}
	if after := asker.Stats().DHTProvides; after != before {
		t.Errorf("a second ImageManifest provided the record again (%d → %d provides)", before, after)
	}
}

// Nobody holds the manifest when six nodes ask for it at once; the
// designated node has it (from the registry, in the daemon) 300 ms later.
// Every asker keeps polling, gets it before OriginWait, and keeps it for
// the others, as node.Resolve does: nobody reads the registry but the
// designated node.
func TestImageBlobPolling(t *testing.T) {
	t.Parallel()
	const k, late, wait = 7, 300 * time.Millisecond, 2 * time.Second
	bs := startBlobSwarm(t, "polling", k, func(c *Config) { c.OriginWait = wait })
	d := bs.designated(bs.image)

	var wg sync.WaitGroup
	start := make(chan struct{})
	took := make([]time.Duration, k)
	for i, n := range bs.nodes {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			m, err := n.ImageManifest(t.Context(), bs.digest, int64(len(bs.manifest)))
			took[i] = time.Since(t0)
			if i == d {
				if !errors.Is(err, ErrNoIndex) {
					t.Errorf("designated node %d: %v, want ErrNoIndex", i, err)
				}
				time.Sleep(late - took[i]) // the registry read
				bs.put(t, i, bs.manifest)
				return
			}
			if err != nil || !bytes.Equal(m, bs.manifest) {
				t.Errorf("node %d: %d bytes after %v, err %v (a registry read)", i, len(m), took[i], err)
				return
			}
			bs.put(t, i, m) // kept for the others
		})
	}
	close(start)
	wg.Wait()
	var served int64
	for i, n := range bs.nodes {
		st := n.Stats()
		served += st.BlocksServed
		if i != d && (took[i] < late-50*time.Millisecond || took[i] > wait) {
			t.Errorf("node %d had the manifest after %v: want after the designated node had it (%v), before OriginWait (%v)", i, took[i], late, wait)
		}
		t.Logf("node %d (designated %v): %v; served %d, not found %d, busy received %d", i, i == d, took[i], st.BlocksServed, st.NotFoundServed, st.BusyReceived)
	}
	if served != k-1 {
		t.Errorf("%d copies served, want one per asker (%d)", served, k-1)
	}
}

// A provider at a silent address among the candidates does not hold a
// pass for its dial: ImageBlob drops it after DesignatedHedge and goes on
// polling the others. Here nobody holds the index at first (the designated
// node never fetches it); a holder has it after late, and the reader gets
// it from the holder soon after. Before, the reader's first pass stuck on
// the silent provider until OriginWait ran out.
func TestImageBlobSilentProvider(t *testing.T) {
	t.Parallel()
	const late, wait = 300 * time.Millisecond, 3 * time.Second
	bs := startBlobSwarm(t, "silent-provider", 4, func(c *Config) { c.OriginWait = wait })
	id, _, others := bs.indexRoles()
	reader, holder, silent := others[0], others[1], others[2]
	bs.lookUp(t, reader)
	silence(t, bs.nodes[silent], []*Node{bs.nodes[reader]})
	time.AfterFunc(late, func() { bs.put(t, holder, bs.index) })

	start := time.Now()
	x, err := bs.nodes[reader].ImageIndex(t.Context(), bs.digest, id, int64(len(bs.index)))
	took := time.Since(start)
	st := bs.nodes[reader].Stats()
	t.Logf("reader: %d bytes, %v after %v; %d slow dials", len(x), err, took, st.DesignatedSlow)
	if err != nil || !bytes.Equal(x, bs.index) {
		t.Fatalf("reader: %d bytes, %v after %v; want the index from the holder", len(x), err, took)
	}
	if limit := late + DesignatedDial; took > limit {
		t.Errorf("the reader had the index after %v (limit %v): a pass waited on the silent provider", took, limit)
	}
	if st.DesignatedSlow == 0 {
		t.Error("no dial was taken for slow: the reader never asked the silent provider")
	}
}

// The designated node lies: it serves the manifest with a byte flipped.
// Every asker catches it, strikes it, and gets the manifest from an honest
// holder.
func TestImageBlobHostilePeer(t *testing.T) {
	t.Parallel()
	bs := startBlobSwarm(t, "hostile", 4, nil)
	d := bs.designated(bs.image)
	honest := (d + 1) % len(bs.nodes)
	bs.stores[d].corrupt.Store(true)
	bs.put(t, d, bs.manifest)
	bs.put(t, honest, bs.manifest)
	for i, n := range bs.nodes {
		if i == d || i == honest {
			continue
		}
		m, err := n.ImageManifest(t.Context(), bs.digest, int64(len(bs.manifest)))
		if err != nil || !bytes.Equal(m, bs.manifest) {
			t.Errorf("node %d: %d bytes, err %v", i, len(m), err)
		}
		st := n.Stats()
		pi, _ := n.PeerInfo(bs.ids[d])
		if st.BadBlocks != 1 || pi.Strikes != 1 {
			t.Errorf("node %d: %d bad blocks, %d strikes against the liar; want 1 and 1", i, st.BadBlocks, pi.Strikes)
		}
	}
}

// Nobody ever holds the index. The designated node gives up at once.
// Every other node passes over each member ahead of it in the index's
// rendezvous order after BlobGrace (a designated fetcher that delivers
// nothing is taken for one that lies), and gives up when its own turn
// comes: BlobGrace times its rank, and never after OriginWait. Each must
// give up within the grace of its own turn (not at the next turn, nor at
// once); with OriginWait 4 s a grace is 1 s, the room a loaded machine has
// either way.
func TestImageBlobNobodyHolds(t *testing.T) {
	t.Parallel()
	const wait = 4 * time.Second
	bs := startBlobSwarm(t, "nobody", 3, func(c *Config) { c.OriginWait = wait })
	id := flat.Sum(bs.index)
	rank := map[int]int{}
	for rest := slices.Clone(bs.ids); len(rest) > 0; {
		d := Designate(id, OriginGroup(bs.image, rest, "", OriginGroupSize), "")
		rank[slices.Index(bs.ids, d)] = len(rank)
		rest = slices.DeleteFunc(rest, func(p peer.ID) bool { return p == d })
	}
	for i, n := range bs.nodes {
		start := time.Now()
		x, err := n.ImageIndex(t.Context(), bs.digest, id, int64(len(bs.index)))
		took := time.Since(start)
		t.Logf("node %d (rank %d): %v after %v", i, rank[i], err, took)
		if x != nil || !errors.Is(err, ErrNoIndex) {
			t.Errorf("node %d: %d bytes, err %v; want ErrNoIndex", i, len(x), err)
		}
		grace := BlobGrace(wait)
		turn := min(time.Duration(rank[i])*grace, wait)
		lo, hi := max(turn-grace/2, 0), turn+grace
		if took < lo || took >= hi {
			t.Errorf("node %d (rank %d) gave up after %v, want between %v and %v", i, rank[i], took, lo, hi)
		}
		if st := n.Stats(); st.ComingUndelivered != int64(rank[i]) {
			t.Errorf("node %d (rank %d) passed over %d designated fetchers, want %d", i, rank[i], st.ComingUndelivered, rank[i])
		}
	}
}

// The index's designated fetcher is gone, or is up but left the image
// (it answers NOT_MEMBER): the member next in the index's rendezvous order
// takes its place for every node that finds it so. That member hears at
// once that it is the designated fetcher now (it reads the registry and
// keeps the blob), and the others get the index from it long before
// OriginWait — not each from the registry after it, as when nobody took
// the designated fetcher's place.
func TestImageBlobDesignatedGone(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"gone", "silent", "left"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			// Nobody waits here: a node that waited out OriginWait, or
			// BlobGrace (a quarter of it) for the gone member, would take
			// longer than the limit; 6 s leaves a loaded machine room.
			// A silent designated fetcher costs DesignatedHedge (about
			// 200 ms here); one that waited out its dial would take all
			// of DesignatedDial.
			const wait = 6 * time.Second
			limit := BlobGrace(wait)
			if mode == "silent" {
				limit = DesignatedDial
			}
			bs := startBlobSwarm(t, "designated-"+mode, 4, func(c *Config) { c.OriginWait = wait })
			id, d, live := bs.indexRoles()
			switch mode {
			case "left":
				bs.nodes[d].LeaveImage(bs.digest)
			case "silent":
				var others []*Node
				for _, i := range live {
					bs.lookUp(t, i)
					others = append(others, bs.nodes[i])
				}
				silence(t, bs.nodes[d], others)
			default:
				if err := bs.nodes[d].Close(); err != nil {
					t.Logf("close: %v", err)
				}
				eventually(t, 10*time.Second, "the others to see the gone node's connections close", func() bool {
					for _, i := range live {
						if bs.nodes[i].host.Network().Connectedness(bs.ids[d]) == network.Connected {
							return false
						}
					}
					return true
				})
			}
			rest := slices.DeleteFunc(slices.Clone(bs.ids), func(p peer.ID) bool { return p == bs.ids[d] })
			next := slices.Index(bs.ids, Designate(id, OriginGroup(bs.image, rest, "", OriginGroupSize), ""))

			start := time.Now()
			x, err := bs.nodes[next].ImageIndex(t.Context(), bs.digest, id, int64(len(bs.index)))
			took := time.Since(start)
			t.Logf("next member, node %d: %v after %v", next, err, took)
			if x != nil || !errors.Is(err, ErrNoIndex) || took >= limit {
				t.Fatalf("next member: %d bytes, %v after %v; want ErrNoIndex (designated now) at once", len(x), err, took)
			}
			bs.put(t, next, bs.index) // it read the registry, and keeps the blob

			for _, i := range live {
				if i == next {
					continue
				}
				start := time.Now()
				x, err := bs.nodes[i].ImageIndex(t.Context(), bs.digest, id, int64(len(bs.index)))
				took := time.Since(start)
				t.Logf("node %d: %d bytes, %v after %v", i, len(x), err, took)
				if err != nil || !bytes.Equal(x, bs.index) || took >= limit {
					t.Errorf("node %d: %d bytes, %v after %v; want the index from node %d at once", i, len(x), err, took, next)
				}
				st := bs.nodes[i].Stats()
				if st.IndexesFetched != 1 || st.OriginReplanned != 1 {
					t.Errorf("node %d: %d indexes fetched, %d replanned; want 1 and 1", i, st.IndexesFetched, st.OriginReplanned)
				}
				if mode == "left" && st.NotMemberReceived != 1 {
					t.Errorf("node %d: %d NOT_MEMBER answers, want 1", i, st.NotMemberReceived)
				}
			}
			if mode == "left" {
				if st := bs.nodes[d].Stats(); st.NotMemberSent != int64(len(live)) {
					t.Errorf("the node that left answered NOT_MEMBER %d times, want %d", st.NotMemberSent, len(live))
				}
			}
		})
	}
}
