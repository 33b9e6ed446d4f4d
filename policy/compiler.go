package policy

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Compiler turns a Snapshot into a MapState and keeps what it needs to apply
// single changes (a pod, a namespace, a policy) incrementally: identities,
// rule IDs and per-endpoint results survive between updates, so an update
// recomputes only the endpoints it affects and the IDs of everything else stay
// the same (the datapath writes only the difference).
//
// A Compiler is not safe for concurrent use.
type Compiler struct {
	log         *slog.Logger
	trustDomain string
	denyHost    bool

	namespaces map[string]map[string]string
	pods       map[podKey]*podState
	podsByNS   map[string]map[podKey]*podState

	idents     map[string]*ident
	identsByID map[identity.NumericID]*ident
	identsByNS map[string]map[*ident]struct{}
	withRegion map[*ident]struct{}
	workloads  *identity.Allocator

	policies     map[policyKey]*cpolicy
	policiesByNS map[string]map[policyKey]*cpolicy

	cidrs     map[netip.Prefix]*cidrIdent
	cidrAlloc *identity.Allocator

	ruleIDs  map[ruleKey]RuleID
	nextRule RuleID
	// rulesVersion counts changes of ruleIDs, for AllocationVersion.
	rulesVersion uint64

	// peerCache holds the resolved identities of one peer of one rule; it is
	// dropped for a policy whenever identities it could match change.
	peerCache map[policyKey]map[peerRef][]identity.NumericID
	// namedIdx maps "name/proto" to the identities that have that named port.
	namedIdx map[string][]identPort

	ipcache map[netip.Prefix]identity.NumericID
	// ipOwner is the pod whose address each host entry of ipcache is:
	// only that pod's removal takes the entry out, so a stale pod that
	// shared the address cannot delete the live pod's entry.
	ipOwner map[netip.Prefix]podKey
	// hostIPs are the node's addresses, added to the published ipcache as
	// identity.IDHost (they win over any CIDR prefix of the same length).
	hostIPs    map[netip.Prefix]struct{}
	endpoints  map[EndpointID]podKey
	epPolicies map[EndpointID][]policyKey
	policyEPs  map[policyKey]map[EndpointID]struct{}

	ms *MapState

	// budget limits what policies cost in the datapath's trie (see Budget).
	budget Budget
	// polCost is each policy's trie cost, alone, on each local endpoint it
	// selects; withheld the policies over budget whose rules are withheld;
	// kept the policies whose newest version was rejected for its budget
	// while the previous version stays.
	polCost  map[policyKey]map[EndpointID]int
	withheld map[policyKey]withholding
	kept     map[policyKey]withholding
	// precompiled holds endpoints settleBudget compiled to measure them,
	// for finish to use.
	precompiled map[EndpointID]compiledEP
	// entryCache holds, during one finish, each dirty endpoint's entries
	// per policy that settleBudget computed, for compileEndpoint.
	entryCache map[EndpointID]map[policyKey][]Entry
	// epSize is each endpoint's trie keys, kept for Budget.Node.
	epSize map[EndpointID]int
}

type cidrIdent struct {
	id   identity.NumericID
	refs int
}

type ruleKey struct {
	policy policyKey
	dir    Direction
	index  int
}

type peerRef struct {
	rule, peer int
}

type identPort struct {
	id   identity.NumericID
	port uint16
}

// Config configures a Compiler.
type Config struct {
	Logger *slog.Logger
	// Now stamps identities when their last pod goes (see
	// ExpireIdentities); time.Now when nil.
	Now func() time.Time
	// Budget limits what policies may cost in the datapath's policy trie.
	Budget Budget
}

// NewCompiler returns an empty compiler; Reset loads a snapshot into it.
func NewCompiler(cfg Config) *Compiler {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	c := &Compiler{log: log, workloads: identity.NewWorkloadAllocator(), cidrAlloc: identity.NewCIDRAllocator(),
		ruleIDs: map[ruleKey]RuleID{}, nextRule: 1, budget: cfg.Budget}
	// Numbers outlive the objects that had them until ExpireIdentities:
	// see Allocation.
	c.workloads.Retain(now)
	c.cidrAlloc.Retain(now)
	c.clear(&Snapshot{})
	return c
}

