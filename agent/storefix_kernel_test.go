package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
)

// budgetPolicy is a NetworkPolicy of shop that admits the given TCP ports
// from one ipBlock: one policy trie key per port on each pod it selects.
func budgetPolicy(ports ...int) string {
	var b strings.Builder
	b.WriteString("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: wide, namespace: shop}\n" +
		"spec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.99.0.0/16}\n    ports:\n")
	for _, p := range ports {
		fmt.Fprintf(&b, "    - {protocol: TCP, port: %d}\n", p)
	}
	return b.String()
}

// After a failed apply, status lists the rejections of the state the agent
// compiled (and is retrying), not those of the last state that applied: a
// policy fixed to fit its budget is no longer listed as rejected.
func TestBudgetStatusFollowsTheCompileWhenTheApplyFails(t *testing.T) {
	a, store := newTestAgentWith(t, func(c *Config) { c.PolicyBudgetPolicy = 2 })
	var failing atomic.Bool
	apply := a.applyPolicy
	a.applyPolicy = func(ms *policy.MapState) (datapath.ApplyStats, error) {
		if failing.Load() {
			return datapath.ApplyStats{}, fmt.Errorf("write policy: %w", syscall.ENOMEM)
		}
		return apply(ms)
	}
	write := func(body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(store, "policy.yaml"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(budgetPolicy(80, 81, 82, 90))
	startTestAgent(t, a)
	if _, err := a.AddEndpoint(context.Background(), podVeth(t, "c0ffee71", "web", "10.213.7.1/32")); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a, "the 4-key policy rejected over a 2-key budget", func(st api.StatusResponse) bool {
		return len(st.PolicyErrors) == 1 && st.PolicyErrors[0].Policy == "NetworkPolicy shop/wide"
	})

	failing.Store(true)
	write(budgetPolicy(80))
	// A refresh (the new veth's addresses) may fail before the store is
	// reloaded; status then rightly lists the rejection of what it
	// compiled. Once the fixed store is compiled, its apply failing, the
	// rejection must be gone (with the list updated only after a
	// successful apply it stays until the timeout).
	waitStatus(t, a, "the fixed policy compiled, its apply failing, and no rejection listed", func(st api.StatusResponse) bool {
		return st.PolicyApply != nil && len(st.PolicyErrors) == 0
	})
	failing.Store(false)
	st := waitStatus(t, a, "the retry succeeding", func(st api.StatusResponse) bool { return st.PolicyApply == nil })
	if len(st.PolicyErrors) != 0 {
		t.Errorf("after the retry: %+v", st.PolicyErrors)
	}
}

// A --state-dir on tmpfs while bpffs survived: the restarted agent has no
// record of the store state it applied, but the datapath it re-opens still
// isolates a pod by it. An emptied store is held back, not applied at once
// (which would open every pod).
func TestRestartWithoutStoreRecordHoldsAnEmptiedStore(t *testing.T) {
	a, store := newTestAgentWith(t, func(c *Config) { c.StoreShrinkGrace = time.Hour })
	if err := os.WriteFile(filepath.Join(store, "policy.yaml"), []byte(budgetPolicy(80)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	waitStatus(t, a, "first agent applied the store", func(st api.StatusResponse) bool { return st.Ready })
	if a.dp.Restricts() {
		t.Fatal("the datapath restricts something with no pod on the node")
	}
	// A pod the policy isolates: the datapath restricts it.
	if _, err := a.AddEndpoint(ctx, podVeth(t, "c0ffee72", "web", "10.213.7.2/32")); err != nil {
		t.Fatal(err)
	}
	if !a.dp.Restricts() {
		t.Fatal("the datapath does not restrict the isolated pod")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("first agent: %v", err)
	}

	// The state dir is gone (tmpfs), and so are the store's files.
	cfg := a.cfg
	cfg.StateDir = filepath.Join(t.TempDir(), "fresh-state")
	if err := os.Remove(filepath.Join(store, "policy.yaml")); err != nil {
		t.Fatal(err)
	}
	a2, err := New(cfg)
	if err != nil {
		t.Fatalf("second agent: %v", err)
	}
	startTestAgentNoWait(t, a2)
	st := waitStatus(t, a2, "the emptied store held", func(st api.StatusResponse) bool { return st.StoreHeld != nil })
	if st.Ready || !strings.Contains(st.StoreHeld.Reason, "no record") {
		t.Fatalf("status %+v, hold %+v; want the empty store held and the agent not ready", st, st.StoreHeld)
	}
	if !a2.dp.Restricts() {
		t.Error("the held store was applied: the pod is no longer isolated")
	}
	// The policy comes back: applied at once.
	if err := os.WriteFile(filepath.Join(store, "policy.yaml"), []byte(budgetPolicy(80)), 0o644); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a2, "the store with its policy applied", func(st api.StatusResponse) bool { return st.Ready && st.StoreHeld == nil })
}

// startTestAgentNoWait runs a until the test ends.
func startTestAgentNoWait(t *testing.T, a *Agent) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent run: %v", err)
		}
	})
}
