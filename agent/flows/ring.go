package flows

import (
	"sync"
	"time"
)

// Item is one element of a flow stream: a flow, or a marker that says how
// many flows are missing at this point of the stream.
type Item struct {
	Flow *Flow       `json:"flow,omitempty"`
	Lost *LostEvents `json:"lost_events,omitempty"`
}

// Hub keeps the most recent flows in a bounded ring and fans new ones out
// to followers. A follower that cannot keep up never slows the pipeline:
// its flows are dropped, counted, and replaced in its stream by one
// LostEvents marker at the point of the gap.
type Hub struct {
	nodeName string

	mu     sync.Mutex
	ring   []*Flow
	next   int // where the next flow goes
	full   bool
	subs   map[*Subscription]struct{}
	lostUS uint64 // flows dropped for slow followers, all time
}

// NewHub keeps up to capacity recent flows (at least 1).
func NewHub(capacity int, nodeName string) *Hub {
	return &Hub{nodeName: nodeName, ring: make([]*Flow, max(capacity, 1)), subs: map[*Subscription]struct{}{}}
}

// Publish records fl and hands it to every follower whose filter it
// passes. fl must not be modified afterwards. It returns how many followers
// lost fl because they lagged, so that the caller can count userspace loss.
func (h *Hub) Publish(fl *Flow) (lost uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ring[h.next] = fl
	h.next++
	if h.next == len(h.ring) {
		h.next, h.full = 0, true
	}
	for s := range h.subs {
		if !s.sel.Match(fl) {
			continue
		}
		if s.pendingLost > 0 {
			select {
			case s.ch <- Item{Lost: &LostEvents{Time: time.Now(), Source: "userspace", NumEventsLost: s.pendingLost, NodeName: h.nodeName}}:
				s.pendingLost = 0
			default:
				s.pendingLost++
				h.lostUS++
				lost++
				continue
			}
		}
		select {
		case s.ch <- Item{Flow: fl}:
		default:
			s.pendingLost++
			h.lostUS++
			lost++
		}
	}
	return lost
}

// Last returns up to n of the most recent flows that pass sel, oldest
// first. n == 0 means all that are kept, n < 0 none.
func (h *Hub) Last(n int, sel *Selector) []*Flow {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lastLocked(n, sel)
}

func (h *Hub) lastLocked(n int, sel *Selector) []*Flow {
	size := h.next
	if h.full {
		size = len(h.ring)
	}
	if n < 0 {
		return nil
	}
	if n == 0 {
		n = size
	}
	var out []*Flow
	for i := 1; i <= size && len(out) < n; i++ {
		fl := h.ring[(h.next-i+len(h.ring))%len(h.ring)]
		if sel == nil || sel.Match(fl) {
			out = append(out, fl)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// LostUserspace is how many flows were dropped for slow followers.
func (h *Hub) LostUserspace() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lostUS
}

// Subscription is one follower.
type Subscription struct {
	hub         *Hub
	sel         Selector
	ch          chan Item
	pendingLost uint64
}

// Subscribe returns the last n flows passing sel (as Last: n < 0 is
// none, a follower from now) and a follower that gets every later one,
// atomically: no flow falls between the two. buffer is how far the
// follower may lag before it loses flows.
func (h *Hub) Subscribe(n int, sel Selector, buffer int) ([]*Flow, *Subscription) {
	s := &Subscription{hub: h, sel: sel, ch: make(chan Item, max(buffer, 1))}
	h.mu.Lock()
	defer h.mu.Unlock()
	backlog := h.lastLocked(n, &sel)
	h.subs[s] = struct{}{}
	return backlog, s
}

// C delivers the follower's items.
func (s *Subscription) C() <-chan Item { return s.ch }

// Close stops delivery. The channel is not closed, so a Publish racing with
// Close never sends on a closed channel.
func (s *Subscription) Close() {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	delete(s.hub.subs, s)
}

// PublishLost tells every follower that events were lost before they
// reached the agent (kernel ring buffer full): a marker in each stream.
func (h *Hub) PublishLost(l *LostEvents) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		select {
		case s.ch <- Item{Lost: l}:
		default:
			s.pendingLost += l.NumEventsLost
		}
	}
}