func (c *Compiler) clear(s *Snapshot) {
	c.trustDomain = s.TrustDomain
	if c.trustDomain == "" {
		c.trustDomain = identity.DefaultTrustDomain
	}
	c.denyHost = s.DenyHostIngress
	c.hostIPs = hostPrefixes(s.HostIPs)
	c.namespaces = map[string]map[string]string{}
	c.pods = map[podKey]*podState{}
	c.podsByNS = map[string]map[podKey]*podState{}
	c.idents = map[string]*ident{}
	c.identsByID = map[identity.NumericID]*ident{}
	c.identsByNS = map[string]map[*ident]struct{}{}
	c.withRegion = map[*ident]struct{}{}
	// The allocators and rule IDs are kept: a full compile gives every
	// identity and rule that is still there the number it had.
	c.workloads.ReleaseAll()
	c.policies = map[policyKey]*cpolicy{}
	c.policiesByNS = map[string]map[policyKey]*cpolicy{}
	c.cidrs = map[netip.Prefix]*cidrIdent{}
	c.cidrAlloc.ReleaseAll()
	c.peerCache = map[policyKey]map[peerRef][]identity.NumericID{}
	c.namedIdx = nil
	c.ipcache = map[netip.Prefix]identity.NumericID{}
	c.ipOwner = map[netip.Prefix]podKey{}
	c.endpoints = map[EndpointID]podKey{}
	c.epPolicies = map[EndpointID][]policyKey{}
	c.policyEPs = map[policyKey]map[EndpointID]struct{}{}
	c.polCost = map[policyKey]map[EndpointID]int{}
	c.withheld = map[policyKey]withholding{}
	c.kept = map[policyKey]withholding{}
	c.epSize = map[EndpointID]int{}
	c.ms = &MapState{IPCache: map[netip.Prefix]identity.NumericID{}, Endpoints: map[EndpointID]*EndpointPolicy{}, Rules: map[RuleID]RuleInfo{},
		Enrolled: map[identity.NumericID]bool{}}
}

// Compile compiles a snapshot from scratch. It is deterministic: the same
// snapshot gives the same MapState, identities and rule IDs.
//
// The MapState is always usable. The error, when not nil, lists the policies
// that were rejected (each rejected whole, see ValidationError) and other
// inconsistencies of the snapshot that were skipped.
func Compile(s *Snapshot) (*MapState, error) {
	return NewCompiler(Config{}).Reset(s)
}

// MapState returns the current result.
func (c *Compiler) MapState() *MapState { return c.ms }

// Reset replaces the compiler's state with a full compile of s.
func (c *Compiler) Reset(s *Snapshot) (*MapState, error) {
	ms, _, err := c.Replace(s)
	return ms, err
}

