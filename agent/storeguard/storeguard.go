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
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/state"
	"github.com/bulkhead-io/bulkhead/policy"
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
	// applied and of the held state. Both Applied counts are 0 when the
	// guard has no record of the state the datapath enforces (Config.Enforcing).
	AppliedObjects, AppliedPolicies int
	HeldObjects, HeldPolicies       int
}

// Config configures a Guard.
type Config struct {
	// Grace is how long a shrunken state must stay the same before it is
	// applied. It must be positive.
	Grace time.Duration
	// StateDir, if set, is where the guard keeps what the last applied
	// state held (store-applied.json), so that an agent restarted on an
	// emptied store holds it back too, while the pinned maps keep
	// enforcing the last state.
	StateDir string
	// Enforcing says the datapath already enforces a policy state that an
	// earlier agent applied and that restricts some pod (re-opened pins with
	// a direction at default deny or a policy entry). When
	// there is no readable record of that state (a --state-dir on tmpfs
	// while bpffs survived, a corrupt record), it is taken to have had
	// policies: a first state without any policy is held back, since
	// applying it may open every pod.
	Enforcing bool
	Logger    *slog.Logger
	// OnHold, if set, is called when a hold begins (with it) and ends
	// (with nil), for metrics.
	OnHold func(*Hold)
}

// ApplyFunc applies a store state. It returns nil only when the state is
// enforced in full: compiled without rejected objects and applied to the
// datapath.
type ApplyFunc func(context.Context, *store.Result) error

// recordKey names the guard's record in Config.StateDir.
const recordKey = "store-applied"

// Guard passes store states on to apply, holding back those that Shrinks.
type Guard struct {
	cfg     Config
	apply   ApplyFunc
	records *state.Dir[Summary]
	// warning is a lasting problem for status (a quarantined record).
	warning string

	// mu serialises decisions and applies, so that states are applied in
	// the order they were offered.
	mu sync.Mutex
	// applied is the baseline: the last state applied in full (or the
	// unknown one the datapath enforces). tried is a later state whose
	// apply failed or was partial: the agent may still come to enforce it
	// (it retries a failed apply), so a state is compared with both.
	applied, tried *Summary
	held           *store.Result
	timer          *time.Timer
	// gen counts holds, so that a timer of an ended hold does nothing.
	gen     uint64
	stopped bool

	// hold is what readers see, without waiting for an apply.
	hold atomic.Pointer[Hold]
}

