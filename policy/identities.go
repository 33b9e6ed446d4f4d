package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/labels"
)

type podKey struct{ ns, name string }

func (k podKey) String() string { return k.ns + "/" + k.name }

type podState struct {
	key podKey
	pod Pod
	// ident is the identity of the pod's first address (of the pod when it
	// has none): the endpoint's own identity. Labels, SPIFFE ID and ports are
	// the same in all of a pod's identities, so policy selection uses it.
	ident *ident
	// idents are the pod's distinct identities, addrIdents the identity of
	// each of pod.IPs.
	idents     []*ident
	addrIdents []*ident
}

// ident is one workload identity and the pods (addresses) that have it.
//
// Its key is the label set plus the "region" of the address: the most
// specific ipBlock prefix (cidr or except of any policy) that contains it.
// The datapath resolves one identity per IP, so two addresses with equal
// labels that an ipBlock treats differently (one inside 10.0.0.0/8, one
// outside) must not share an identity, or a rule for one would open the
// other. That holds for the two addresses of one dual-stack pod too: an
// ipBlock that covers its IPv4 address only must not admit its IPv6 one,
// so such a pod has one identity per region. Addresses outside every
// ipBlock (the usual case) have no region, and then equal label sets do
// share one ID, and a pod has one identity.
//
// For the same reason the key includes the pod's named container ports: an
// egress rule to port "dns" resolves per destination pod, and the datapath
// only sees the destination's identity. Pods of one workload have the same
// ports, so in practice this splits nothing.
type ident struct {
	id     identity.NumericID
	key    string
	labels identity.Labels
	nsSet  labels.Set
	podSet labels.Set
	spiffe spiffeid.ID
	// regions holds the region of the identity's addresses, if they have one
	// (at most one prefix).
	regions []netip.Prefix
	pods    map[podKey]*podState
	// ports is the union of the named container ports of the pods, by name.
	ports map[string][]NamedPort
}

// IdentityInfo describes one allocated identity, for explain and flow logs.
type IdentityInfo struct {
	ID       identity.NumericID
	Labels   identity.Labels
	SPIFFEID string
	// Prefix is set for CIDR identities.
	Prefix netip.Prefix
}

func (c *Compiler) nsLabels(ns string) map[string]string {
	if l, ok := c.namespaces[ns]; ok {
		return l
	}
	return map[string]string{NamespaceNameLabel: ns}
}

// addrKey is the identity key of one address of a pod.
type addrKey struct {
	key     string
	regions []netip.Prefix
}

// identKeys computes the identity keys of a pod's addresses under the
// current CIDR set, one per address in the order of p.IPs (one for the pod
// when it has no address).
func (c *Compiler) identKeys(p *Pod) (identity.Labels, []addrKey) {
	l := identity.Labels{
		Namespace:       p.Namespace,
		NamespaceLabels: c.nsLabels(p.Namespace),
		PodLabels:       p.Labels,
		ServiceAccount:  p.ServiceAccount,
		Issued:          p.SPIFFEID,
	}
	base := l.Key()
	var ports strings.Builder
	if len(p.Ports) > 0 {
		ps := slices.Clone(p.Ports)
		slices.SortFunc(ps, compareNamedPort)
		for _, np := range slices.Compact(ps) {
			fmt.Fprintf(&ports, "|%d:%s=%d/%d", len(np.Name), np.Name, np.Port, np.Proto)
		}
	}
	key := func(regions []netip.Prefix) addrKey {
		if len(regions) == 0 && ports.Len() == 0 {
			return addrKey{key: base}
		}
		var b strings.Builder
		b.WriteString(base)
		for _, r := range regions {
			b.WriteString("|")
			b.WriteString(r.String())
		}
		b.WriteString(ports.String())
		return addrKey{key: b.String(), regions: regions}
	}
	if len(p.IPs) == 0 {
		return l, []addrKey{key(nil)}
	}
	out := make([]addrKey, len(p.IPs))
	for i, a := range p.IPs {
		var regions []netip.Prefix
		if r, ok := c.region(a); ok {
			regions = []netip.Prefix{r}
		}
		out[i] = key(regions)
	}
	return l, out
}