// Replace is Reset that also returns the difference to the previous result,
// for an agent that reloads its whole store. The revision keeps increasing
// across it. Identities and rules that the compiler numbered before (or
// that RestoreAllocation loaded) keep their numbers; new ones are numbered
// in the deterministic order of a full compile.
func (c *Compiler) Replace(s *Snapshot) (*MapState, Diff, error) {
	if s.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(s.TrustDomain); err != nil {
			return c.ms, Diff{}, fmt.Errorf("trust domain %q: %w", s.TrustDomain, err)
		}
	}
	prev := c.ms
	c.clear(s)
	c.ms = prev
	var errs []error
	for _, n := range s.Namespaces {
		c.namespaces[n.Name] = namespaceLabels(n)
	}
	// Policies first: their CIDRs decide the identities' regions.
	var pols []*cpolicy
	for _, np := range s.NetworkPolicies {
		p, err := compileNetworkPolicy(np)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pols = append(pols, p)
	}
	for _, bp := range s.BulkheadPolicies {
		p, err := compileBulkheadPolicy(bp)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pols = append(pols, p)
	}
	slices.SortStableFunc(pols, func(a, b *cpolicy) int { return compareKeys(a.key, b.key) })
	for i, p := range pols {
		if i > 0 && pols[i-1].key == p.key {
			errs = append(errs, fmt.Errorf("%s: defined twice, the first definition is used", p.key))
			continue
		}
		c.addPolicy(p)
	}
	for _, p := range c.policies {
		for _, pr := range p.cidrs {
			if c.cidrs[pr] == nil {
				c.cidrs[pr] = &cidrIdent{}
			}
			c.cidrs[pr].refs++
		}
	}
	cidrOrder := slices.Collect(maps.Keys(c.cidrs))
	slices.SortFunc(cidrOrder, comparePrefix)
	for _, pr := range cidrOrder {
		id, err := c.cidrAlloc.Acquire(pr.String())
		if err != nil {
			return c.ms, Diff{}, err
		}
		c.cidrs[pr].id = id
		c.ipcache[pr] = id
	}

	// Pods in the order of their identity keys, so IDs are deterministic.
	type keyed struct {
		pod Pod
		key string
	}
	var ps []keyed
	seen := map[podKey]bool{}
	seenEP := map[EndpointID]podKey{}
	for _, p := range s.Pods {
		p.Namespace = namespaceOf(p.Namespace)
		k := podKey{p.Namespace, p.Name}
		if seen[k] {
			errs = append(errs, fmt.Errorf("pod %s: defined twice, the first definition is used", k))
			continue
		}
		if p.Endpoint != 0 {
			if other, dup := seenEP[p.Endpoint]; dup {
				errs = append(errs, fmt.Errorf("pod %s: endpoint %d already belongs to %s, treated as not local", k, p.Endpoint, other))
				p.Endpoint = 0
			} else {
				seenEP[p.Endpoint] = k
			}
		}
		seen[k] = true
		_, keys := c.identKeys(&p)
		ps = append(ps, keyed{p, keys[0].key})
	}
	slices.SortFunc(ps, func(a, b keyed) int {
		if a.key != b.key {
			if a.key < b.key {
				return -1
			}
			return 1
		}
		return compareKeys(policyKey{"", a.pod.Namespace, a.pod.Name}, policyKey{"", b.pod.Namespace, b.pod.Name})
	})
	w := newWork()
	for _, kp := range ps {
		if err := c.attachPod(kp.pod, w); err != nil {
			return c.ms, Diff{}, err
		}
	}
	for ep := range c.endpoints {
		w.dirty[ep] = struct{}{}
	}
	for ep := range prev.Endpoints {
		w.dirty[ep] = struct{}{}
	}
	c.pruneRuleIDs()
	d := c.finish(w, true)
	for _, st := range c.BudgetStatus() {
		errs = append(errs, overBudgetError(st.Message))
	}
	return c.ms, d, errors.Join(errs...)
}

func namespaceLabels(n Namespace) map[string]string {
	l := make(map[string]string, len(n.Labels)+1)
	maps.Copy(l, n.Labels)
	l[NamespaceNameLabel] = n.Name
	return l
}

