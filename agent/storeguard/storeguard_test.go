package storeguard

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/policy/store"
)

// state builds a store state of namespaces ns0..ns(n-1) and NetworkPolicies
// np0..np(p-1), skipping the names in drop.
func state(t *testing.T, n, p int, drop ...string) *store.Result {
	t.Helper()
	return prefixed(t, "ns", n, p, drop...)
}

func prefixed(t *testing.T, prefix string, n, p int, drop ...string) *store.Result {
	t.Helper()
	var docs []string
	skip := map[string]bool{}
	for _, d := range drop {
		skip[d] = true
	}
	for i := range n {
		if name := fmt.Sprintf("%s%d", prefix, i); !skip[name] {
			docs = append(docs, "apiVersion: v1\nkind: Namespace\nmetadata: {name: "+name+"}\n")
		}
	}
	for i := range p {
		if name := fmt.Sprintf("np%d", i); !skip[name] {
			docs = append(docs, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: "+name+"}\nspec: {podSelector: {}}\n")
		}
	}
	objs, err := store.Parse("f.yaml", []byte(strings.Join(docs, "---\n")))
	if err != nil {
		t.Fatal(err)
	}
	res, err := store.Build(objs, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestShrinks(t *testing.T) {
	prev := state(t, 8, 2) // 10 objects, 2 policies
	tests := []struct {
		name   string
		next   *store.Result
		shrink bool
	}{
		{"nothing lost", state(t, 8, 2), false},
		{"4 of 10 lost", state(t, 8, 2, "ns0", "ns1", "ns2", "ns3"), false},
		{"exactly half lost", state(t, 8, 2, "ns0", "ns1", "ns2", "ns3", "ns4"), false},
		{"6 of 10 lost", state(t, 8, 2, "ns0", "ns1", "ns2", "ns3", "ns4", "ns5"), true},
		{"every policy lost, 2 of 10 objects", state(t, 8, 2, "np0", "np1"), true},
		{"one of two policies lost", state(t, 8, 2, "np0"), false},
		{"empty", state(t, 0, 0), true},
		// As many objects as before, but 8 of the 10 are others.
		{"most replaced by others", prefixed(t, "other", 8, 2), true},
	}
	for _, tt := range tests {
		if got := Shrinks(Summarize(prev), Summarize(tt.next)); (got != "") != tt.shrink {
			t.Errorf("%s: Shrinks = %q, want shrink=%v", tt.name, got, tt.shrink)
		}
	}
	if got := Shrinks(nil, Summarize(state(t, 0, 0))); got != "" {
		t.Errorf("the first state shrinks: %q", got)
	}
	// A store with no policies that loses half or less of its objects.
	if got := Shrinks(Summarize(state(t, 2, 0)), Summarize(state(t, 2, 0, "ns1"))); got != "" {
		t.Errorf("1 of 2 namespaces lost: %q", got)
	}
	if got := Shrinks(Summarize(state(t, 1, 0)), Summarize(state(t, 0, 0))); got == "" {
		t.Error("the only object lost: no shrink")
	}
}

type applied struct {
	mu   sync.Mutex
	list []*store.Result
}

func (a *applied) apply(_ context.Context, r *store.Result) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.list = append(a.list, r)
}

func (a *applied) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.list)
}

func (a *applied) last() *store.Result {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.list[len(a.list)-1]
}

func newGuard(t *testing.T, grace time.Duration) (*Guard, *applied, *[]*Hold) {
	t.Helper()
	return newGuardAt(t, grace, "")
}

func newGuardAt(t *testing.T, grace time.Duration, statePath string) (*Guard, *applied, *[]*Hold) {
	t.Helper()
	a := &applied{}
	var mu sync.Mutex
	var holds []*Hold
	g, err := New(Config{Grace: grace, StatePath: statePath, OnHold: func(h *Hold) {
		mu.Lock()
		defer mu.Unlock()
		holds = append(holds, h)
	}}, a.apply)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	return g, a, &holds
}

