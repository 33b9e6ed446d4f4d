package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Diff is what one update changed: the datapath writes exactly this.
type Diff struct {
	// Endpoints were added or their policy changed.
	Endpoints []EndpointID
	// RemovedEndpoints are no longer local (or gone).
	RemovedEndpoints []EndpointID
	IPCacheUpserts   map[netip.Prefix]identity.NumericID
	IPCacheDeletes   []netip.Prefix
	RulesUpserted    []RuleID
	RulesRemoved     []RuleID
	// EnrolledAdded and EnrolledRemoved are the identities that entered or
	// left MapState.Enrolled, sorted.
	EnrolledAdded   []identity.NumericID
	EnrolledRemoved []identity.NumericID
}

// Empty reports whether nothing changed.
func (d *Diff) Empty() bool {
	return len(d.Endpoints)+len(d.RemovedEndpoints)+len(d.IPCacheUpserts)+len(d.IPCacheDeletes)+
		len(d.RulesUpserted)+len(d.RulesRemoved)+len(d.EnrolledAdded)+len(d.EnrolledRemoved) == 0
}

// work collects what an update touched until finish recomputes it.
type work struct {
	dirty  map[EndpointID]struct{}
	ip     map[netip.Prefix]struct{}
	idents []*ident
	cidrs  []netip.Prefix
	// rules: the policy set changed, so the rule table must be rebuilt.
	rules bool
}

func newWork() *work {
	return &work{dirty: map[EndpointID]struct{}{}, ip: map[netip.Prefix]struct{}{}}
}

// UpsertPod adds or replaces a pod.
func (c *Compiler) UpsertPod(p Pod) (*MapState, Diff, error) {
	p.Namespace = namespaceOf(p.Namespace)
	w := newWork()
	if old := c.pods[podKey{p.Namespace, p.Name}]; old != nil {
		c.detachPod(old, w)
	}
	if p.Endpoint != 0 {
		if k, taken := c.endpoints[p.Endpoint]; taken {
			// The agent hands out endpoint IDs; a clash is its bug, and the
			// older owner loses the endpoint rather than both sharing it.
			c.log.Warn("endpoint ID reassigned", "endpoint", p.Endpoint, "from", k.String(), "to", p.Namespace+"/"+p.Name)
			delete(c.endpoints, p.Endpoint)
		}
	}
	if err := c.attachPod(p, w); err != nil {
		return c.ms, Diff{}, err
	}
	d := c.finish(w, false)
	return c.ms, d, nil
}

// DeletePod removes a pod.
func (c *Compiler) DeletePod(namespace, name string) (*MapState, Diff) {
	w := newWork()
	if old := c.pods[podKey{namespaceOf(namespace), name}]; old != nil {
		c.detachPod(old, w)
	}
	return c.ms, c.finish(w, false)
}

// UpsertNamespace adds or relabels a namespace: every pod in it gets its
// identity recomputed.
func (c *Compiler) UpsertNamespace(n Namespace) (*MapState, Diff, error) {
	c.namespaces[n.Name] = namespaceLabels(n)
	return c.reidentify(func(ps *podState) bool { return ps.key.ns == n.Name })
}

// DeleteNamespace forgets a namespace's labels (its pods, if any remain,
// keep only the name label).
func (c *Compiler) DeleteNamespace(name string) (*MapState, Diff, error) {
	delete(c.namespaces, name)
	return c.reidentify(func(ps *podState) bool { return ps.key.ns == name })
}

// reidentify re-attaches the pods for which match is true and whose identity
// key changed.
func (c *Compiler) reidentify(match func(*podState) bool) (*MapState, Diff, error) {
	w := newWork()
	if err := c.reidentifyInto(match, w); err != nil {
		return c.ms, Diff{}, err
	}
	return c.ms, c.finish(w, false), nil
}

