package policy

import (
	"net/netip"

	"github.com/bulkhead-io/bulkhead/identity"
	"k8s.io/apimachinery/pkg/labels"
)

// Kinds of policy objects, as they appear in RuleInfo.Kind.
const (
	KindNetworkPolicy  = "NetworkPolicy"
	KindBulkheadPolicy = "BulkheadPolicy"
)

// policyKey names one policy object.
type policyKey struct {
	Kind, Namespace, Name string
}

func (k policyKey) String() string { return k.Kind + " " + k.Namespace + "/" + k.Name }

// cpolicy is a validated policy in the compiler's normal form: both APIs
// reduce to it, so the rest of the compiler knows one shape.
type cpolicy struct {
	key policyKey
	// subject selects pods in key.Namespace: by labels, or by SPIFFE ID.
	subjectSel    labels.Selector
	subjectSPIFFE *identity.SPIFFEPattern
	// enforce/audit[dir]: the policy selects its pods in dir, enforcing or
	// audit-only (this decides EndpointPolicy.Default).
	enforce [2]bool
	audit   [2]bool
	rules   []crule
	cidrs   []netip.Prefix
}

// crule is one ingress or egress rule.
type crule struct {
	dir    Direction
	index  int
	action Action
	audit  bool
	mtls   bool
	// allPeers: no peer list, so any peer (the wildcard).
	allPeers bool
	peers    []cpeer
	// ports empty: every protocol and port.
	ports []cport
}

type peerKind uint8

const (
	peerSelector peerKind = iota
	peerSPIFFE
	peerCIDR
)

type cpeer struct {
	kind peerKind
	// peerSelector: nsSel nil means the namespace nsName.
	nsName string
	nsSel  labels.Selector
	podSel labels.Selector
	// peerSPIFFE
	spiffe identity.SPIFFEPattern
	// peerCIDR
	cidr   netip.Prefix
	except []netip.Prefix
}

// cport is one port clause: proto with [lo, hi], or a named port.
type cport struct {
	proto  uint8
	lo, hi uint16
	name   string
}

// matchesPrefix reports whether an ipcache key lies inside the ipBlock. Every
// cidr and except is itself an ipcache key, so a key is either wholly inside
// or wholly outside each of them; the key's own region (the key minus its
// more specific keys) then matches as a whole.
func (p *cpeer) matchesPrefix(k netip.Prefix) bool {
	if !identity.Contains(p.cidr, k) {
		return false
	}
	for _, e := range p.except {
		if identity.Contains(e, k) {
			return false
		}
	}
	return true
}