func TestGuardHoldsAShrinkForTheGracePeriod(t *testing.T) {
	const grace = 300 * time.Millisecond
	g, a, holds := newGuard(t, grace)
	ctx := context.Background()
	full, empty := state(t, 3, 2), state(t, 0, 0)

	g.Offer(ctx, full)
	if a.count() != 1 || g.Held() != nil {
		t.Fatalf("first state: %d applies, hold %+v", a.count(), g.Held())
	}
	start := time.Now()
	g.Offer(ctx, empty)
	h := g.Held()
	if a.count() != 1 || h == nil {
		t.Fatalf("empty store: %d applies, hold %+v; want it held", a.count(), h)
	}
	if h.AppliedObjects != 5 || h.AppliedPolicies != 2 || h.HeldObjects != 0 || h.HeldPolicies != 0 ||
		h.Until.Sub(h.Since) != grace || !strings.Contains(h.Reason, "every policy") {
		t.Fatalf("hold %+v", h)
	}
	// The same state again (a reload with no change) does not restart
	// the grace period.
	time.Sleep(grace / 2)
	g.Offer(ctx, state(t, 0, 0))
	if g.Held().Since != h.Since {
		t.Fatal("the same state restarted the grace period")
	}
	deadline := time.Now().Add(3 * time.Second)
	for a.count() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the held state was never applied")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if waited := time.Since(start); waited < grace {
		t.Fatalf("applied after %v, before the grace period of %v", waited, grace)
	}
	if a.last() != empty || g.Held() != nil {
		t.Fatalf("after the grace period: applied %v, hold %+v", a.last(), g.Held())
	}
	if len(*holds) != 2 || (*holds)[0] == nil || (*holds)[1] != nil {
		t.Fatalf("OnHold calls %v, want the hold then nil", *holds)
	}
	// Now empty is the applied state; filling the store is no shrink.
	g.Offer(ctx, full)
	if a.count() != 3 || g.Held() != nil {
		t.Fatalf("refill: %d applies, hold %+v", a.count(), g.Held())
	}
}

func TestGuardHoldEnds(t *testing.T) {
	const grace = 200 * time.Millisecond
	g, a, _ := newGuard(t, grace)
	ctx := context.Background()
	full := state(t, 3, 2)
	g.Offer(ctx, full)

	// The files come back before the grace period ends: applied at once,
	// and the shrunken state never is.
	g.Offer(ctx, state(t, 0, 0))
	restored := state(t, 3, 2, "ns0")
	g.Offer(ctx, restored)
	if a.count() != 2 || a.last() != restored || g.Held() != nil {
		t.Fatalf("restored store: %d applies, hold %+v", a.count(), g.Held())
	}
	time.Sleep(2 * grace)
	if a.count() != 2 {
		t.Fatalf("an ended hold was applied: %d applies", a.count())
	}

	// A different shrunken state restarts the grace period.
	g.Offer(ctx, state(t, 0, 0))
	first := g.Held()
	time.Sleep(grace / 2)
	g.Offer(ctx, state(t, 1, 0))
	if h := g.Held(); h == nil || !h.Since.After(first.Since) {
		t.Fatalf("a changed shrunken state kept the old grace period: %+v", h)
	}

	// The store turns invalid: the hold ends without applying.
	g.Fail()
	time.Sleep(2 * grace)
	if a.count() != 2 || g.Held() != nil {
		t.Fatalf("after Fail: %d applies, hold %+v", a.count(), g.Held())
	}
}

// An agent restarted on an emptied store holds it back too: the pinned maps
// still enforce the last applied state, which the guard remembers.
func TestGuardRemembersTheAppliedStateAcrossRestarts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "store-applied.json")
	ctx := context.Background()
	g, a, _ := newGuardAt(t, time.Hour, path)
	g.Offer(ctx, state(t, 3, 2))
	if a.count() != 1 {
		t.Fatal("first state not applied")
	}
	g.Stop()

	g2, a2, _ := newGuardAt(t, time.Hour, path)
	g2.Offer(ctx, state(t, 0, 0))
	if h := g2.Held(); a2.count() != 0 || h == nil || h.AppliedObjects != 5 || h.AppliedPolicies != 2 {
		t.Fatalf("after a restart, an empty store: %d applies, hold %+v; want it held", a2.count(), h)
	}
	// A state like the last applied one is applied at once.
	g2.Offer(ctx, state(t, 3, 2))
	if a2.count() != 1 || g2.Held() != nil {
		t.Fatalf("after a restart, the same store: %d applies, hold %+v", a2.count(), g2.Held())
	}

	// An unreadable record is no baseline, and no error.
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	g3, a3, _ := newGuardAt(t, time.Hour, path)
	g3.Offer(ctx, state(t, 0, 0))
	if a3.count() != 1 {
		t.Fatal("with an unreadable record, the first state was not applied")
	}
}

func TestNewRejectsNoGrace(t *testing.T) {
	if _, err := New(Config{}, func(context.Context, *store.Result) {}); err == nil {
		t.Fatal("a zero grace period was accepted")
	}
}
