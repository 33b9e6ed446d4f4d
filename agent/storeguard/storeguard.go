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
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
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
	Grace time.Duration
	// StatePath, if set, is a file where the guard keeps what the last
	// applied state held, so that an agent restarted on an emptied store
	// holds it back too, while the pinned maps keep enforcing the last
	// state.
	StatePath string
	Logger    *slog.Logger
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
	applied *Summary
	held    *store.Result
	timer   *time.Timer
	// gen counts holds, so that a timer of an ended hold does nothing.
	gen     uint64
	stopped bool

	// hold is what readers see, without waiting for an apply.
	hold atomic.Pointer[Hold]
}

// New returns a Guard that passes states to apply. With cfg.StatePath, the
// last applied state of an earlier run is the baseline for the first one.
func New(cfg Config, apply func(context.Context, *store.Result)) (*Guard, error) {
	if cfg.Grace <= 0 {
		return nil, fmt.Errorf("store shrink grace %v: must be positive", cfg.Grace)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	g := &Guard{cfg: cfg, apply: apply}
	if cfg.StatePath != "" {
		s, err := loadSummary(cfg.StatePath)
		if err != nil {
			// Without it the first state is applied as it is, as on a
			// fresh node.
			cfg.Logger.Warn("last applied store state unreadable; the first store state is not compared with it", "error", err)
		}
		g.applied = s
	}
	return g, nil
}

// Summary is what Shrinks compares: the objects of a state, by kind,
// namespace and name, and how many of them are policies.
type Summary struct {
	Refs     []string `json:"refs"`
	Policies int      `json:"policies"`
}

// Summarize summarises a store state.
func Summarize(r *store.Result) *Summary {
	s := &Summary{Refs: make([]string, 0, len(r.Objects)), Policies: policies(r)}
	for _, o := range r.Objects {
		s.Refs = append(s.Refs, o.Ref())
	}
	return s
}

// Shrinks says why next removes too much of prev to apply at once, or ""
// when it does not: when prev has policies and next has none, or when more
// than half of prev's objects (by kind, namespace and name) are not in
// next. Exactly half is not "most". Without a prev (a fresh node) nothing
// shrinks.
func Shrinks(prev, next *Summary) string {
	if prev == nil {
		return ""
	}
	if prev.Policies > 0 && next.Policies == 0 {
		return fmt.Sprintf("every policy is gone (%d before, none now)", prev.Policies)
	}
	have := make(map[string]bool, len(next.Refs))
	for _, r := range next.Refs {
		have[r] = true
	}
	lost := 0
	for _, r := range prev.Refs {
		if !have[r] {
			lost++
		}
	}
	if 2*lost > len(prev.Refs) {
		return fmt.Sprintf("%d of its %d objects are gone", lost, len(prev.Refs))
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
	sum := Summarize(next)
	reason := Shrinks(g.applied, sum)
	if reason == "" {
		if g.held != nil {
			g.cfg.Logger.Info("store no longer removes too much at once; hold ended", "objects", len(next.Objects), "policies", policies(next))
		}
		g.endHold()
		g.pass(ctx, next, sum)
		return
	}
	if g.held != nil && reflect.DeepEqual(g.held.Snapshot, next.Snapshot) {
		return // the same state again: its grace period runs on
	}
	g.endHold()
	now := time.Now()
	h := &Hold{
		Reason: reason, Since: now, Until: now.Add(g.cfg.Grace),
		AppliedObjects: len(g.applied.Refs), AppliedPolicies: g.applied.Policies,
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
	g.pass(ctx, next, Summarize(next))
}

// pass applies a state and records it as the baseline. Called with g.mu
// held.
func (g *Guard) pass(ctx context.Context, next *store.Result, sum *Summary) {
	g.applied = sum
	g.apply(ctx, next)
	if g.cfg.StatePath != "" {
		if err := saveSummary(g.cfg.StatePath, sum); err != nil {
			g.cfg.Logger.Warn("record the applied store state", "error", err)
		}
	}
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

func loadSummary(path string) (*Summary, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	var s Summary
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return &s, nil
}

// saveSummary writes the file whole or not at all (write, then rename).
func saveSummary(path string, s *Summary) error {
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
