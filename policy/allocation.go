package policy

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Allocation is the compiler's numbering: the numeric ID of every workload
// identity (by identity key) and CIDR identity (by prefix), and the ID of
// every rule. The datapath's pinned maps carry these numbers, and they
// survive an agent restart; an agent that saves the Allocation and loads it
// into its next compiler (RestoreAllocation) compiles the same store to the
// very same map entries, so the first apply after a restart changes nothing,
// instead of renumbering everything while packets are judged against a mix of
// old and new numbers.
type Allocation struct {
	Workloads identity.AllocatorState `json:"workloads"`
	CIDRs     identity.AllocatorState `json:"cidrs"`
	Rules     []RuleAllocation        `json:"rules"`
	NextRule  RuleID                  `json:"nextRule"`
}

// RuleAllocation is the ID of one rule of one policy.
type RuleAllocation struct {
	Kind      string    `json:"kind"`
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Direction Direction `json:"direction"`
	Index     int       `json:"index"`
	ID        RuleID    `json:"id"`
}

// Allocation returns the current numbering, for RestoreAllocation.
func (c *Compiler) Allocation() Allocation {
	a := Allocation{Workloads: c.workloads.State(), CIDRs: c.cidrAlloc.State(), NextRule: c.nextRule}
	for k, id := range c.ruleIDs {
		a.Rules = append(a.Rules, RuleAllocation{Kind: k.policy.Kind, Namespace: k.policy.Namespace, Name: k.policy.Name,
			Direction: k.dir, Index: k.index, ID: id})
	}
	slices.SortFunc(a.Rules, func(x, y RuleAllocation) int { return int(x.ID) - int(y.ID) })
	return a
}

// AllocationVersion changes whenever Allocation would return something
// else, so a caller saves it only then.
func (c *Compiler) AllocationVersion() uint64 {
	return c.workloads.Version() + c.cidrAlloc.Version() + c.rulesVersion
}

// RestoreAllocation loads a numbering saved from an earlier compiler. It is
// refused once anything was compiled. It loads all of it or nothing: a
// caller that numbers afresh after an error gets a fresh numbering, not the
// workload numbers of a record whose CIDR part was bad.
func (c *Compiler) RestoreAllocation(a Allocation) error {
	if len(c.pods) != 0 || len(c.policies) != 0 || len(c.ruleIDs) != 0 {
		return errors.New("restore allocation: the compiler is in use")
	}
	rules := make(map[ruleKey]RuleID, len(a.Rules))
	ids := make(map[RuleID]bool, len(a.Rules))
	for _, r := range a.Rules {
		if r.ID == RuleDefault || r.ID >= a.NextRule || ids[r.ID] {
			return fmt.Errorf("restore allocation: rule %s %s/%s %s[%d]: ID %d is 0, duplicate or not below next %d",
				r.Kind, r.Namespace, r.Name, r.Direction, r.Index, r.ID, a.NextRule)
		}
		ids[r.ID] = true
		rules[ruleKey{policyKey{r.Kind, r.Namespace, r.Name}, r.Direction, r.Index}] = r.ID
	}
	if a.NextRule == 0 {
		a.NextRule = 1
	}
	workloads, cidrs := c.workloads.Empty(), c.cidrAlloc.Empty()
	if err := workloads.Restore(a.Workloads); err != nil {
		return fmt.Errorf("workload identities: %w", err)
	}
	if err := cidrs.Restore(a.CIDRs); err != nil {
		return fmt.Errorf("CIDR identities: %w", err)
	}
	if len(c.workloads.State().Keys) != 0 || len(c.cidrAlloc.State().Keys) != 0 {
		return errors.New("restore allocation: the compiler has numbered identities")
	}
	c.workloads, c.cidrAlloc = workloads, cidrs
	c.ruleIDs, c.nextRule = rules, a.NextRule
	c.rulesVersion++
	return nil
}

// ExpireIdentities forgets the numbers of identities that no pod or policy
// has used since before cutoff. Until then a label set that comes back
// (a flapping label, a pod re-created) gets its old number. A forgotten
// number is still not reused until the whole range wraps, so conntrack
// entries and flow records that carry it never name another workload.
func (c *Compiler) ExpireIdentities(cutoff time.Time) int {
	return c.workloads.Expire(cutoff) + c.cidrAlloc.Expire(cutoff)
}

// pruneRuleIDs drops the IDs of rules that no policy has after a full
// compile (kept across it so that surviving rules keep theirs).
func (c *Compiler) pruneRuleIDs() {
	for k := range c.ruleIDs {
		p := c.policies[k.policy]
		if p == nil || !slices.ContainsFunc(p.rules, func(r crule) bool { return r.dir == k.dir && r.index == k.index }) {
			delete(c.ruleIDs, k)
			c.rulesVersion++
		}
	}
}
