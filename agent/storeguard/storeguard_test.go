package storeguard

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/policy/store"
)

// mkState builds a store state of namespaces ns0..ns(n-1) and NetworkPolicies
// np0..np(p-1), skipping the names in drop.
func mkState(t *testing.T, n, p int, drop ...string) *store.Result {
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
	prev := mkState(t, 8, 2) // 10 objects, 2 policies
	tests := []struct {
		name   string
		next   *store.Result
		shrink bool
	}{
		{"nothing lost", mkState(t, 8, 2), false},
		{"4 of 10 lost", mkState(t, 8, 2, "ns0", "ns1", "ns2", "ns3"), false},
		{"exactly half lost", mkState(t, 8, 2, "ns0", "ns1", "ns2", "ns3", "ns4"), false},
		{"6 of 10 lost", mkState(t, 8, 2, "ns0", "ns1", "ns2", "ns3", "ns4", "ns5"), true},
		{"every policy lost, 2 of 10 objects", mkState(t, 8, 2, "np0", "np1"), true},
		{"one of two policies lost", mkState(t, 8, 2, "np0"), false},
		{"empty", mkState(t, 0, 0), true},
		// As many objects as before, but 8 of the 10 are others.
		{"most replaced by others", prefixed(t, "other", 8, 2), true},
	}
	for _, tt := range tests {
		if got := Shrinks(Summarize(prev), Summarize(tt.next)); (got != "") != tt.shrink {
			t.Errorf("%s: Shrinks = %q, want shrink=%v", tt.name, got, tt.shrink)
		}
	}
	if got := Shrinks(nil, Summarize(mkState(t, 0, 0))); got != "" {
		t.Errorf("the first state shrinks: %q", got)
	}
	// A store with no policies that loses half or less of its objects.
	if got := Shrinks(Summarize(mkState(t, 2, 0)), Summarize(mkState(t, 2, 0, "ns1"))); got != "" {
		t.Errorf("1 of 2 namespaces lost: %q", got)
	}
	if got := Shrinks(Summarize(mkState(t, 1, 0)), Summarize(mkState(t, 0, 0))); got == "" {
		t.Error("the only object lost: no shrink")
	}
}

// Policies are what isolate pods: losing most of them at once is held even
// when the store's many other objects keep the object count under half.
func TestShrinksPolicies(t *testing.T) {
	prev := Summarize(mkState(t, 20, 4)) // 24 objects, 4 policies
	tests := []struct {
		name   string
		next   *store.Result
		shrink bool
	}{
		{"1 of 4 policies lost", mkState(t, 20, 4, "np0"), false},
		{"exactly half of the policies lost", mkState(t, 20, 4, "np0", "np1"), false},
		{"3 of 4 policies lost (3 of 24 objects)", mkState(t, 20, 4, "np0", "np1", "np2"), true},
		{"3 of 4 policies renamed", prefixedPolicies(t, 20, []string{"np3", "x0", "x1", "x2"}), true},
		{"policies added", mkState(t, 20, 8), false},
	}
	for _, tt := range tests {
		got := Shrinks(prev, Summarize(tt.next))
		if (got != "") != tt.shrink {
			t.Errorf("%s: Shrinks = %q, want shrink=%v", tt.name, got, tt.shrink)
		}
		if tt.shrink && !strings.Contains(got, "policies are gone") {
			t.Errorf("%s: reason %q does not name the policies", tt.name, got)
		}
	}
	// One of two policies: exactly half, passed on; one of one: held.
	if got := Shrinks(Summarize(mkState(t, 0, 2)), Summarize(mkState(t, 0, 2, "np1"))); got != "" {
		t.Errorf("1 of 2 policies lost: %q", got)
	}
	if got := Shrinks(Summarize(mkState(t, 0, 3)), Summarize(mkState(t, 0, 3, "np1", "np2"))); got == "" {
		t.Error("2 of 3 policies lost: no shrink")
	}
}

