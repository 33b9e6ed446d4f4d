package policy

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

// ErrOverBudget is returned (wrapped) for a policy whose entries would take
// more of the datapath's policy trie than its Budget allows.
var ErrOverBudget = errors.New("policy over its trie budget")

// Budget limits what policies may cost in the datapath's policy trie, in
// keys of one policy generation as EndpointPolicy.TrieSize counts them. The trie is
// shared by every endpoint of the node: without a budget, one policy with
// a few unaligned port ranges over many peers fills it, and from then on
// every apply on the node fails. Zero fields are no limit.
//
// A policy over budget is rejected alone, and fails closed: if it replaced
// an accepted version, that version stays in force (when it still fits);
// otherwise its rules are withheld but its isolation stays: the directions
// it selects its pods in stay default-deny, and a direction where it has
// an enforcing Deny rule is closed whole (nothing passes there), since
// without its deny entries another policy's allow could pass what it
// denies. Other policies, and pods coming and going, keep applying.
type Budget struct {
	// Endpoint is the most keys one endpoint's compiled policy may take.
	// When an endpoint goes over, the policies that select it are withheld,
	// largest first on that endpoint, until it fits.
	Endpoint int
	// Policy is the most keys one policy may take, counted alone on each
	// local endpoint it selects and summed over them.
	Policy int
	// Node is the most keys all endpoints together may take (one generation
	// each). When the node goes over, the policies that cost most are
	// withheld until it fits.
	Node int
}

// Budget reasons, in PolicyStatus.Reason.
const (
	BudgetReasonPolicy   = "policy"
	BudgetReasonEndpoint = "endpoint"
	BudgetReasonNode     = "node"
)

// PolicyStatus is a policy that is not enforced as written because of its
// budget.
type PolicyStatus struct {
	Kind, Namespace, Name string
	// Reason is BudgetReasonPolicy (its own total is over Budget.Policy),
	// BudgetReasonEndpoint (an endpoint it selects is over Budget.Endpoint)
	// or BudgetReasonNode (all endpoints together are over Budget.Node).
	Reason string
	// Cost is the policy's keys summed over the local endpoints it selects
	// (per generation), and Limit the budget it went over.
	Cost, Limit int
	// Kept: the newest version was rejected and the previous one stays in
	// force. Otherwise the policy's rules are withheld and only its
	// isolation applies.
	Kept bool
	// Message says it in words, for logs and status.
	Message string
}

// overBudgetError is a PolicyStatus message that is an ErrOverBudget.
type overBudgetError string

func (e overBudgetError) Error() string { return string(e) }
func (e overBudgetError) Unwrap() error { return ErrOverBudget }

type withholding struct {
	reason      string
	cost, limit int
}

type compiledEP struct {
	pol  *EndpointPolicy
	keys []policyKey
}

// BudgetStatus lists the policies that are over budget, by key.
func (c *Compiler) BudgetStatus() []PolicyStatus {
	var out []PolicyStatus
	for _, k := range slices.SortedFunc(maps.Keys(c.withheld), compareKeys) {
		h := c.withheld[k]
		out = append(out, PolicyStatus{Kind: k.Kind, Namespace: k.Namespace, Name: k.Name, Reason: h.reason,
			Cost: h.cost, Limit: h.limit,
			Message: fmt.Sprintf("%s: %v: %s; its rules are withheld, its pods stay isolated", k, ErrOverBudget, h.describe())})
	}
	for _, k := range slices.SortedFunc(maps.Keys(c.kept), compareKeys) {
		if _, ok := c.withheld[k]; ok {
			continue // the kept version is over budget too: reported above
		}
		h := c.kept[k]
		out = append(out, PolicyStatus{Kind: k.Kind, Namespace: k.Namespace, Name: k.Name, Reason: h.reason,
			Cost: h.cost, Limit: h.limit, Kept: true,
			Message: fmt.Sprintf("%s: %v: new version %s; the previous version stays in force", k, ErrOverBudget, h.describe())})
	}
	return out
}