// New returns a Guard that passes states to apply. With cfg.StateDir, the
// last applied state of an earlier run is the baseline for the first one. A
// record that cannot be read is quarantined (renamed, never deleted) and
// reported by Warning.
func New(cfg Config, apply ApplyFunc) (*Guard, error) {
	if cfg.Grace <= 0 {
		return nil, fmt.Errorf("store shrink grace %v: must be positive", cfg.Grace)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	g := &Guard{cfg: cfg, apply: apply}
	if cfg.StateDir != "" {
		dir, err := state.Open[Summary](cfg.StateDir)
		if err != nil {
			return nil, fmt.Errorf("store guard: %w", err)
		}
		g.records = dir
		s, err := dir.Get(recordKey)
		switch {
		case err == nil:
			g.applied = &s
		case errors.Is(err, state.ErrNotFound):
		default:
			moved, qerr := dir.Quarantine(recordKey)
			if qerr != nil {
				return nil, fmt.Errorf("quarantine unreadable record of the applied store state: %w (after %w)", qerr, err)
			}
			g.warning = fmt.Sprintf("record of the applied store state unreadable (%v), kept as %s", err, moved)
			cfg.Logger.Error("record of the applied store state unreadable; moved aside", "error", err, "file", moved)
		}
	}
	if g.applied == nil && cfg.Enforcing {
		g.applied = &Summary{Unknown: true}
		cfg.Logger.Warn("the datapath enforces a policy state with no record of what it held; a first store state without policies is held back")
	}
	return g, nil
}

// Warning is a lasting problem to report in status, or "".
func (g *Guard) Warning() string { return g.warning }

// Summary is what Shrinks compares: the objects of a state, by kind,
// namespace and name, and how many of them are policies.
type Summary struct {
	Refs     []string `json:"refs"`
	Policies int      `json:"policies"`
	// Unknown marks the baseline of a datapath that enforces a state the
	// guard has no record of; it is taken to have had policies.
	Unknown bool `json:"-"`
}

// Summarize summarises a store state.
func Summarize(r *store.Result) *Summary {
	s := &Summary{Refs: make([]string, 0, len(r.Objects)), Policies: policies(r)}
	for _, o := range r.Objects {
		s.Refs = append(s.Refs, o.Ref())
	}
	return s
}

// isPolicy says whether a ref (Object.Ref) names a policy.
func isPolicy(ref string) bool {
	return strings.HasPrefix(ref, policy.KindNetworkPolicy+" ") || strings.HasPrefix(ref, policy.KindBulkheadPolicy+" ")
}

// Shrinks says why next removes too much of prev to apply at once, or ""
// when it does not. It does when prev has policies and next has none, when
// more than half of prev's policies are not in next, or when more than half
// of prev's objects are not in next (policies and objects by kind,
// namespace and name). Exactly half is not "most". Without a prev (a fresh
// node) nothing shrinks; with an Unknown prev, only a next without policies
// does.
//
// Policies get their own count because they are what isolates pods: a
// store of many pods and namespaces could otherwise lose most of its
// policies in one step and stay under half of its objects. What this does
// not catch is a store taken apart in steps that each stay within these
// bounds: that is indistinguishable from intent.
func Shrinks(prev, next *Summary) string {
	if prev == nil {
		return ""
	}
	if prev.Unknown {
		if next.Policies == 0 {
			return "no policy in the store, and no record of the state the datapath enforces (an earlier agent applied it)"
		}
		return ""
	}
	if prev.Policies > 0 && next.Policies == 0 {
		return fmt.Sprintf("every policy is gone (%d before, none now)", prev.Policies)
	}
	have := make(map[string]bool, len(next.Refs))
	for _, r := range next.Refs {
		have[r] = true
	}
	lost, lostPol, pols := 0, 0, 0
	for _, r := range prev.Refs {
		pol := isPolicy(r)
		if pol {
			pols++
		}
		if !have[r] {
			lost++
			if pol {
				lostPol++
			}
		}
	}
	if 2*lostPol > pols {
		return fmt.Sprintf("%d of its %d policies are gone", lostPol, pols)
	}
	if 2*lost > len(prev.Refs) {
		return fmt.Sprintf("%d of its %d objects are gone", lost, len(prev.Refs))
	}
	return ""
}

func policies(r *store.Result) int {
	return len(r.Snapshot.NetworkPolicies) + len(r.Snapshot.BulkheadPolicies)
}

// shrinks compares next with the baseline and with a state whose apply
// failed; it returns the reason and the state it shrinks. Called with g.mu
// held.
func (g *Guard) shrinks(next *Summary) (string, *Summary) {
	if r := Shrinks(g.applied, next); r != "" {
		return r, g.applied
	}
	if r := Shrinks(g.tried, next); r != "" {
		return r + " (from a state whose apply failed, which the agent may still be enforcing)", g.tried
	}
	return "", nil
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
	reason, base := g.shrinks(sum)
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
		AppliedObjects: len(base.Refs), AppliedPolicies: base.Policies,
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

// pass applies a state. Only a state applied in full becomes the baseline
// (and is recorded): after a failed or partial apply the datapath may
// still enforce the old one, and comparing the next state with one that
// never took effect would let it shrink the enforced one unchecked. Called
// with g.mu held.
func (g *Guard) pass(ctx context.Context, next *store.Result, sum *Summary) {
	if err := g.apply(ctx, next); err != nil {
		g.tried = sum
		g.cfg.Logger.Warn("store state not applied in full; later states are still compared with the last one that was",
			"error", err, "objects", len(next.Objects), "policies", policies(next))
		return
	}
	g.applied, g.tried = sum, nil
	if g.records != nil {
		if err := g.records.Put(recordKey, *sum); err != nil {
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
