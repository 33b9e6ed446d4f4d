package devca

import "sync"

// subscriber delivers one subscription's updates on a goroutine of its own,
// in order, and never after stop returns. Updates are whole states, so a
// newer one that arrives before the older was delivered replaces it: a slow
// callback delays the source for nobody and sees the latest state.
type subscriber struct {
	mu      sync.Mutex
	pending func() // the latest undelivered update, nil when none
	stopped bool

	wake chan struct{} // capacity 1: "pending may be set"
	quit chan struct{}
	done chan struct{} // closed when run has returned
}

func newSubscriber() *subscriber {
	s := &subscriber{
		wake: make(chan struct{}, 1),
		quit: make(chan struct{}),
		done: make(chan struct{}),
	}
	go s.run()
	return s
}

// post queues deliver, replacing an undelivered one. It never blocks, so
// the source may call it under its own lock.
func (s *subscriber) post(deliver func()) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return
	}
	s.pending = deliver
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *subscriber) run() {
	defer close(s.done)
	for {
		select {
		case <-s.quit:
			return
		case <-s.wake:
		}
		s.mu.Lock()
		if s.stopped {
			s.mu.Unlock()
			return
		}
		deliver := s.pending
		s.pending = nil
		s.mu.Unlock()
		if deliver != nil {
			deliver()
		}
	}
}

// stop ends the subscription and waits until a callback in progress has
// returned, which is what "no callback after cancel returns" takes. So it
// must not be called from the subscription's own callback (it would wait
// for itself), nor while holding a lock that callback takes.
func (s *subscriber) stop() {
	s.mu.Lock()
	if !s.stopped {
		s.stopped = true
		s.pending = nil
		close(s.quit)
	}
	s.mu.Unlock()
	<-s.done
}
