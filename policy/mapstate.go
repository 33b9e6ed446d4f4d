package policy

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
)

// MapState is what the datapath enforces: the compiler's output and the
// datapath's input. It is plain data with value semantics; the datapath turns
// it into map entries and applies only the difference against what is live.
//
// Its meaning is defined by Lookup, which is the one reference model of the
// lookup semantics: the BPF program must agree with it on every packet, and
// the explain engine answers from it.
type MapState struct {
	// Revision increases with every compile whose result differs. The datapath
	// writes it last, after all entries, and conntrack re-checks established
	// flows whose recorded revision is older.
	Revision uint64
	// AllowHostIngress lets traffic from this node (identity.IDHost) into every
	// endpoint before policy is consulted, as Kubernetes expects for kubelet
	// probes.
	AllowHostIngress bool
	// IPCache maps addresses and prefixes to identities. Anything it does not
	// cover is identity.IDWorld. Keys are masked (netip.Prefix.Masked).
	IPCache map[netip.Prefix]identity.NumericID
	// Endpoints holds the policy of every endpoint local to this node.
	Endpoints map[EndpointID]*EndpointPolicy
	// Rules maps every RuleID used in an Entry back to where it came from.
	Rules map[RuleID]RuleInfo
	// Enrolled holds every workload identity (local or remote) whose pods
	// are enrolled in mTLS.
	Enrolled map[identity.NumericID]bool
}

// EndpointID is the node-local number of an endpoint (a pod's interface),
// assigned by the agent. Zero is not a valid endpoint.
type EndpointID uint32

// Direction is the direction of traffic as seen from the endpoint.
type Direction uint8

const (
	// Ingress is traffic towards the endpoint; the peer is the source.
	Ingress Direction = 0
	// Egress is traffic from the endpoint; the peer is the destination.
	Egress Direction = 1
)

func (d Direction) String() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}

// Action is what a policy entry does with a matching packet.
type Action uint8

const (
	ActionAllow Action = 1
	ActionDeny  Action = 2
)

func (a Action) String() string {
	switch a {
	case ActionAllow:
		return "allow"
	case ActionDeny:
		return "deny"
	}
	return "none"
}

// Flags modify an entry's action.
type Flags uint8

const (
	// FlagAudit turns a deny from this entry into an audit: the packet passes
	// and is reported with verdict AUDIT.
	FlagAudit Flags = 1 << 0
	// FlagMTLSRequired marks allowed traffic that must be mutually
	// authenticated (BulkheadPolicy `mtls: Required`).
	FlagMTLSRequired Flags = 1 << 1
)

// RuleID names the rule an entry came from. RuleDefault (0) is "no rule": the
// default of the direction decided.
type RuleID uint32

const RuleDefault RuleID = 0

// DefaultVerdict is what happens in a direction when no entry matches.
type DefaultVerdict uint8

const (
	// DefaultAllow: no policy selects the endpoint in this direction.
	DefaultAllow DefaultVerdict = 0
	// DefaultDeny: some enforcing policy selects the endpoint in this direction.
	DefaultDeny DefaultVerdict = 1
	// DefaultAudit: only audit-mode policies select the endpoint in this
	// direction, so what default-deny would drop passes as AUDIT.
	DefaultAudit DefaultVerdict = 2
)

// EndpointPolicy is the compiled policy of one local endpoint. Once it is in
// a MapState it is never modified: the compiler shares an unchanged one
// between revisions, and the datapath skips an endpoint whose policy is the
// pointer it applied last.
type EndpointPolicy struct {
	Identity identity.NumericID
	// Default is indexed by Direction.
	Default [2]DefaultVerdict
	// Audit puts the whole endpoint in audit mode: every drop becomes AUDIT.
	Audit bool
	// Entries is in canonical order (SortEntries) and holds no duplicates.
	Entries []Entry
	// Enrolled: this endpoint's pod is enrolled in mTLS.
	Enrolled bool
}

// Entry is one policy rule, flattened: it matches packets in Direction whose
// peer identity is Peer (IDNone: any), whose IP protocol is Proto (0: any) and
// whose destination port is in [PortLo, PortHi].
//
// Invariants (Validate): Proto 0 implies the full port range; protocols
// without ports (ICMP, ...) use the full port range.
type Entry struct {
	Direction Direction
	Peer      identity.NumericID
	Proto     uint8
	PortLo    uint16
	PortHi    uint16
	Action    Action
	Flags     Flags
	Rule      RuleID
}

// RuleInfo tells where a RuleID came from, for flow logs and explain.
type RuleInfo struct {
	// Kind is "NetworkPolicy" or "BulkheadPolicy" (later kinds add here).
	Kind      string
	Namespace string
	Name      string
	Direction Direction
	// Index is the rule's position in the policy's ingress or egress list.
	Index  int
	Action Action
	Audit  bool
}