// prefixedPolicies is n namespaces and NetworkPolicies of the given names.
func prefixedPolicies(t *testing.T, n int, names []string) *store.Result {
	t.Helper()
	var docs []string
	for i := range n {
		docs = append(docs, fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: ns%d}\n", i))
	}
	for _, name := range names {
		docs = append(docs, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: "+name+"}\nspec: {podSelector: {}}\n")
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

type applied struct {
	mu   sync.Mutex
	list []*store.Result
	// fail, while set, is what apply returns (the state is recorded as
	// offered to the agent all the same).
	fail error
}

func (a *applied) apply(_ context.Context, r *store.Result) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.list = append(a.list, r)
	return a.fail
}

func (a *applied) setFail(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fail = err
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

func newGuardAt(t *testing.T, grace time.Duration, stateDir string) (*Guard, *applied, *[]*Hold) {
	t.Helper()
	return newGuardWith(t, Config{Grace: grace, StateDir: stateDir})
}

func newGuardWith(t *testing.T, cfg Config) (*Guard, *applied, *[]*Hold) {
	t.Helper()
	a := &applied{}
	var mu sync.Mutex
	var holds []*Hold
	cfg.OnHold = func(h *Hold) {
		mu.Lock()
		defer mu.Unlock()
		holds = append(holds, h)
	}
	g, err := New(cfg, a.apply)
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
	full, empty := mkState(t, 3, 2), mkState(t, 0, 0)

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
	g.Offer(ctx, mkState(t, 0, 0))
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
	full := mkState(t, 3, 2)
	g.Offer(ctx, full)

	// The files come back before the grace period ends: applied at once,
	// and the shrunken state never is.
	g.Offer(ctx, mkState(t, 0, 0))
	restored := mkState(t, 3, 2, "ns0")
	g.Offer(ctx, restored)
	if a.count() != 2 || a.last() != restored || g.Held() != nil {
		t.Fatalf("restored store: %d applies, hold %+v", a.count(), g.Held())
	}
	time.Sleep(2 * grace)
	if a.count() != 2 {
		t.Fatalf("an ended hold was applied: %d applies", a.count())
	}

	// A different shrunken state restarts the grace period.
	g.Offer(ctx, mkState(t, 0, 0))
	first := g.Held()
	time.Sleep(grace / 2)
	g.Offer(ctx, mkState(t, 1, 0))
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
	dir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(dir, "store-applied.json")
	ctx := context.Background()
	g, a, _ := newGuardAt(t, time.Hour, dir)
	g.Offer(ctx, mkState(t, 3, 2))
	if a.count() != 1 {
		t.Fatal("first state not applied")
	}
	g.Stop()
	// The record holds pod and namespace names: for root only.
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("record %s: %v, mode %v; want mode 0600", path, err, fi.Mode())
	}

	g2, a2, _ := newGuardAt(t, time.Hour, dir)
	g2.Offer(ctx, mkState(t, 0, 0))
	if h := g2.Held(); a2.count() != 0 || h == nil || h.AppliedObjects != 5 || h.AppliedPolicies != 2 {
		t.Fatalf("after a restart, an empty store: %d applies, hold %+v; want it held", a2.count(), h)
	}
	// A state like the last applied one is applied at once.
	g2.Offer(ctx, mkState(t, 3, 2))
	if a2.count() != 1 || g2.Held() != nil {
		t.Fatalf("after a restart, the same store: %d applies, hold %+v", a2.count(), g2.Held())
	}
}

// A --state-dir on tmpfs while bpffs survived: the record is gone, but the
// datapath still enforces what an earlier agent applied. An empty store is
// held back, not applied at once (which opens every pod).
func TestGuardWithoutRecordHoldsWhenTheDatapathEnforces(t *testing.T) {
	ctx := context.Background()
	g, a, _ := newGuardWith(t, Config{Grace: time.Hour, StateDir: t.TempDir(), Enforcing: true})
	g.Offer(ctx, mkState(t, 3, 0))
	h := g.Held()
	if a.count() != 0 || h == nil || !strings.Contains(h.Reason, "no record") {
		t.Fatalf("no record, enforcing datapath, store without policies: %d applies, hold %+v; want it held", a.count(), h)
	}
	// A store with policies is applied at once, and becomes the baseline.
	g.Offer(ctx, mkState(t, 3, 2))
	if a.count() != 1 || g.Held() != nil {
		t.Fatalf("store with policies: %d applies, hold %+v", a.count(), g.Held())
	}
	g.Offer(ctx, mkState(t, 3, 2, "np0"))
	if a.count() != 2 {
		t.Fatal("one of two policies removed after the baseline was set: held")
	}

	// A fresh datapath (nothing enforced) with no record: nothing to hold.
	g2, a2, _ := newGuardWith(t, Config{Grace: time.Hour, StateDir: t.TempDir()})
	g2.Offer(ctx, mkState(t, 0, 0))
	if a2.count() != 1 || g2.Held() != nil {
		t.Fatalf("fresh node: %d applies, hold %+v", a2.count(), g2.Held())
	}
}

// A corrupt record is moved aside and reported, never silently taken as
// "no baseline"; with an enforcing datapath an empty store is still held.
func TestGuardQuarantinesACorruptRecord(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store-applied.json")
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	g, a, _ := newGuardWith(t, Config{Grace: time.Hour, StateDir: dir, Enforcing: true})
	if w := g.Warning(); !strings.Contains(w, "unreadable") || !strings.Contains(w, "store-applied.json.bad-") {
		t.Fatalf("warning %q; want the record reported as quarantined", w)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("the corrupt record is still in place: %v", err)
	}
	bad, _ := filepath.Glob(path + ".bad-*")
	if len(bad) != 1 {
		t.Fatalf("quarantined files %v, want one", bad)
	}
	if data, err := os.ReadFile(bad[0]); err != nil || string(data) != "{" {
		t.Fatalf("quarantined record %q, %v; want it kept as it was", data, err)
	}
	g.Offer(context.Background(), mkState(t, 0, 0))
	if a.count() != 0 || g.Held() == nil {
		t.Fatalf("corrupt record, enforcing datapath, empty store: %d applies, hold %+v; want it held", a.count(), g.Held())
	}
}

// Only a state applied in full moves the baseline. Otherwise a state whose
// apply failed (the datapath still enforces the old one) becomes the
// baseline, and the next state is compared with something never enforced.
func TestGuardBaselineMovesOnlyOnSuccess(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	g, a, _ := newGuardAt(t, time.Hour, dir)
	g.Offer(ctx, mkState(t, 4, 4)) // 8 objects, 4 policies: enforced
	if a.count() != 1 {
		t.Fatal("first state not applied")
	}
	// Two policies go (exactly half: passed on), but the apply fails.
	a.setFail(errors.New("policy trie full"))
	g.Offer(ctx, mkState(t, 4, 4, "np0", "np1"))
	if a.count() != 2 {
		t.Fatal("half of the policies removed: not passed on")
	}
	a.setFail(nil)
	// One more goes: 3 of the 4 enforced policies, in one step from what
	// the datapath enforces.
	g.Offer(ctx, mkState(t, 4, 4, "np0", "np1", "np2"))
	if h := g.Held(); a.count() != 2 || h == nil || h.AppliedPolicies != 4 {
		t.Fatalf("3 of 4 enforced policies gone after a failed apply: %d applies, hold %+v; want it held against the enforced state", a.count(), h)
	}
	g.Stop()
	// Nor is a failed state recorded for the next agent.
	g2, a2, _ := newGuardAt(t, time.Hour, dir)
	g2.Offer(ctx, mkState(t, 4, 4, "np0", "np1", "np2"))
	if h := g2.Held(); a2.count() != 0 || h == nil || h.AppliedPolicies != 4 {
		t.Fatalf("after a restart: %d applies, hold %+v; want it held against the state applied in full", a2.count(), h)
	}
}

// A state whose apply failed may still come to be enforced (the agent
// retries), so a next state is compared with it too.
func TestGuardComparesWithAFailedState(t *testing.T) {
	ctx := context.Background()
	g, a, _ := newGuard(t, time.Hour)
	g.Offer(ctx, mkState(t, 2, 0))
	a.setFail(errors.New("apply failed"))
	g.Offer(ctx, mkState(t, 2, 4)) // policies added, apply failed
	a.setFail(nil)
	g.Offer(ctx, mkState(t, 2, 0))
	if h := g.Held(); a.count() != 2 || h == nil || !strings.Contains(h.Reason, "failed") {
		t.Fatalf("every policy of a failed (and retried) state gone: %d applies, hold %+v; want it held", a.count(), h)
	}
}

func TestNewRejectsNoGrace(t *testing.T) {
	if _, err := New(Config{}, func(context.Context, *store.Result) error { return nil }); err == nil {
		t.Fatal("a zero grace period was accepted")
	}
}
