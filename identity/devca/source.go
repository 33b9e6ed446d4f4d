package devca

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

const (
	// DefaultTTL is the SVID lifetime of a Source when none is configured.
	DefaultTTL = time.Hour
	// minRotate keeps a rotation timer from spinning should an SVID ever
	// be minted with almost no life left.
	minRotate = 100 * time.Millisecond
	// maxRetry bounds the wait before minting again after a failure.
	maxRetry = 30 * time.Second
)

// SourceOptions tune NewSource. The zero value is fine.
type SourceOptions struct {
	// TTL of the SVIDs; DefaultTTL when zero, at least MinTTL.
	TTL time.Duration
	// Logger; the CA's logger when nil. Keys are never logged.
	Logger *slog.Logger
}

// Source is the "builtin" identity.SVIDSource: it mints the Derived ID of
// each workload with the CA and rotates it at half its life. SVIDs are
// cached per SPIFFE ID, so the pods of one service account share one SVID
// and one rotation timer, held while any of them is subscribed. Time comes
// from the CA's Clock.
type Source struct {
	ca    *CA
	ttl   time.Duration
	clock Clock
	log   *slog.Logger
	since time.Time

	mu      sync.Mutex
	closed  bool
	entries map[spiffeid.ID]*entry
	subs    map[*subscriber]struct{} // every live subscription, for Close
	lastErr string
}

// entry is the SVID of one SPIFFE ID and the subscriptions that share it.
type entry struct {
	id   spiffeid.ID
	svid *x509svid.SVID // the latest good one, kept through mint failures
	err  error          // the last mint failed with it; nil after a success
	subs map[*subscriber]func(identity.SVIDUpdate)
	// stopTimer cancels the pending rotation; gen tells a timer that
	// fired while being replaced or stopped that it is stale.
	stopTimer func() bool
	gen       uint64
}

var _ identity.SVIDSource = (*Source)(nil)

// NewSource returns a source that mints with ca.
func NewSource(ca *CA, opts SourceOptions) (*Source, error) {
	if ca == nil {
		return nil, errors.New("builtin svid source: no ca")
	}
	ttl := opts.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < MinTTL {
		return nil, fmt.Errorf("builtin svid source: ttl %s is below %s: %w", ttl, MinTTL, ErrBadTTL)
	}
	log := opts.Logger
	if log == nil {
		log = ca.log
	}
	return &Source{
		ca:      ca,
		ttl:     ttl,
		clock:   ca.clock,
		log:     log,
		since:   ca.clock.Now(),
		entries: make(map[spiffeid.ID]*entry),
		subs:    make(map[*subscriber]struct{}),
	}, nil
}

// Name is identity.SourceBuiltin.
func (s *Source) Name() string { return identity.SourceBuiltin }

// Subscribe follows the SVID of w.Derived. The first update is posted before
// Subscribe returns (minting takes well under a millisecond) and delivered
// on the subscription's goroutine; later ones follow each rotation. A
// workload without a Derived ID, or with one outside the CA's trust domain,
// gets one update without SVIDs that says why. The callback must not call
// the returned cancel itself: cancel waits for a running callback.
func (s *Source) Subscribe(w identity.Workload, fn func(identity.SVIDUpdate)) (cancel func()) {
	sub := newSubscriber()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		sub.stop()
		return func() {}
	}
	s.subs[sub] = struct{}{}
	var e *entry
	switch {
	case w.Derived.IsZero():
		u := identity.SVIDUpdate{Reason: fmt.Sprintf("pod %s/%s has no spiffe id", w.Namespace, w.Name)}
		sub.post(func() { fn(u) })
	case !w.Derived.MemberOf(s.ca.td):
		u := identity.SVIDUpdate{Reason: fmt.Sprintf("spiffe id %s is outside trust domain %q of the builtin ca",
			w.Derived, s.ca.td.Name())}
		sub.post(func() { fn(u) })
	default:
		e = s.entries[w.Derived]
		if e == nil {
			e = &entry{id: w.Derived, subs: make(map[*subscriber]func(identity.SVIDUpdate))}
			s.entries[w.Derived] = e
			s.refreshLocked(e)
		}
		e.subs[sub] = fn
		u := s.updateLocked(e, true)
		sub.post(func() { fn(u) })
	}
	s.mu.Unlock()

	var once sync.Once
	return func() { once.Do(func() { s.unsubscribe(sub, e) }) }
}

