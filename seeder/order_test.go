package seeder

import (
	"fmt"
	"testing"

	"github.com/shoal-project/shoal/trace"
)

func TestOrder(t *testing.T) {
	tr := &trace.Trace{Events: []trace.Event{{Block: 4}, {Block: 1}, {Block: 9}, {Block: 4}}}
	order, split := Order(tr, 6)
	if fmt.Sprint(order) != "[4 1 0 2 3 5]" || split != 2 {
		t.Fatalf("order %v split %d", order, split)
	}
	order, split = Order(nil, 3)
	if fmt.Sprint(order) != "[0 1 2]" || split != 0 {
		t.Fatalf("no trace: %v %d", order, split)
	}
}
