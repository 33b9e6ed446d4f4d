// Package batch coalesces concurrent changes into one apply. Kubelet starts
// pods in parallel; with a batcher, twenty concurrent CNI ADDs cost one or two
// incremental compiles and datapath applies instead of twenty in a row, and
// each ADD still returns only once the apply that contains it is live.
package batch

import (
	"context"
	"errors"
	"sync"
)

// ErrClosed is returned for changes submitted after Close.
var ErrClosed = errors.New("batcher closed")

// Batcher runs apply on batches of submitted items, one batch at a time.
// While a batch is being applied, new items queue up and form the next one.
type Batcher[T any] struct {
	apply func([]T) []error

	mu      sync.Mutex
	queue   []pending[T]
	running bool
	closed  bool
	idle    chan struct{} // closed when not running; replaced when running
}

type pending[T any] struct {
	item T
	done chan error
}

// New returns a batcher. apply gets a batch and returns one error per item
// (nil for success), or a slice of length 1 whose error applies to all.
func New[T any](apply func([]T) []error) *Batcher[T] {
	idle := make(chan struct{})
	close(idle)
	return &Batcher[T]{apply: apply, idle: idle}
}

// Submit queues item and waits until the batch holding it has been applied,
// returning that item's error. If ctx ends first, Submit returns ctx's error,
// but the item is still applied: a change once queued is never half-taken.
func (b *Batcher[T]) Submit(ctx context.Context, item T) error {
	done := make(chan error, 1)
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	b.queue = append(b.queue, pending[T]{item: item, done: done})
	if !b.running {
		b.running = true
		b.idle = make(chan struct{})
		go b.loop()
	}
	b.mu.Unlock()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *Batcher[T]) loop() {
	for {
		b.mu.Lock()
		batch := b.queue
		b.queue = nil
		if len(batch) == 0 {
			b.running = false
			close(b.idle)
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()

		items := make([]T, len(batch))
		for i, p := range batch {
			items[i] = p.item
		}
		errs := b.apply(items)
		for i, p := range batch {
			var err error
			switch {
			case len(errs) == len(batch):
				err = errs[i]
			case len(errs) == 1:
				err = errs[0]
			case len(errs) != 0:
				err = errors.New("batch: apply returned a wrong number of errors")
			}
			p.done <- err
		}
	}
}

// Close refuses new items and waits for queued ones to be applied.
func (b *Batcher[T]) Close() {
	b.mu.Lock()
	b.closed = true
	idle := b.idle
	b.mu.Unlock()
	<-idle
}