func (s *Source) unsubscribe(sub *subscriber, e *entry) {
	s.mu.Lock()
	delete(s.subs, sub)
	if e != nil {
		delete(e.subs, sub)
		if len(e.subs) == 0 && s.entries[e.id] == e {
			e.stopTimer()
			e.gen++
			delete(s.entries, e.id)
		}
	}
	s.mu.Unlock()
	sub.stop()
}

// refreshLocked mints e's SVID and arms the timer for the next mint: at
// half of the new SVID's remaining life, or after a retry delay when
// minting failed. The caller holds s.mu and posts the update when
// refreshLocked reports news: a new SVID, or the first of a run of
// failures (a retry that fails again tells the subscribers nothing new).
func (s *Source) refreshLocked(e *entry) (news bool) {
	if e.stopTimer != nil {
		e.stopTimer()
	}
	e.gen++
	svid, err := s.ca.Mint(e.id, s.ttl)
	var delay time.Duration
	if err != nil {
		news = e.err == nil
		if news {
			s.log.Warn("builtin ca cannot mint svid", "spiffe_id", e.id.String(), "error", err)
		}
		e.err = err
		s.lastErr = err.Error()
		delay = min(maxRetry, s.ttl)
	} else {
		leaf := svid.Certificates[0]
		s.log.Debug("minted svid", "spiffe_id", e.id.String(),
			"serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter)
		e.svid, e.err = svid, nil
		s.lastErr = ""
		delay = s.rotateAfter(leaf.NotAfter)
		news = true
	}
	gen := e.gen
	e.stopTimer = s.clock.AfterFunc(delay, func() { s.rotate(e, gen) })
	return news
}

// rotateAfter is how long an SVID that ends at notAfter is used before
// minting its successor.
func (s *Source) rotateAfter(notAfter time.Time) time.Duration {
	left := notAfter.Sub(s.clock.Now())
	if !notAfter.Before(s.ca.NotAfter()) {
		// Capped at the CA's expiry: a successor could not outlive it.
		// Try again when it is over, which reports the expired CA.
		return max(left, minRotate)
	}
	return max(left/2, minRotate)
}

func (s *Source) rotate(e *entry, gen uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.entries[e.id] != e || e.gen != gen {
		return // stopped or replaced after the timer fired
	}
	if !s.refreshLocked(e) {
		return
	}
	for sub, fn := range e.subs {
		u := s.updateLocked(e, false)
		sub.post(func() { fn(u) })
	}
}

// updateLocked is the update for e's subscribers. A new subscriber gets
// the held SVID while it is valid even when the last mint failed; the
// others learn of a failure through Err and keep what they hold.
func (s *Source) updateLocked(e *entry, joining bool) identity.SVIDUpdate {
	if e.err != nil && (!joining || e.svid == nil || !s.clock.Now().Before(e.svid.Certificates[0].NotAfter)) {
		return identity.SVIDUpdate{Err: fmt.Errorf("%w: builtin ca: %w", identity.ErrSourceUnavailable, e.err)}
	}
	return identity.SVIDUpdate{SVIDs: []*x509svid.SVID{e.svid}}
}

// SubscribeBundles delivers the CA's bundle once: it never changes while
// the CA is open.
func (s *Source) SubscribeBundles(fn func(*x509bundle.Set)) (cancel func()) {
	sub := newSubscriber()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		sub.stop()
		return func() {}
	}
	s.subs[sub] = struct{}{}
	set := x509bundle.NewSet(s.ca.Bundle())
	sub.post(func() { fn(set) })
	s.mu.Unlock()

	var once sync.Once
	return func() { once.Do(func() { s.unsubscribe(sub, nil) }) }
}

// Health is always connected: the CA is in this process. LastError is the
// last failed mint, empty after a success.
func (s *Source) Health() identity.SourceHealth {
	s.mu.Lock()
	defer s.mu.Unlock()
	return identity.SourceHealth{Name: identity.SourceBuiltin, Connected: true, LastError: s.lastErr, Since: s.since}
}

// Close ends every subscription and waits for callbacks in progress. Later
// subscriptions get no updates.
func (s *Source) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, e := range s.entries {
		e.stopTimer()
		e.gen++
	}
	s.entries = nil
	subs := s.subs
	s.subs = nil
	s.mu.Unlock()
	for sub := range subs {
		sub.stop()
	}
	return nil
}