func (h withholding) describe() string {
	switch h.reason {
	case BudgetReasonEndpoint:
		return fmt.Sprintf("an endpoint it selects would need more than its budget of %d trie keys", h.limit)
	case BudgetReasonNode:
		return fmt.Sprintf("it needs %d trie keys, the largest share of a node over its budget of %d", h.cost, h.limit)
	}
	return fmt.Sprintf("it needs %d trie keys, its budget is %d", h.cost, h.limit)
}

// costOf is a policy's standalone cost summed over its endpoints.
func (c *Compiler) costOf(pk policyKey) int {
	n := 0
	for _, v := range c.polCost[pk] {
		n += v
	}
	return n
}

// markPolicy marks every local endpoint a policy selects dirty.
func (c *Compiler) markPolicy(pk policyKey, w *work) {
	for ep := range c.polCost[pk] {
		w.dirty[ep] = struct{}{}
	}
	for ep := range c.policyEPs[pk] {
		w.dirty[ep] = struct{}{}
	}
}

// settleBudget decides, before finish compiles the dirty endpoints, which
// policies are withheld, and precompiles the endpoints it had to measure.
// Decisions depend on the state only (not on the order of updates): a
// policy's own total decides Budget.Policy; an endpoint over
// Budget.Endpoint withholds its largest policies (by their cost on it, then
// by key) until it fits.
func (c *Compiler) settleBudget(w *work) {
	c.precompiled, c.entryCache = nil, nil
	if c.budget == (Budget{}) {
		return
	}
	c.entryCache = map[EndpointID]map[policyKey][]Entry{}
	touched := map[policyKey]struct{}{}
	for ep := range w.dirty {
		for _, pk := range c.epPolicies[ep] {
			if m := c.polCost[pk]; m != nil {
				delete(m, ep)
				touched[pk] = struct{}{}
			}
		}
		k, ok := c.endpoints[ep]
		if !ok {
			continue
		}
		ps := c.pods[k]
		sel, enforce, _ := c.selecting(ps)
		cache := make(map[policyKey][]Entry, len(sel))
		c.entryCache[ep] = cache
		for _, p := range sel {
			es := SortEntries(c.policyEntries(nil, p, ps, enforce))
			cache[p.key] = es
			n := (&EndpointPolicy{Entries: es}).TrieSize()
			if c.polCost[p.key] == nil {
				c.polCost[p.key] = map[EndpointID]int{}
			}
			c.polCost[p.key][ep] = n
			touched[p.key] = struct{}{}
		}
	}
	for pk := range touched {
		if c.policies[pk] == nil {
			delete(c.polCost, pk)
			delete(c.withheld, pk)
			continue
		}
		if len(c.polCost[pk]) == 0 {
			delete(c.polCost, pk)
		}
		cost := c.costOf(pk)
		h, was := c.withheld[pk]
		over := c.budget.Policy > 0 && cost > c.budget.Policy
		switch {
		case over:
			if !was || h.reason != BudgetReasonPolicy {
				c.markPolicy(pk, w)
			}
			c.withheld[pk] = withholding{reason: BudgetReasonPolicy, cost: cost, limit: c.budget.Policy}
		case was && h.reason == BudgetReasonPolicy:
			delete(c.withheld, pk)
			c.markPolicy(pk, w)
		case was:
			// Withheld for an endpoint: decided again below.
			h.cost = cost
			c.withheld[pk] = h
		}
	}
	if c.budget.Endpoint <= 0 && c.budget.Node <= 0 {
		return
	}
	// Policies withheld for an endpoint that is being recompiled get
	// another chance: the endpoint (or the policy) may fit now. Policies
	// withheld for the node are all decided again, from scratch, so the
	// outcome does not depend on the order of updates.
	for pk, h := range c.withheld {
		switch h.reason {
		case BudgetReasonNode:
			delete(c.withheld, pk)
			c.markPolicy(pk, w)
		case BudgetReasonEndpoint:
			for ep := range c.polCost[pk] {
				if _, ok := w.dirty[ep]; ok {
					delete(c.withheld, pk)
					c.markPolicy(pk, w)
					break
				}
			}
		}
	}
	c.precompiled = map[EndpointID]compiledEP{}
	sizes := map[EndpointID]int{}
	queue := slices.Sorted(maps.Keys(w.dirty))
	for {
		c.measureEndpoints(queue, sizes, w)
		if c.budget.Node <= 0 {
			break
		}
		total := 0
		for ep, n := range c.epSize {
			if _, dirty := w.dirty[ep]; !dirty {
				total += n
			}
		}
		for _, n := range sizes {
			total += n
		}
		if total <= c.budget.Node {
			break
		}
		// The node is over: withhold the policy that costs most.
		var victim policyKey
		best := 0
		for _, pk := range slices.SortedFunc(maps.Keys(c.polCost), compareKeys) {
			if _, ok := c.withheld[pk]; ok {
				continue
			}
			if n := c.costOf(pk); n > best {
				victim, best = pk, n
			}
		}
		if best == 0 {
			break // nothing left to withhold that costs anything
		}
		c.withheld[victim] = withholding{reason: BudgetReasonNode, cost: best, limit: c.budget.Node}
		queue = slices.Sorted(maps.Keys(c.polCost[victim]))
		for _, ep := range queue {
			w.dirty[ep] = struct{}{}
			delete(c.precompiled, ep)
		}
	}
	for ep := range w.dirty {
		if n, ok := sizes[ep]; ok {
			c.epSize[ep] = n
		} else {
			delete(c.epSize, ep)
		}
	}
}