func (c *Compiler) reidentifyInto(match func(*podState) bool, w *work) error {
	var moved []Pod
	for _, ps := range c.pods {
		if !match(ps) {
			continue
		}
		_, keys := c.identKeys(&ps.pod)
		for i, ak := range keys {
			if ak.key != ps.addrIdents[i].key {
				moved = append(moved, ps.pod)
				break
			}
		}
	}
	slices.SortFunc(moved, func(a, b Pod) int {
		return compareKeys(policyKey{"", a.Namespace, a.Name}, policyKey{"", b.Namespace, b.Name})
	})
	for _, p := range moved {
		c.detachPod(c.pods[podKey{p.Namespace, p.Name}], w)
	}
	for _, p := range moved {
		if err := c.attachPod(p, w); err != nil {
			return err
		}
	}
	return nil
}

// UpsertNetworkPolicy adds or replaces a NetworkPolicy. An invalid policy is
// rejected whole and the previous version stays in force.
func (c *Compiler) UpsertNetworkPolicy(np *networkingv1.NetworkPolicy) (*MapState, Diff, error) {
	p, err := compileNetworkPolicy(np)
	if err != nil {
		return c.ms, Diff{}, err
	}
	return c.upsertPolicy(p)
}

// UpsertBulkheadPolicy adds or replaces a BulkheadPolicy, like
// UpsertNetworkPolicy.
func (c *Compiler) UpsertBulkheadPolicy(bp *v1alpha1.BulkheadPolicy) (*MapState, Diff, error) {
	p, err := compileBulkheadPolicy(bp)
	if err != nil {
		return c.ms, Diff{}, err
	}
	return c.upsertPolicy(p)
}

// DeletePolicy removes a policy of the given kind (KindNetworkPolicy or
// KindBulkheadPolicy).
func (c *Compiler) DeletePolicy(kind, namespace, name string) (*MapState, Diff, error) {
	k := policyKey{kind, namespaceOf(namespace), name}
	old := c.policies[k]
	if old == nil {
		return c.ms, Diff{}, nil
	}
	w := newWork()
	for ep := range c.policyEPs[k] {
		w.dirty[ep] = struct{}{}
	}
	w.rules = true
	c.removePolicy(old, nil)
	delete(c.kept, k)
	if err := c.changeCIDRs(old.cidrs, nil, w); err != nil {
		return c.ms, Diff{}, err
	}
	return c.ms, c.finish(w, false), nil
}

func (c *Compiler) upsertPolicy(p *cpolicy) (*MapState, Diff, error) {
	old := c.policies[p.key]
	_, oldWithheld := c.withheld[p.key]
	prev := c.ms
	ms, d, err := c.replacePolicy(p)
	if err != nil {
		return ms, d, err
	}
	h, over := c.withheld[p.key]
	if !over {
		delete(c.kept, p.key)
		return ms, d, nil
	}
	if old == nil || oldWithheld {
		return ms, d, fmt.Errorf("%s: %w: %s; its rules are withheld, its pods stay isolated", p.key, ErrOverBudget, h.describe())
	}
	// Fail closed to the last accepted version: it was in force and fit.
	ms, d2, err := c.replacePolicy(old)
	if err != nil {
		return ms, d, err
	}
	c.kept[p.key] = h
	d = composeDiff(prev, ms, d, d2)
	// One update, one revision step (none when nothing changed in the end).
	ms.Revision = prev.Revision
	if !d.Empty() || ms.Revision == 0 {
		ms.Revision++
	}
	return ms, d, fmt.Errorf("%s: %w: new version %s; the previous version stays in force", p.key, ErrOverBudget, h.describe())
}

// replacePolicy puts p in force in place of the policy of its key.
func (c *Compiler) replacePolicy(p *cpolicy) (*MapState, Diff, error) {
	w := newWork()
	w.rules = true
	var oldCIDRs []netip.Prefix
	if old := c.policies[p.key]; old != nil {
		for ep := range c.policyEPs[p.key] {
			w.dirty[ep] = struct{}{}
		}
		oldCIDRs = old.cidrs
		c.removePolicy(old, p)
	}
	c.addPolicy(p)
	if err := c.changeCIDRs(oldCIDRs, p.cidrs, w); err != nil {
		return c.ms, Diff{}, err
	}
	for _, ps := range c.podsByNS[p.key.Namespace] {
		if ps.pod.Endpoint != 0 && c.selects(p, ps) {
			w.dirty[ps.pod.Endpoint] = struct{}{}
		}
	}
	return c.ms, c.finish(w, false), nil
}

