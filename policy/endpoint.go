package policy

import (
	"slices"
	"strconv"

	"github.com/bulkhead-io/bulkhead/identity"
)

// selects reports whether policy p applies to pod ps.
func (c *Compiler) selects(p *cpolicy, ps *podState) bool {
	if ps.key.ns != p.key.Namespace {
		return false
	}
	if p.subjectSPIFFE != nil {
		return p.subjectSPIFFE.Match(ps.ident.spiffe)
	}
	return p.subjectSel.Matches(ps.ident.podSet)
}

// matchesIdent reports whether a peer covers a workload identity.
func (pr *cpeer) matchesIdent(i *ident) bool {
	switch pr.kind {
	case peerSelector:
		if pr.nsSel == nil {
			if i.labels.Namespace != pr.nsName {
				return false
			}
		} else if !pr.nsSel.Matches(i.nsSet) {
			return false
		}
		return pr.podSel.Matches(i.podSet)
	case peerSPIFFE:
		return pr.spiffe.Match(i.spiffe)
	case peerCIDR:
		// A pod IP inside an ipBlock is matched by it, as Kubernetes does;
		// the region tells which ipBlock prefixes the pods' IPs fall in.
		for _, r := range i.regions {
			if pr.matchesPrefix(r) {
				return true
			}
		}
	}
	return false
}

// resolvePeer returns the identities a peer covers, sorted.
func (c *Compiler) resolvePeer(pk policyKey, ref peerRef, pr *cpeer) []identity.NumericID {
	cache := c.peerCache[pk]
	if cache == nil {
		cache = map[peerRef][]identity.NumericID{}
		c.peerCache[pk] = cache
	}
	if ids, ok := cache[ref]; ok {
		return ids
	}
	var ids []identity.NumericID
	switch {
	case pr.kind == peerSelector && pr.nsSel == nil:
		for i := range c.identsByNS[pr.nsName] {
			if pr.matchesIdent(i) {
				ids = append(ids, i.id)
			}
		}
	case pr.kind == peerSelector:
		for ns, set := range c.identsByNS {
			if len(set) == 0 || !pr.nsSel.Matches(labelsSet(c.nsLabels(ns))) {
				continue
			}
			for i := range set {
				if pr.podSel.Matches(i.podSet) {
					ids = append(ids, i.id)
				}
			}
		}
	case pr.kind == peerSPIFFE:
		for _, i := range c.identsByID {
			if pr.matchesIdent(i) {
				ids = append(ids, i.id)
			}
		}
	case pr.kind == peerCIDR:
		for p, ci := range c.cidrs {
			// A CIDR identity that a pod IP shadows in the ipcache never
			// resolves; it does no harm either.
			if pr.matchesPrefix(p) {
				ids = append(ids, ci.id)
			}
		}
		for i := range c.withRegion {
			if pr.matchesIdent(i) {
				ids = append(ids, i.id)
			}
		}
	}
	slices.Sort(ids)
	cache[ref] = ids
	return ids
}

// named returns the identities with a named port of the given protocol.
func (c *Compiler) named(name string, proto uint8) []identPort {
	if c.namedIdx == nil {
		c.namedIdx = map[string][]identPort{}
		for _, i := range c.identsByID {
			for n, ps := range i.ports {
				for _, p := range ps {
					k := n + "/" + strconv.Itoa(int(p.Proto))
					c.namedIdx[k] = append(c.namedIdx[k], identPort{i.id, p.Port})
				}
			}
		}
	}
	return c.namedIdx[name+"/"+strconv.Itoa(int(proto))]
}

// compileEndpoint computes the policy of one local pod, and the policies
// that select it. Policies whose rules are withheld (over their trie
// budget, see Budget) still isolate: see withheldDirs.
func (c *Compiler) compileEndpoint(ps *podState) (*EndpointPolicy, []policyKey) {
	ep := &EndpointPolicy{Identity: ps.ident.id, Enrolled: ps.ident.labels.Enrolled()}
	sel, enforce, audit := c.selecting(ps)
	keys := make([]policyKey, len(sel))
	var closed [2]bool
	for d := range 2 {
		switch {
		case enforce[d]:
			ep.Default[d] = DefaultDeny
		case audit[d]:
			ep.Default[d] = DefaultAudit
		}
	}
	var es []Entry
	for pi, p := range sel {
		keys[pi] = p.key
		if _, ok := c.withheld[p.key]; ok {
			for d, shut := range withheldDirs(p) {
				closed[d] = closed[d] || shut
			}
			continue
		}
		if cached, ok := c.entryCache[ps.pod.Endpoint][p.key]; ok {
			es = append(es, cached...)
			continue
		}
		es = c.policyEntries(es, p, ps, enforce)
	}
	// A withheld policy with an enforcing Deny rule in a direction shuts
	// that direction whole: without its deny entries, another policy's
	// allow could pass what it denies, so nothing passes instead.
	for d := range 2 {
		if closed[d] {
			ep.Default[d] = DefaultDeny
			es = slices.DeleteFunc(es, func(e Entry) bool { return e.Direction == Direction(d) })
		}
	}
	ep.Entries = SortEntries(es)
	return ep, keys
}

