package agent

import (
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Default budgets, as fractions of the policy trie's entries. The trie
// holds two generations of the node's policy (the live one and the next),
// so every key counts twice: one endpoint gets at most 1/8 of the trie,
// one policy at most 1/4, the node half of it per generation. The issue's
// kind of policy (20 unaligned port ranges, 1001-1999 ... 20001-20999,
// over 100 peer identities) costs 19,600 keys on one endpoint, as
// policy/budget_test.go measures (the issue measured about 25,000 with its
// own ranges); either is rejected on a default-sized trie.
const (
	defaultEndpointBudgetDiv = 16
	defaultPolicyBudgetDiv   = 8
)

// policyBudget is the compiler's budget for a policy trie of the given
// size: the flags' values, or the defaults derived from the size. The node
// as a whole gets half the trie.
func (c *Config) policyBudget(trieEntries int) policy.Budget {
	b := policy.Budget{Endpoint: c.PolicyBudgetEndpoint, Policy: c.PolicyBudgetPolicy}
	if b.Endpoint == 0 {
		b.Endpoint = trieEntries / defaultEndpointBudgetDiv
	}
	if b.Policy == 0 {
		b.Policy = trieEntries / defaultPolicyBudgetDiv
	}
	// Two generations share the trie.
	b.Node = trieEntries / 2
	return b
}

func (c *Config) validateBudget() error {
	// Zero is the datapath's default, unless it came from the flag.
	if n := c.Datapath.MaxPolicyEntries; (n != 0 || c.FromFlags) && (n < MinPolicyMapEntries || n > MaxPolicyMapEntries) {
		return fmt.Errorf("--policy-map-entries %d: want %d to %d", n, MinPolicyMapEntries, MaxPolicyMapEntries)
	}
	if c.PolicyBudgetEndpoint < 0 || c.PolicyBudgetPolicy < 0 {
		return fmt.Errorf("--policy-budget-endpoint and --policy-budget-policy must not be negative")
	}
	return nil
}

// budgetReport holds the policies over their trie budget for status, and
// logs and counts changes.
type budgetReport struct {
	mu   sync.Mutex
	last []policy.PolicyStatus
}

// update records the compiler's budget status after a compile, before its
// apply (so a failed apply does not leave the last one's list): each policy
// that went over is logged once (as an error), and one that is back within
// budget is logged too. The gauge bulkhead_policy_over_budget has one
// series per policy over budget.
func (r *budgetReport) update(now []policy.PolicyStatus, log *slog.Logger, m *metrics.Metrics) {
	r.mu.Lock()
	prev := r.last
	r.last = now
	r.mu.Unlock()
	same := func(a, b policy.PolicyStatus) bool {
		return a.Kind == b.Kind && a.Namespace == b.Namespace && a.Name == b.Name
	}
	for _, s := range now {
		if i := slices.IndexFunc(prev, func(p policy.PolicyStatus) bool { return same(p, s) }); i < 0 || prev[i] != s {
			log.Error("policy rejected: over its trie budget", "kind", s.Kind, "namespace", s.Namespace, "policy", s.Name,
				"reason", s.Reason, "cost", s.Cost, "limit", s.Limit, "keptPreviousVersion", s.Kept, "detail", s.Message)
		}
	}
	for _, p := range prev {
		if !slices.ContainsFunc(now, func(s policy.PolicyStatus) bool { return same(p, s) }) {
			log.Info("policy within its trie budget again", "kind", p.Kind, "namespace", p.Namespace, "policy", p.Name)
		}
	}
	if m != nil {
		m.PolicyOverBudget.Reset()
		for _, s := range now {
			fallback := "isolation"
			if s.Kept {
				fallback = "previous-version"
			}
			m.PolicyOverBudget.WithLabelValues(s.Kind, s.Namespace, s.Name, s.Reason, fallback).Set(1)
		}
	}
}

// errors lists the policies over budget for `bulkhead status`.
func (r *budgetReport) errors() []api.PolicyError {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []api.PolicyError
	for _, s := range r.last {
		out = append(out, api.PolicyError{Policy: s.Kind + " " + s.Namespace + "/" + s.Name, Message: s.Message, KeptPreviousVersion: s.Kept})
	}
	return out
}

// trieBudget is the budget for the live policy trie. A different
// --policy-map-entries than the pinned trie's migrates the datapath to a
// trie of the new size (datapath.New copies the entries over), so the live
// size is the flag's; it is read back rather than assumed.
func (a *Agent) trieBudget() policy.Budget {
	live := a.dp.PolicyMapEntries()
	b := a.cfg.policyBudget(live)
	a.log.Info("policy trie budget", "trieEntries", live, "endpoint", b.Endpoint, "policy", b.Policy)
	return b
}