// Verdict is the outcome of a lookup.
type Verdict uint8

const (
	VerdictAllow Verdict = 1
	VerdictDeny  Verdict = 2
	// VerdictAudit: policy would drop this, audit mode let it pass.
	VerdictAudit Verdict = 3
)

func (v Verdict) String() string {
	switch v {
	case VerdictAllow:
		return "allow"
	case VerdictDeny:
		return "deny"
	case VerdictAudit:
		return "audit"
	}
	return "unknown"
}

// Passes reports whether the packet is let through.
func (v Verdict) Passes() bool { return v == VerdictAllow || v == VerdictAudit }

// Decision is the result of Lookup.
type Decision struct {
	Verdict Verdict
	// Rule is the deciding entry's rule, or RuleDefault when the direction's
	// default decided (or host traffic was let in).
	Rule  RuleID
	Flags Flags
}

// Lookup is the reference model of the datapath's policy lookup for one
// packet of endpoint ep in direction dir, whose peer has identity peer.
//
// Among the entries that match (peer equal or wildcard, protocol equal or
// wildcard, port in range), the winner is the first by:
//  1. an enforcing deny beats an audit deny (FlagAudit), which beats any
//     allow: an audit-mode policy only reports, so it must never turn a
//     drop an enforcing policy asks for into AUDIT, however specific it is;
//  2. a specific peer beats the wildcard peer;
//  3. a specific protocol beats the wildcard protocol;
//  4. a narrower port range beats a wider one;
//  5. the lower RuleID.
//
// No match: the direction's default decides. A deny becomes AUDIT when the
// winning entry has FlagAudit, when the endpoint is in audit mode, or (for
// the default) when the default is DefaultAudit. An unknown endpoint is
// unmanaged: everything passes.
func (m *MapState) Lookup(ep EndpointID, dir Direction, peer identity.NumericID, proto uint8, port uint16) Decision {
	p := m.Endpoints[ep]
	if p == nil {
		return Decision{Verdict: VerdictAllow}
	}
	if dir == Ingress && peer == identity.IDHost && m.AllowHostIngress {
		return Decision{Verdict: VerdictAllow}
	}
	var best *Entry
	for i := range p.Entries {
		e := &p.Entries[i]
		if e.Direction != dir || (e.Peer != identity.IDNone && e.Peer != peer) ||
			(e.Proto != 0 && e.Proto != proto) || port < e.PortLo || port > e.PortHi {
			continue
		}
		if best == nil || e.Beats(best) {
			best = e
		}
	}
	if best == nil {
		switch p.Default[dir] {
		case DefaultAllow:
			return Decision{Verdict: VerdictAllow}
		case DefaultAudit:
			return Decision{Verdict: VerdictAudit}
		}
		if p.Audit {
			return Decision{Verdict: VerdictAudit}
		}
		return Decision{Verdict: VerdictDeny}
	}
	d := Decision{Verdict: VerdictAllow, Rule: best.Rule, Flags: best.Flags}
	if best.Action == ActionDeny {
		d.Verdict = VerdictDeny
		if best.Flags&FlagAudit != 0 || p.Audit {
			d.Verdict = VerdictAudit
		}
	}
	return d
}

// Beats reports whether a wins over b when both match a packet, by the
// order Lookup documents. The datapath resolves overlaps with it too.
func (a *Entry) Beats(b *Entry) bool {
	if c := cmp.Compare(precedence(b), precedence(a)); c != 0 {
		return c < 0
	}
	if wa, wb := uint32(a.PortHi)-uint32(a.PortLo), uint32(b.PortHi)-uint32(b.PortLo); wa != wb {
		return wa < wb
	}
	return a.Rule < b.Rule
}

// precedence ranks the first three criteria of Lookup; higher wins.
func precedence(e *Entry) int {
	r := 0
	if e.Action == ActionDeny {
		r += 4
		if e.Flags&FlagAudit == 0 {
			r += 4
		}
	}
	if e.Peer != identity.IDNone {
		r += 2
	}
	if e.Proto != 0 {
		r++
	}
	return r
}

// CompareEntries is the canonical order of entries.
func CompareEntries(a, b Entry) int {
	return cmp.Or(
		cmp.Compare(a.Direction, b.Direction),
		cmp.Compare(a.Peer, b.Peer),
		cmp.Compare(a.Proto, b.Proto),
		cmp.Compare(a.PortLo, b.PortLo),
		cmp.Compare(a.PortHi, b.PortHi),
		cmp.Compare(a.Action, b.Action),
		cmp.Compare(a.Flags, b.Flags),
		cmp.Compare(a.Rule, b.Rule),
	)
}

// SortEntries puts entries in canonical order and drops exact duplicates.
func SortEntries(es []Entry) []Entry {
	slices.SortFunc(es, CompareEntries)
	return slices.Compact(es)
}
