package seeder

import "github.com/shoal-project/shoal/trace"

// Order is the order in which a node fills an image of n blocks: the blocks
// of the start-up trace first, in first-touch order, then every other block
// in block-table order (the converter lays blocks out in path order, so
// neighbours in the table are neighbours in the registry blob and merge into
// large range requests). tr may be nil. Blocks outside the table are
// dropped. The result holds each block once; split reports where the trace
// part ends.
func Order(tr *trace.Trace, n int) (order []uint32, split int) {
	order = make([]uint32, 0, n)
	seen := make([]bool, n)
	if tr != nil {
		for _, e := range tr.Events {
			if int(e.Block) < n && !seen[e.Block] {
				seen[e.Block] = true
				order = append(order, e.Block)
			}
		}
	}
	split = len(order)
	for b := range n {
		if !seen[b] {
			order = append(order, uint32(b))
		}
	}
	return order, split
}