// changeCIDRs moves the references of one policy's prefixes; prefixes that
// appear or disappear get or lose their CIDR identity, and pods inside them
// may change region and so identity.
func (c *Compiler) changeCIDRs(old, new []netip.Prefix, w *work) error {
	var changed []netip.Prefix
	for _, p := range new {
		ci := c.cidrs[p]
		if ci == nil {
			id, err := c.cidrAlloc.Acquire(p.String())
			if err != nil {
				return err
			}
			ci = &cidrIdent{id: id}
			c.cidrs[p] = ci
			changed = append(changed, p)
			if _, pod := c.ipcache[p]; !pod {
				c.ipcache[p] = id
				w.ip[p] = struct{}{}
			}
		}
		ci.refs++
	}
	for _, p := range old {
		ci := c.cidrs[p]
		if ci == nil {
			continue
		}
		if ci.refs--; ci.refs <= 0 {
			delete(c.cidrs, p)
			c.cidrAlloc.Release(p.String())
			changed = append(changed, p)
			if c.ipcache[p] == ci.id {
				delete(c.ipcache, p)
				w.ip[p] = struct{}{}
			}
		}
	}
	if len(changed) == 0 {
		return nil
	}
	w.cidrs = append(w.cidrs, changed...)
	return c.reidentifyInto(func(ps *podState) bool {
		for _, a := range ps.pod.IPs {
			for _, p := range changed {
				if p.Contains(a.Unmap()) {
					return true
				}
			}
		}
		return false
	}, w)
}

// finish recomputes the dirty endpoints and publishes a new MapState.
func (c *Compiler) finish(w *work, full bool) Diff {
	if !full {
		c.propagate(w)
	}
	c.settleBudget(w)
	prev := c.ms
	next := &MapState{
		Revision:         prev.Revision,
		AllowHostIngress: !c.denyHost,
		// Published maps are never written again, so an unchanged one is
		// shared with the previous MapState instead of copied.
		IPCache:   prev.IPCache,
		Endpoints: make(map[EndpointID]*EndpointPolicy, len(c.endpoints)),
		Rules:     prev.Rules,
		Enrolled:  prev.Enrolled,
	}
	if full || len(w.ip) > 0 {
		next.IPCache = maps.Clone(c.ipcache)
		for p := range c.hostIPs {
			next.IPCache[p] = identity.IDHost
		}
	}
	if full || w.rules {
		next.Rules = c.ruleInfos()
	}
	if !full {
		maps.Copy(next.Endpoints, prev.Endpoints)
	}
	var d Diff
	// epIdents: a local endpoint came, went, or changed identity or
	// enrollment, which MapState.Enrolled follows.
	epIdents := false
	for _, ep := range slices.Sorted(maps.Keys(w.dirty)) {
		for _, k := range c.epPolicies[ep] {
			delete(c.policyEPs[k], ep)
			if len(c.policyEPs[k]) == 0 {
				delete(c.policyEPs, k)
			}
		}
		delete(c.epPolicies, ep)
		k, ok := c.endpoints[ep]
		if !ok {
			delete(next.Endpoints, ep)
			if _, was := prev.Endpoints[ep]; was {
				d.RemovedEndpoints = append(d.RemovedEndpoints, ep)
				epIdents = true
			}
			continue
		}
		pre, ok := c.precompiled[ep]
		if !ok {
			pre.pol, pre.keys = c.compileEndpoint(c.pods[k])
		}
		pol, keys := pre.pol, pre.keys
		c.epPolicies[ep] = keys
		for _, pk := range keys {
			if c.policyEPs[pk] == nil {
				c.policyEPs[pk] = map[EndpointID]struct{}{}
			}
			c.policyEPs[pk][ep] = struct{}{}
		}
		if old := prev.Endpoints[ep]; old != nil && equalEndpoint(old, pol) {
			next.Endpoints[ep] = old
			continue
		}
		if old := prev.Endpoints[ep]; old == nil || old.Identity != pol.Identity || old.Enrolled != pol.Enrolled {
			epIdents = true
		}
		next.Endpoints[ep] = pol
		d.Endpoints = append(d.Endpoints, ep)
	}
	// Enrollment follows the labels of identities, so only a change of
	// the identities, of the ipcache or of the local endpoints' identities
	// moves it; a policy change alone does not.
	if full || len(w.ip) > 0 || len(w.idents) > 0 || epIdents || next.Enrolled == nil {
		next.Enrolled = c.enrolled(next)
	}
	ipKeys := slices.Collect(maps.Keys(w.ip))
	if full {
		ipKeys = slices.Collect(maps.Keys(next.IPCache))
		for p := range prev.IPCache {
			ipKeys = append(ipKeys, p)
		}
	}
	slices.SortFunc(ipKeys, comparePrefix)
	diffIPCacheAndRules(&d, prev, next, slices.Compact(ipKeys))
	diffEnrolled(&d, prev, next)
	// The first result is revision 1; later ones move only when something
	// changed, so the datapath never re-checks conntrack for nothing.
	if !d.Empty() || next.Revision == 0 {
		next.Revision++
	}
	c.ms = next
	c.precompiled, c.entryCache = nil, nil
	return d
}