// region is the most specific ipBlock prefix containing a.
func (c *Compiler) region(a netip.Addr) (netip.Prefix, bool) {
	if len(c.cidrs) == 0 {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	for bits := a.BitLen(); bits >= 0; bits-- {
		p, _ := a.Prefix(bits)
		if _, ok := c.cidrs[p]; ok {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

func compareNamedPort(a, b NamedPort) int {
	if a.Name != b.Name {
		return strings.Compare(a.Name, b.Name)
	}
	if a.Proto != b.Proto {
		return int(a.Proto) - int(b.Proto)
	}
	return int(a.Port) - int(b.Port)
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// newIdent builds (but does not register) an identity.
func (c *Compiler) newIdent(l identity.Labels, regions []netip.Prefix, key string) *ident {
	id := &ident{key: key, labels: l, regions: regions, pods: map[podKey]*podState{},
		nsSet: labels.Set(l.NamespaceLabels), podSet: labels.Set(l.PodLabels)}
	if sid, err := l.SPIFFEID(c.trustDomain); err == nil {
		id.spiffe = sid
	}
	return id
}

// recomputePorts recomputes the union of the named ports of the pods and
// reports whether it changed.
func (i *ident) recomputePorts() bool {
	ports := map[string][]NamedPort{}
	for _, ps := range i.pods {
		for _, np := range ps.pod.Ports {
			if np.Name != "" && !slices.Contains(ports[np.Name], np) {
				ports[np.Name] = append(ports[np.Name], np)
			}
		}
	}
	for _, v := range ports {
		slices.SortFunc(v, func(a, b NamedPort) int { return int(a.Port) - int(b.Port) + 65536*(int(a.Proto)-int(b.Proto)) })
	}
	changed := !maps.EqualFunc(ports, i.ports, slices.Equal)
	i.ports = ports
	return changed
}

// Identities lists every allocated identity, ordered by ID.
func (c *Compiler) Identities() []IdentityInfo {
	out := []IdentityInfo{{ID: identity.IDHost}, {ID: identity.IDWorld}}
	for _, i := range c.identsByID {
		out = append(out, IdentityInfo{ID: i.id, Labels: i.labels, SPIFFEID: i.spiffe.String()})
	}
	for p, ci := range c.cidrs {
		out = append(out, IdentityInfo{ID: ci.id, Prefix: p})
	}
	slices.SortFunc(out, func(a, b IdentityInfo) int { return int(a.ID) - int(b.ID) })
	return out
}

func labelsSet(m map[string]string) labels.Set { return labels.Set(m) }

// CheckIssuedID refuses an issued SPIFFE ID in the ns/<ns>/... tree of
// another namespace than the pod's: a pod must not take on the identity
// that policies give another namespace's workloads.
func CheckIssuedID(id spiffeid.ID, namespace string) error {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) >= 2 && segs[0] == "ns" && segs[1] != namespace {
		return fmt.Errorf("spiffe id %q names namespace %q, but the pod is in %q", id, segs[1], namespace)
	}
	return nil
}

// checkIssued validates a pod's issued SPIFFE ID: a SPIFFE ID of the
// compiler's trust domain that names no other namespace.
func (c *Compiler) checkIssued(p Pod) error {
	id, err := spiffeid.FromString(p.SPIFFEID)
	if err != nil {
		return fmt.Errorf("spiffe id %q: %w", p.SPIFFEID, err)
	}
	if td := c.trustDomainOrDefault(); id.TrustDomain().Name() != td {
		return fmt.Errorf("spiffe id %q is outside the trust domain %q", id, td)
	}
	return CheckIssuedID(id, p.Namespace)
}

func (c *Compiler) trustDomainOrDefault() string {
	if c.trustDomain == "" {
		return identity.DefaultTrustDomain
	}
	return c.trustDomain
}
