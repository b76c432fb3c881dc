package fetch

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestPriorityOf(t *testing.T) {
	ctx := context.Background()
	if PriorityOf(ctx) != Demand {
		t.Fatal("default is not Demand")
	}
	if PriorityOf(WithPriority(ctx, Background)) != Background {
		t.Fatal("Background lost")
	}
	if PriorityOf(WithPriority(ctx, Priority(42))) != Demand {
		t.Fatal("an unknown priority is not treated as Demand")
	}
}

// TestSchedulerOrder fills every slot, queues background, prefetch and
// demand requests (in that order), and checks that freed slots go to demand
// first, then prefetch, then background, and that the lower priorities stay
// under their caps.
func TestSchedulerOrder(t *testing.T) {
	s := newScheduler(4)
	var grants []Priority // in grant order, under s.mu
	s.onGrant = func(p Priority) { grants = append(grants, p) }
	ctx := context.Background()
	var held []func()
	for range 4 {
		r, err := s.acquire(ctx, Demand)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, r)
	}
	var mu sync.Mutex
	var order []Priority
	var granted []func()
	var wg sync.WaitGroup
	start := func(p Priority) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := s.acquire(ctx, p)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, p)
			granted = append(granted, r) // held until the test is done looking
			mu.Unlock()
		}()
	}
	waitQueued := func(p Priority, n int) {
		for deadline := time.Now().Add(5 * time.Second); ; {
			s.mu.Lock()
			got := len(s.waiting[p])
			s.mu.Unlock()
			if got == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d %v waiters, want %d", got, p, n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	start(Background)
	start(Background)
	waitQueued(Background, 2)
	start(Prefetch)
	start(Prefetch)
	start(Prefetch)
	waitQueued(Prefetch, 3)
	start(Demand)
	waitQueued(Demand, 1)

	for _, r := range held {
		r()
	}
	// 4 free slots: demand takes one, prefetch may take up to 3 (limit-1)
	// which leaves none for background.
	for deadline := time.Now().Add(5 * time.Second); ; {
		mu.Lock()
		n := len(order)
		mu.Unlock()
		if n == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("granted %v", order)
		}
		time.Sleep(time.Millisecond)
	}
	// Grants are made inside release, under s.mu, and recorded there by
	// onGrant: once the releases above have returned, every grant they
	// caused is in grants, and nothing else can grant until the test
	// releases again. A wrong grant is already here; no wait is needed.
	s.mu.Lock()
	got := append([]Priority(nil), grants...)
	s.mu.Unlock()
	if want := []Priority{Demand, Prefetch, Prefetch, Prefetch}; !slices.Equal(got, want) {
		t.Fatalf("grant order %v, want %v", got, want)
	}
	s.mu.Lock()
	if len(s.waiting[Background]) != 2 || s.total != 4 {
		t.Errorf("background waiting %d, total %d", len(s.waiting[Background]), s.total)
	}
	s.mu.Unlock()
	// Release the granted slots one by one: the background requests get
	// theirs, one at a time (their cap is 1 of 4).
	for i := 0; i < 6; i++ {
		var r func()
		for deadline := time.Now().Add(5 * time.Second); r == nil; {
			mu.Lock()
			if i < len(granted) {
				r = granted[i]
			}
			mu.Unlock()
			if time.Now().After(deadline) {
				t.Fatalf("slot %d never granted", i)
			}
			time.Sleep(time.Millisecond)
		}
		r()
	}
	wg.Wait()
}

func TestSchedulerCancel(t *testing.T) {
	s := newScheduler(1)
	r, _ := s.acquire(context.Background(), Demand)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := s.acquire(ctx, Background)
		done <- err
	}()
	for {
		s.mu.Lock()
		n := len(s.waiting[Background])
		s.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("cancelled acquire succeeded")
	}
	r()
	r2, err := s.acquire(context.Background(), Background)
	if err != nil {
		t.Fatal(err)
	}
	r2()
	if s.total != 0 {
		t.Fatalf("total %d after all released", s.total)
	}
}
