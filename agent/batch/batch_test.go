package batch

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestConcurrentSubmitsCoalesce(t *testing.T) {
	var applies atomic.Int32
	var mu sync.Mutex
	applied := map[int]bool{}
	b := New(func(items []int) []error {
		applies.Add(1)
		time.Sleep(20 * time.Millisecond) // a compile + apply
		errs := make([]error, len(items))
		mu.Lock()
		defer mu.Unlock()
		for i, it := range items {
			applied[it] = true
			if it%7 == 0 {
				errs[i] = fmt.Errorf("item %d failed", it)
			}
		}
		return errs
	})
	defer b.Close()

	const n = 40
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { errs[i] = b.Submit(context.Background(), i) })
	}
	wg.Wait()
	for i, err := range errs {
		if (i%7 == 0) != (err != nil) {
			t.Errorf("item %d: err = %v", i, err)
		}
		mu.Lock()
		ok := applied[i]
		mu.Unlock()
		if !ok {
			t.Errorf("item %d returned before it was applied", i)
		}
	}
	if a := applies.Load(); a > n/4 {
		t.Fatalf("%d applies for %d concurrent submits: not coalesced", a, n)
	}
}

func TestSharedError(t *testing.T) {
	boom := errors.New("datapath gone")
	b := New(func(items []string) []error { return []error{boom} })
	if err := b.Submit(context.Background(), "x"); !errors.Is(err, boom) {
		t.Fatalf("err = %v, want %v", err, boom)
	}
}

func TestCancelledSubmitStillApplies(t *testing.T) {
	release := make(chan struct{})
	var got atomic.Int32
	b := New(func(items []int) []error {
		<-release
		got.Add(int32(len(items)))
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Submit(ctx, 1) }()
	time.Sleep(10 * time.Millisecond)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	close(release)
	b.Close()
	if got.Load() != 1 {
		t.Fatalf("cancelled item applied %d times, want 1", got.Load())
	}
	if err := b.Submit(context.Background(), 2); !errors.Is(err, ErrClosed) {
		t.Fatalf("submit after close: %v", err)
	}
}