// propagate marks the endpoints whose peers may have changed: those selected
// by a policy with a peer that matches a changed identity or prefix.
func (c *Compiler) propagate(w *work) {
	if len(w.idents) == 0 && len(w.cidrs) == 0 {
		return
	}
	for pk, p := range c.policies {
		if !c.affected(p, w) {
			continue
		}
		delete(c.peerCache, pk)
		for ep := range c.policyEPs[pk] {
			w.dirty[ep] = struct{}{}
		}
	}
}

func (c *Compiler) affected(p *cpolicy, w *work) bool {
	for ri := range p.rules {
		r := &p.rules[ri]
		if r.allPeers {
			// Wildcard peers resolve to identities only through egress
			// named ports.
			if r.dir == Egress && len(w.idents) > 0 && slices.ContainsFunc(r.ports, func(pt cport) bool { return pt.name != "" }) {
				return true
			}
			continue
		}
		for pj := range r.peers {
			pr := &r.peers[pj]
			for _, i := range w.idents {
				if pr.matchesIdent(i) {
					return true
				}
			}
			if pr.kind == peerCIDR {
				for _, x := range w.cidrs {
					if pr.matchesPrefix(x) {
						return true
					}
				}
			}
		}
	}
	return false
}

func equalEndpoint(a, b *EndpointPolicy) bool {
	return a.Identity == b.Identity && a.Default == b.Default && a.Audit == b.Audit && a.Enrolled == b.Enrolled &&
		slices.Equal(a.Entries, b.Entries)
}

// ruleInfos is the rule table of the current policies.
func (c *Compiler) ruleInfos() map[RuleID]RuleInfo {
	out := make(map[RuleID]RuleInfo, len(c.ruleIDs))
	for _, p := range c.policies {
		for _, r := range p.rules {
			id := c.ruleIDs[ruleKey{p.key, r.dir, r.index}]
			out[id] = RuleInfo{Kind: p.key.Kind, Namespace: p.key.Namespace, Name: p.key.Name,
				Direction: r.dir, Index: r.index, Action: r.action, Audit: r.audit, MTLS: r.mtls}
		}
	}
	return out
}

// SetHostIPs replaces the node's own addresses, which the ipcache maps to
// identity.IDHost so that traffic from the node (kubelet probes) is host
// traffic and not world.
func (c *Compiler) SetHostIPs(ips []netip.Addr) (*MapState, Diff) {
	w := newWork()
	next := hostPrefixes(ips)
	for p := range c.hostIPs {
		if _, ok := next[p]; !ok {
			w.ip[p] = struct{}{}
		}
	}
	for p := range next {
		if _, ok := c.hostIPs[p]; !ok {
			w.ip[p] = struct{}{}
		}
	}
	c.hostIPs = next
	if len(w.ip) == 0 {
		return c.ms, Diff{}
	}
	return c.ms, c.finish(w, false)
}