// measureEndpoints compiles the endpoints of queue (and those a withheld
// policy sends back into it) into precompiled, with their sizes, withholding
// policies of an endpoint over Budget.Endpoint, largest on it first.
func (c *Compiler) measureEndpoints(queue []EndpointID, sizes map[EndpointID]int, w *work) {
	for len(queue) > 0 {
		ep := queue[0]
		queue = queue[1:]
		k, ok := c.endpoints[ep]
		if !ok {
			continue
		}
		pol, keys := c.compileEndpoint(c.pods[k])
		size := -1
		if len(keys) == 1 {
			// One policy, applied: the endpoint's entries are its entries.
			if _, withheld := c.withheld[keys[0]]; !withheld {
				if n, ok := c.polCost[keys[0]][ep]; ok {
					size = n
				}
			}
		}
		if size < 0 {
			size = pol.TrieSize()
		}
		if c.budget.Endpoint <= 0 || size <= c.budget.Endpoint {
			c.precompiled[ep] = compiledEP{pol, keys}
			sizes[ep] = size
			continue
		}
		var victim *policyKey
		for i, pk := range keys {
			if _, ok := c.withheld[pk]; ok {
				continue
			}
			if victim == nil || c.polCost[pk][ep] > c.polCost[*victim][ep] {
				victim = &keys[i]
			}
		}
		if victim == nil {
			// Every policy of the endpoint is withheld, so it has no
			// entries beyond closed directions: cannot happen, but an
			// endpoint must never be left uncompiled.
			c.precompiled[ep] = compiledEP{pol, keys}
			sizes[ep] = size
			continue
		}
		c.withheld[*victim] = withholding{reason: BudgetReasonEndpoint, cost: c.costOf(*victim), limit: c.budget.Endpoint}
		// Every endpoint of the victim is measured again: without its
		// entries, cells can split and an endpoint can even grow.
		for _, other := range slices.Sorted(maps.Keys(c.polCost[*victim])) {
			w.dirty[other] = struct{}{}
			delete(c.precompiled, other)
			delete(sizes, other)
			if other != ep {
				queue = append(queue, other)
			}
		}
		queue = append(queue, ep)
	}
}