func compareKeys(a, b policyKey) int {
	switch {
	case a.Kind != b.Kind:
		return cmpString(a.Kind, b.Kind)
	case a.Namespace != b.Namespace:
		return cmpString(a.Namespace, b.Namespace)
	}
	return cmpString(a.Name, b.Name)
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// addPolicy registers a validated policy and gives its rules IDs.
func (c *Compiler) addPolicy(p *cpolicy) {
	c.policies[p.key] = p
	m := c.policiesByNS[p.key.Namespace]
	if m == nil {
		m = map[policyKey]*cpolicy{}
		c.policiesByNS[p.key.Namespace] = m
	}
	m[p.key] = p
	for _, r := range p.rules {
		k := ruleKey{p.key, r.dir, r.index}
		if _, ok := c.ruleIDs[k]; !ok {
			c.ruleIDs[k] = c.nextRule
			c.nextRule++
			c.rulesVersion++
		}
	}
}

// removePolicy unregisters a policy; rule IDs the replacement keeps survive
// (keep), the others are released.
func (c *Compiler) removePolicy(p *cpolicy, keep *cpolicy) {
	delete(c.policies, p.key)
	delete(c.policiesByNS[p.key.Namespace], p.key)
	for _, r := range p.rules {
		k := ruleKey{p.key, r.dir, r.index}
		if keep != nil && slices.ContainsFunc(keep.rules, func(o crule) bool { return o.dir == r.dir && o.index == r.index }) {
			continue
		}
		delete(c.ruleIDs, k)
		c.rulesVersion++
	}
	delete(c.peerCache, p.key)
}

// attachPod registers a pod under its identities and in the ipcache.
func (c *Compiler) attachPod(p Pod, w *work) error {
	p.Namespace = namespaceOf(p.Namespace)
	if p.SPIFFEID != "" {
		if err := c.checkIssued(p); err != nil {
			return fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err)
		}
	}
	k := podKey{p.Namespace, p.Name}
	l, keys := c.identKeys(&p)
	ps := &podState{key: k, pod: p, addrIdents: make([]*ident, 0, len(keys))}
	for _, ak := range keys {
		id := c.idents[ak.key]
		if id != nil && slices.Contains(ps.idents, id) {
			ps.addrIdents = append(ps.addrIdents, id)
			continue
		}
		// One reference per pod and identity: detachPod releases each.
		nid, err := c.workloads.Acquire(ak.key)
		if err != nil {
			for _, held := range ps.idents {
				c.releaseIdent(held, ps, w)
			}
			return fmt.Errorf("pod %s: %w", k, err)
		}
		if id == nil {
			id = c.newIdent(l, ak.regions, ak.key)
			id.id = nid
			c.idents[ak.key] = id
			c.identsByID[nid] = id
			if c.identsByNS[p.Namespace] == nil {
				c.identsByNS[p.Namespace] = map[*ident]struct{}{}
			}
			c.identsByNS[p.Namespace][id] = struct{}{}
			if len(ak.regions) > 0 {
				c.withRegion[id] = struct{}{}
			}
			w.idents = append(w.idents, id)
		}
		id.pods[k] = ps
		if id.recomputePorts() {
			w.idents = append(w.idents, id)
			c.namedIdx = nil
		}
		ps.idents = append(ps.idents, id)
		ps.addrIdents = append(ps.addrIdents, id)
	}
	ps.ident = ps.addrIdents[0]
	c.pods[k] = ps
	if c.podsByNS[k.ns] == nil {
		c.podsByNS[k.ns] = map[podKey]*podState{}
	}
	c.podsByNS[k.ns][k] = ps
	for i, a := range p.IPs {
		h := identity.Host(a)
		c.ipcache[h] = ps.addrIdents[i].id
		c.ipOwner[h] = k
		w.ip[h] = struct{}{}
	}
	if p.Endpoint != 0 {
		c.endpoints[p.Endpoint] = k
		w.dirty[p.Endpoint] = struct{}{}
	}
	return nil
}

// releaseIdent drops the pod's reference to one of its identities, and the
// identity when it was the last.
func (c *Compiler) releaseIdent(id *ident, ps *podState, w *work) {
	delete(id.pods, ps.key)
	c.workloads.Release(id.key)
	if len(id.pods) == 0 {
		delete(c.idents, id.key)
		delete(c.identsByID, id.id)
		delete(c.identsByNS[ps.key.ns], id)
		delete(c.withRegion, id)
		c.namedIdx = nil
		w.idents = append(w.idents, id)
	} else if id.recomputePorts() {
		c.namedIdx = nil
		w.idents = append(w.idents, id)
	}
}

// detachPod undoes attachPod.
func (c *Compiler) detachPod(ps *podState, w *work) {
	delete(c.pods, ps.key)
	delete(c.podsByNS[ps.key.ns], ps.key)
	for _, id := range ps.idents {
		c.releaseIdent(id, ps, w)
	}
	for _, a := range ps.pod.IPs {
		h := identity.Host(a)
		if c.ipOwner[h] != ps.key {
			continue // a later pod took the address over
		}
		delete(c.ipOwner, h)
		if ci, ok := c.cidrs[h]; ok {
			c.ipcache[h] = ci.id
		} else {
			delete(c.ipcache, h)
		}
		w.ip[h] = struct{}{}
	}
	if ep := ps.pod.Endpoint; ep != 0 && c.endpoints[ep] == ps.key {
		delete(c.endpoints, ep)
		w.dirty[ep] = struct{}{}
	}
}
