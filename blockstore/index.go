package blockstore

import (
	"container/list"
	"fmt"

	"github.com/shoal-project/shoal/flat"
)

// entry is the in-memory record of one stored block.
type entry struct {
	id   flat.BlockID
	size int64
	seq  uint64        // last-access sequence number; higher is more recent
	elem *list.Element // position in index.lru; nil exactly while the block is pinned
}

// index is the in-memory view of the store: which blocks it holds, their
// recency and their pins. Callers hold Store.mu.
type index struct {
	entries map[flat.BlockID]*entry
	// lru holds the unpinned blocks, most recently used at the front. Pinned
	// blocks are kept out of it so eviction never has to skip over them.
	lru *list.List
	// pins counts pins per ID, for stored and not-yet-stored blocks alike.
	pins map[flat.BlockID]uint32
	// dirty holds the blocks whose seq changed since the access order was
	// last persisted.
	dirty map[flat.BlockID]struct{}

	used        int64 // bytes of all stored blocks
	pinnedBytes int64 // bytes of stored blocks with pins > 0
	// garbage counts the bytes of removed blocks that sat in the value
	// log, since value-log GC last made badger account for them
	// (Store.collectGarbage).
	garbage int64
	seq     uint64
}

func newIndex() *index {
	return &index{
		entries: make(map[flat.BlockID]*entry),
		lru:     list.New(),
		pins:    make(map[flat.BlockID]uint32),
		dirty:   make(map[flat.BlockID]struct{}),
	}
}

func (x *index) nextSeq() uint64 {
	x.seq++
	return x.seq
}

// add records a stored block, placing it in the LRU by its seq.
func (x *index) add(e *entry) {
	x.entries[e.id] = e
	x.used += e.size
	if x.pins[e.id] > 0 {
		x.pinnedBytes += e.size
		return
	}
	x.link(e)
}

// link inserts e into the LRU list ordered by seq. New and touched blocks
// carry the highest seq and go straight to the front; only restoring an
// entry after a failed write walks the list.
func (x *index) link(e *entry) {
	if f := x.lru.Front(); f == nil || f.Value.(*entry).seq <= e.seq {
		e.elem = x.lru.PushFront(e)
		return
	}
	for el := x.lru.Back(); el != nil; el = el.Prev() {
		if el.Value.(*entry).seq > e.seq {
			e.elem = x.lru.InsertAfter(e, el)
			return
		}
	}
	e.elem = x.lru.PushFront(e)
}

func (x *index) remove(e *entry) {
	delete(x.entries, e.id)
	delete(x.dirty, e.id)
	x.used -= e.size
	if e.size > valueThreshold {
		x.garbage += e.size
	}
	if e.elem != nil {
		x.lru.Remove(e.elem)
		e.elem = nil
	} else {
		x.pinnedBytes -= e.size
	}
}

// touch marks e as just used.
func (x *index) touch(e *entry) {
	e.seq = x.nextSeq()
	if e.elem != nil {
		x.lru.MoveToFront(e.elem)
	}
	x.dirty[e.id] = struct{}{}
}

// setPins records the new pin count of id and moves a stored block out of or
// back into the LRU. Unpinning counts as a use: the block was in use until now.
func (x *index) setPins(id flat.BlockID, n uint32) {
	old := x.pins[id]
	if n == 0 {
		delete(x.pins, id)
	} else {
		x.pins[id] = n
	}
	e := x.entries[id]
	switch {
	case e == nil:
	case old == 0 && n > 0:
		x.lru.Remove(e.elem)
		e.elem = nil
		x.pinnedBytes += e.size
	case old > 0 && n == 0:
		x.pinnedBytes -= e.size
		e.seq = x.nextSeq()
		x.dirty[id] = struct{}{}
		e.elem = x.lru.PushFront(e)
	}
}

// victims picks the least recently used unpinned blocks, skipping those in
// keep, whose removal makes need bytes fit in quota. It changes nothing; if
// evicting every candidate would not be enough it returns ErrFull.
func (x *index) victims(need, quota int64, keep map[flat.BlockID]struct{}) ([]*entry, error) {
	if quota == 0 {
		return nil, nil
	}
	if need > quota {
		return nil, fmt.Errorf("%w: %d bytes exceed the quota of %d", ErrFull, need, quota)
	}
	room := quota - x.used
	var out []*entry
	for el := x.lru.Back(); el != nil && room < need; el = el.Prev() {
		e := el.Value.(*entry)
		if _, ok := keep[e.id]; ok {
			continue
		}
		out = append(out, e)
		room += e.size
	}
	if room < need {
		return nil, fmt.Errorf("%w: need %d bytes, at most %d can be freed (quota %d, %d bytes pinned)",
			ErrFull, need, room, quota, x.pinnedBytes)
	}
	return out, nil
}