func hostPrefixes(ips []netip.Addr) map[netip.Prefix]struct{} {
	out := make(map[netip.Prefix]struct{}, len(ips))
	for _, a := range ips {
		if a.IsValid() {
			out[identity.Host(a.Unmap())] = struct{}{}
		}
	}
	return out
}

// composeDiff is the difference from prev to next of two updates in a row,
// whose diffs are d1 and d2.
func composeDiff(prev, next *MapState, d1, d2 Diff) Diff {
	var d Diff
	eps := map[EndpointID]struct{}{}
	for _, l := range [][]EndpointID{d1.Endpoints, d1.RemovedEndpoints, d2.Endpoints, d2.RemovedEndpoints} {
		for _, ep := range l {
			eps[ep] = struct{}{}
		}
	}
	for _, ep := range slices.Sorted(maps.Keys(eps)) {
		o, n := prev.Endpoints[ep], next.Endpoints[ep]
		switch {
		case n != nil && (o == nil || !equalEndpoint(o, n)):
			d.Endpoints = append(d.Endpoints, ep)
		case n == nil && o != nil:
			d.RemovedEndpoints = append(d.RemovedEndpoints, ep)
		}
	}
	ips := map[netip.Prefix]struct{}{}
	for _, dd := range []Diff{d1, d2} {
		for p := range dd.IPCacheUpserts {
			ips[p] = struct{}{}
		}
		for _, p := range dd.IPCacheDeletes {
			ips[p] = struct{}{}
		}
	}
	diffIPCacheAndRules(&d, prev, next, slices.SortedFunc(maps.Keys(ips), comparePrefix))
	diffEnrolled(&d, prev, next)
	return d
}

// enrolled computes MapState.Enrolled for next: the enrolled workload
// identities that next's ipcache maps an address to, or that are a local
// endpoint's own.
func (c *Compiler) enrolled(next *MapState) map[identity.NumericID]bool {
	out := map[identity.NumericID]bool{}
	for _, id := range next.IPCache {
		if out[id] || id.IsReserved() {
			continue
		}
		if i := c.identsByID[id]; i != nil && i.labels.Enrolled() {
			out[id] = true
		}
	}
	for _, ep := range next.Endpoints {
		if ep.Enrolled {
			out[ep.Identity] = true
		}
	}
	return out
}

// diffEnrolled adds to d how next.Enrolled differs from prev.Enrolled.
func diffEnrolled(d *Diff, prev, next *MapState) {
	for id := range next.Enrolled {
		if !prev.Enrolled[id] {
			d.EnrolledAdded = append(d.EnrolledAdded, id)
		}
	}
	for id := range prev.Enrolled {
		if !next.Enrolled[id] {
			d.EnrolledRemoved = append(d.EnrolledRemoved, id)
		}
	}
	slices.Sort(d.EnrolledAdded)
	slices.Sort(d.EnrolledRemoved)
}

// diffIPCacheAndRules adds to d how next differs from prev in the ipcache
// entries ips (sorted, each once) and in the rules.
func diffIPCacheAndRules(d *Diff, prev, next *MapState, ips []netip.Prefix) {
	for _, p := range ips {
		nid, now := next.IPCache[p]
		oid, was := prev.IPCache[p]
		switch {
		case now && (!was || oid != nid):
			if d.IPCacheUpserts == nil {
				d.IPCacheUpserts = map[netip.Prefix]identity.NumericID{}
			}
			d.IPCacheUpserts[p] = nid
		case !now && was:
			d.IPCacheDeletes = append(d.IPCacheDeletes, p)
		}
	}
	for id, ri := range next.Rules {
		if o, ok := prev.Rules[id]; !ok || o != ri {
			d.RulesUpserted = append(d.RulesUpserted, id)
		}
	}
	for id := range prev.Rules {
		if _, ok := next.Rules[id]; !ok {
			d.RulesRemoved = append(d.RulesRemoved, id)
		}
	}
	slices.Sort(d.RulesUpserted)
	slices.Sort(d.RulesRemoved)
}
