package flows

import (
	"slices"
	"sync"
	"time"
)

// Item is one element of a flow stream: a flow, or a marker that says how
// many flows are missing at this point of the stream.
type Item struct {
	Flow *Flow       `json:"flow,omitempty"`
	Lost *LostEvents `json:"lost_events,omitempty"`
}

// ring keeps the most recent records (flows, or runtime alerts) in a
// bounded ring and fans new ones out to followers. A follower that cannot
// keep up never slows the publisher: its records are dropped, counted, and
// replaced in its stream by one LostEvents marker at the point of the gap.
// I is the stream's element: item wraps a record, lost a marker.
type ring[T, I any] struct {
	nodeName string
	item     func(T) I
	lost     func(*LostEvents) I

	mu     sync.Mutex
	buf    []T
	next   int // where the next record goes
	full   bool
	subs   map[*follower[T, I]]struct{}
	lostUS uint64 // records dropped for slow followers, all time
}

func newRing[T, I any](capacity int, nodeName string, item func(T) I, lost func(*LostEvents) I) ring[T, I] {
	return ring[T, I]{nodeName: nodeName, item: item, lost: lost, buf: make([]T, max(capacity, 1)),
		subs: map[*follower[T, I]]struct{}{}}
}

// Publish records x and hands it to every follower whose filter it
// passes. x must not be modified afterwards. It returns how many followers
// lost x because they lagged, so that the caller can count userspace loss.
func (r *ring[T, I]) Publish(x T) (lost uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf[r.next] = x
	r.next++
	if r.next == len(r.buf) {
		r.next, r.full = 0, true
	}
	for s := range r.subs {
		if !s.match(x) {
			continue
		}
		if s.pendingLost > 0 {
			select {
			case s.ch <- r.lost(&LostEvents{Time: time.Now(), Source: "userspace", NumEventsLost: s.pendingLost, NodeName: r.nodeName}):
				s.pendingLost = 0
			default:
				s.pendingLost++
				r.lostUS++
				lost++
				continue
			}
		}
		select {
		case s.ch <- r.item(x):
		default:
			s.pendingLost++
			r.lostUS++
			lost++
		}
	}
	return lost
}

// last returns up to n of the most recent records that match passes (all
// with a nil match), oldest first. n == 0 means all that are kept, n < 0
// none. r.mu is held.
func (r *ring[T, I]) lastLocked(n int, match func(T) bool) []T {
	size := r.next
	if r.full {
		size = len(r.buf)
	}
	if n < 0 {
		return nil
	}
	if n == 0 {
		n = size
	}
	var out []T
	for i := 1; i <= size && len(out) < n; i++ {
		x := r.buf[(r.next-i+len(r.buf))%len(r.buf)]
		if match == nil || match(x) {
			out = append(out, x)
		}
	}
	slices.Reverse(out)
	return out
}

func (r *ring[T, I]) last(n int, match func(T) bool) []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastLocked(n, match)
}

// LostUserspace is how many records were dropped for slow followers.
func (r *ring[T, I]) LostUserspace() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lostUS
}

// subscribe returns the last n records passing match (as last: n < 0 is
// none, a follower from now) and a follower that gets every later one,
// atomically: no record falls between the two. buffer is how far the
// follower may lag before it loses records.
func (r *ring[T, I]) subscribe(n int, match func(T) bool, buffer int) ([]T, *follower[T, I]) {
	s := &follower[T, I]{r: r, match: match, ch: make(chan I, max(buffer, 1))}
	r.mu.Lock()
	defer r.mu.Unlock()
	backlog := r.lastLocked(n, match)
	r.subs[s] = struct{}{}
	return backlog, s
}

// PublishLost tells every follower that records were lost before they
// reached the agent (kernel ring buffer full): a marker in each stream.
func (r *ring[T, I]) PublishLost(l *LostEvents) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := range r.subs {
		select {
		case s.ch <- r.lost(l):
		default:
			s.pendingLost += l.NumEventsLost
		}
	}
}

// follower is one follower of a ring.
type follower[T, I any] struct {
	r           *ring[T, I]
	match       func(T) bool
	ch          chan I
	pendingLost uint64
}

// C delivers the follower's items.
func (s *follower[T, I]) C() <-chan I { return s.ch }

// Close stops delivery. The channel is not closed, so a Publish racing with
// Close never sends on a closed channel.
func (s *follower[T, I]) Close() {
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	delete(s.r.subs, s)
}

// Hub is the ring of flows.
type Hub struct{ ring[*Flow, Item] }

// Subscription is one follower of a Hub.
type Subscription = follower[*Flow, Item]

// NewHub keeps up to capacity recent flows (at least 1).
func NewHub(capacity int, nodeName string) *Hub {
	return &Hub{newRing(capacity, nodeName, func(f *Flow) Item { return Item{Flow: f} },
		func(l *LostEvents) Item { return Item{Lost: l} })}
}

// Last returns up to n of the most recent flows that pass sel, oldest
// first. n == 0 means all that are kept, n < 0 none.
func (h *Hub) Last(n int, sel *Selector) []*Flow {
	if sel == nil {
		return h.last(n, nil)
	}
	return h.last(n, sel.Match)
}

// Subscribe returns the last n flows passing sel (as Last: n < 0 is
// none, a follower from now) and a follower that gets every later one,
// atomically: no flow falls between the two. buffer is how far the
// follower may lag before it loses flows.
func (h *Hub) Subscribe(n int, sel Selector, buffer int) ([]*Flow, *Subscription) {
	return h.subscribe(n, sel.Match, buffer)
}