// withheldDirs reports the directions in which a policy has an enforcing
// Deny rule.
func withheldDirs(p *cpolicy) [2]bool {
	var out [2]bool
	for _, r := range p.rules {
		if r.action == ActionDeny && !r.audit {
			out[r.dir] = true
		}
	}
	return out
}

// selecting returns the policies that select a pod, in key order, and the
// directions they enforce or audit.
func (c *Compiler) selecting(ps *podState) (sel []*cpolicy, enforce, audit [2]bool) {
	for _, p := range c.policiesByNS[ps.key.ns] {
		if !c.selects(p, ps) {
			continue
		}
		sel = append(sel, p)
		for d := range 2 {
			enforce[d] = enforce[d] || p.enforce[d]
			audit[d] = audit[d] || p.audit[d]
		}
	}
	slices.SortFunc(sel, func(a, b *cpolicy) int { return compareKeys(a.key, b.key) })
	return sel, enforce, audit
}

// policyEntries appends the entries of one policy's rules for a pod.
// enforce is what all the policies selecting the pod enforce.
func (c *Compiler) policyEntries(es []Entry, p *cpolicy, ps *podState, enforce [2]bool) []Entry {
	for ri := range p.rules {
		r := &p.rules[ri]
		// An audit-mode Allow must not open what an enforcing policy
		// closes: it only says what would pass once enforced.
		if r.action == ActionAllow && r.audit && enforce[r.dir] {
			continue
		}
		tmpl := Entry{Direction: r.dir, Action: r.action, Rule: c.ruleIDs[ruleKey{p.key, r.dir, r.index}]}
		if r.audit && r.action == ActionDeny {
			// Known gap of Lookup's order (reported): an audit Deny with a
			// more specific peer/protocol/port outranks an enforcing Deny
			// and turns its drop into AUDIT.
			tmpl.Flags |= FlagAudit
		}
		if r.mtls {
			tmpl.Flags |= FlagMTLSRequired
		}
		var peers []identity.NumericID
		if r.allPeers {
			peers = []identity.NumericID{identity.IDNone}
		} else {
			for pj := range r.peers {
				peers = append(peers, c.resolvePeer(p.key, peerRef{ri, pj}, &r.peers[pj])...)
			}
			if len(r.peers) > 1 {
				slices.Sort(peers)
				peers = slices.Compact(peers)
			}
		}
		es = c.emit(es, tmpl, r, peers, ps)
	}
	return es
}

// emit appends the entries of one rule for the given peers.
func (c *Compiler) emit(es []Entry, tmpl Entry, r *crule, peers []identity.NumericID, ps *podState) []Entry {
	if len(r.ports) == 0 {
		for _, peer := range peers {
			e := tmpl
			e.Peer, e.PortLo, e.PortHi = peer, 0, 65535
			es = append(es, e)
		}
		return es
	}
	for _, pt := range r.ports {
		if pt.name == "" {
			for _, peer := range peers {
				e := tmpl
				e.Peer, e.Proto, e.PortLo, e.PortHi = peer, pt.proto, pt.lo, pt.hi
				es = append(es, e)
			}
			continue
		}
		// Named ports resolve against the destination pod: on ingress that
		// is this endpoint; on egress it is the peer, per identity.
		if r.dir == Ingress {
			for _, np := range ps.pod.Ports {
				if np.Name == pt.name && np.Proto == pt.proto {
					for _, peer := range peers {
						e := tmpl
						e.Peer, e.Proto, e.PortLo, e.PortHi = peer, pt.proto, np.Port, np.Port
						es = append(es, e)
					}
				}
			}
			continue
		}
		cands := c.named(pt.name, pt.proto)
		wildcard := len(peers) == 1 && peers[0] == identity.IDNone
		for _, ip := range cands {
			if !wildcard {
				if _, ok := slices.BinarySearch(peers, ip.id); !ok {
					continue
				}
			}
			e := tmpl
			e.Peer, e.Proto, e.PortLo, e.PortHi = ip.id, pt.proto, ip.port, ip.port
			es = append(es, e)
		}
	}
	return es
}
