// Package storeguard holds back a store state that removes too much at once.
// An empty store folder, or one that lost most of its files, is far more
// often a copy in progress (`rm *.yaml; cp new/*.yaml .`), a failed
// checkout or a broken mount than an intent, and applying it would open
// every pod at once. Such a state is applied only after it has stayed the
// same for a grace period; meanwhile the last applied state stays enforced
// and the hold is reported (log, status, metrics).
package storeguard

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/policy/store"
)

// Hold is a store state that is held back.
type Hold struct {
	// Reason says what the held state removes.
	Reason string
	// Since is when the state was first seen; Until is when it will be
	// applied if it stays the same.
	Since, Until time.Time
	// Applied and Held count the objects and the policies of the last
	// applied and of the held state.
	AppliedObjects, AppliedPolicies int
	HeldObjects, HeldPolicies       int
}

// Config configures a Guard.
type Config struct {
	// Grace is how long a shrunken state must stay the same before it is
	// applied. It must be positive.
	Grace  time.Duration
	Logger *slog.Logger
	// OnHold, if set, is called when a hold begins (with it) and ends
	// (with nil), for metrics.
	OnHold func(*Hold)
}

// Guard passes store states on to apply, holding back those that Shrinks.
type Guard struct {
	cfg   Config
	apply func(context.Context, *store.Result)

	// mu serialises decisions and applies, so that states are applied in
	// the order they were offered.
	mu      sync.Mutex
	applied *store.Result
	held    *store.Result
	timer   *time.Timer
	// gen counts holds, so that a timer of an ended hold does nothing.
	gen     uint64
	stopped bool

	// hold is what readers see, without waiting for an apply.
	hold atomic.Pointer[Hold]
}

// New returns a Guard that passes states to apply.
func New(cfg Config, apply func(context.Context, *store.Result)) (*Guard, error) {
	if cfg.Grace <= 0 {
		return nil, fmt.Errorf("store shrink grace %v: must be positive", cfg.Grace)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Guard{cfg: cfg, apply: apply}, nil
}

// Shrinks says why next removes too much of prev to apply at once, or ""
// when it does not: when prev has policies and next has none, or when more
// than half of prev's objects (by kind, namespace and name) are not in
// next. Exactly half is not "most". The first state (prev nil) never
// shrinks.
func Shrinks(prev, next *store.Result) string {
	if prev == nil {
		return ""
	}
	pp, np := policies(prev), policies(next)
	if pp > 0 && np == 0 {
		return fmt.Sprintf("every policy is gone (%d before, none now)", pp)
	}
	have := make(map[string]bool, len(next.Objects))
	for _, o := range next.Objects {
		have[o.Ref()] = true
	}
	lost := 0
	for _, o := range prev.Objects {
		if !have[o.Ref()] {
			lost++
		}
	}
	if 2*lost > len(prev.Objects) {
		return fmt.Sprintf("%d of its %d objects are gone", lost, len(prev.Objects))
	}
	return ""
}

func policies(r *store.Result) int {
	return len(r.Snapshot.NetworkPolicies) + len(r.Snapshot.BulkheadPolicies)
}

// Offer is called with every valid store state. It applies the state now,
// or holds it back if it shrinks the last applied state too much.
func (g *Guard) Offer(ctx context.Context, next *store.Result) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped {
		return
	}
	reason := Shrinks(g.applied, next)
	if reason == "" {
		if g.held != nil {
			g.cfg.Logger.Info("store no longer removes too much at once; hold ended", "objects", len(next.Objects), "policies", policies(next))
		}
		g.endHold()
		g.applied = next
		g.apply(ctx, next)
		return
	}
	if g.held != nil && reflect.DeepEqual(g.held.Snapshot, next.Snapshot) {
		return // the same state again: its grace period runs on
	}
	g.endHold()
	now := time.Now()
	h := &Hold{
		Reason: reason, Since: now, Until: now.Add(g.cfg.Grace),
		AppliedObjects: len(g.applied.Objects), AppliedPolicies: policies(g.applied),
		HeldObjects: len(next.Objects), HeldPolicies: policies(next),
	}
	g.held = next
	g.gen++
	gen := g.gen
	g.timer = time.AfterFunc(g.cfg.Grace, func() { g.expire(ctx, gen) })
	g.hold.Store(h)
	if g.cfg.OnHold != nil {
		g.cfg.OnHold(h)
	}
	g.cfg.Logger.Warn("store state held back: it removes too much at once; the last state stays enforced until it has stayed the same for the grace period",
		"reason", reason, "until", h.Until, "appliedObjects", h.AppliedObjects, "appliedPolicies", h.AppliedPolicies,
		"heldObjects", h.HeldObjects, "heldPolicies", h.HeldPolicies)
}

// Fail is called when the store is invalid: a held state is no longer the
// store's state, so its hold ends without applying it.
func (g *Guard) Fail() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.held != nil {
		g.cfg.Logger.Info("store changed to an invalid state; the held state is dropped")
	}
	g.endHold()
}

// expire applies a held state that stayed the same for the grace period.
func (g *Guard) expire(ctx context.Context, gen uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopped || gen != g.gen || g.held == nil {
		return
	}
	next := g.held
	g.cfg.Logger.Warn("store state applied after its grace period", "objects", len(next.Objects), "policies", policies(next))
	g.endHold()
	g.applied = next
	g.apply(ctx, next)
}

// endHold forgets the held state. Called with g.mu held.
func (g *Guard) endHold() {
	if g.timer != nil {
		g.timer.Stop()
		g.timer = nil
	}
	g.gen++
	if g.held != nil {
		g.held = nil
		g.hold.Store(nil)
		if g.cfg.OnHold != nil {
			g.cfg.OnHold(nil)
		}
	}
}

// Held returns the current hold, or nil.
func (g *Guard) Held() *Hold {
	if h := g.hold.Load(); h != nil {
		c := *h
		return &c
	}
	return nil
}

// Stop ends a hold without applying it, and makes later offers do nothing.
func (g *Guard) Stop() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.endHold()
	g.stopped = true
}
