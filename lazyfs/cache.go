package lazyfs

import (
	"container/list"
	"sync"
)

// blockCache keeps recently used decompressed blocks, bounded in bytes and
// evicted least recently used first. Blocks are immutable once stored: a
// reader may keep using a slice after it was evicted, so nothing is ever
// copied or reused on the way out.
type blockCache struct {
	mu    sync.Mutex
	max   int64
	size  int64
	order *list.List // front = most recently used; values are *cached
	items map[uint32]*list.Element
}

type cached struct {
	block uint32
	data  []byte
}

func newBlockCache(maxBytes int64) *blockCache {
	return &blockCache{max: maxBytes, order: list.New(), items: map[uint32]*list.Element{}}
}

func (c *blockCache) get(block uint32) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[block]
	if !ok {
		return nil, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*cached).data, true
}

// peek returns a cached block without touching its recency: for
// background work that must not push out what readers use.
func (c *blockCache) peek(block uint32) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[block]
	if !ok {
		return nil, false
	}
	return el.Value.(*cached).data, true
}

// contains reports whether block is cached without touching its recency.
func (c *blockCache) contains(block uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.items[block]
	return ok
}

func (c *blockCache) add(block uint32, data []byte) {
	if int64(len(data)) > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[block]; ok {
		c.order.MoveToFront(el)
		return
	}
	c.items[block] = c.order.PushFront(&cached{block: block, data: data})
	c.size += int64(len(data))
	for c.size > c.max {
		el := c.order.Back()
		v := el.Value.(*cached)
		c.order.Remove(el)
		delete(c.items, v.block)
		c.size -= int64(len(v.data))
	}
}

func (c *blockCache) bytes() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.size
}
