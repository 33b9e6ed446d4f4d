package explain

import (
	"net/netip"
	"slices"
	"strconv"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Peer is one end of a connection.
type Peer struct {
	// Name is for display ("ns/pod" or an address).
	Name string
	// Endpoint is set when the peer is an endpoint of the MapState: then its
	// side of the connection is enforced.
	Endpoint policy.EndpointID
	// Identity is what the other side's datapath sees (the ipcache's answer
	// for the peer's address).
	Identity identity.NumericID
	// Addrs are the peer's addresses, first preferred. The two addresses of
	// a dual-stack pod may have different identities (an ipBlock can cover
	// one and not the other), so Verdict judges a pair of peers by the
	// addresses of one family they share.
	Addrs []netip.Addr
}

// PeerOfEndpoint describes a local endpoint. Its identity is what the
// ipcache gives its first address, or its endpoint identity when it has none.
func PeerOfEndpoint(ms *policy.MapState, name string, ep policy.EndpointID, addrs []netip.Addr) Peer {
	p := Peer{Name: name, Endpoint: ep, Identity: identity.IDWorld, Addrs: addrs}
	if e := ms.Endpoints[ep]; e != nil {
		p.Identity = e.Identity
	}
	if len(addrs) > 0 {
		p.Identity = ms.ResolveIP(addrs[0])
	}
	return p
}

// PeerOfAddr describes an address that is not a local endpoint.
func PeerOfAddr(ms *policy.MapState, addr netip.Addr) Peer {
	return Peer{Name: addr.String(), Identity: ms.ResolveIP(addr), Addrs: []netip.Addr{addr}}
}

// sameFamily re-resolves src and dst by their first addresses of the first
// family of src's that dst has too: no packet crosses families. Peers
// without addresses, or without a family in common, keep their identities.
func sameFamily(ms *policy.MapState, src, dst Peer) (Peer, Peer) {
	for _, s := range src.Addrs {
		for _, d := range dst.Addrs {
			if s.Unmap().Is4() == d.Unmap().Is4() {
				src.Identity, dst.Identity = ms.ResolveIP(s), ms.ResolveIP(d)
				return src, dst
			}
		}
	}
	return src, dst
}

// Rule names a policy rule.
type Rule struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Direction string `json:"direction"`
	Index     int    `json:"index"`
	Action    string `json:"action"`
	Audit     bool   `json:"audit,omitempty"`
	// MTLS: an Allow rule with `mtls: Required`.
	MTLS bool `json:"mtls,omitempty"`
}

// Side is the verdict of one direction.
type Side struct {
	Verdict string `json:"verdict"`
	// Enforced is false when that end is not a local endpoint (its node
	// decides) or is not selected by any policy in that direction.
	Enforced bool `json:"enforced"`
	// Rule decided; nil when the direction's default did.
	Rule *Rule `json:"rule,omitempty"`
	// Default is "allow", "deny" or "audit" when the default decided.
	Default string `json:"default,omitempty"`
	// IsolatedBy names the policies ("Kind ns/name") that isolate this
	// end in this direction, when a default deny (or audit) decided: none
	// of their rules allows the connection. Filled by NameIsolation (the
	// offline engine, and the agent's live explain).
	IsolatedBy []string `json:"isolated_by,omitempty"`
	// Matching lists every rule with an entry that matches, for context.
	Matching []Rule `json:"matching,omitempty"`
	// AuthRequired: plaintext TCP is dropped with AUTH_REQUIRED, because
	// only Rule, which requires mTLS, would allow it (through the tunnel).
	AuthRequired bool `json:"auth_required,omitempty"`
	// NotMatchingMTLS lists rules that match the peer and port but require
	// mTLS, and so do not match this flow: it is not TCP, or not
	// tunnelled.
	NotMatchingMTLS []Rule `json:"not_matching_mtls,omitempty"`
	// Refused says why the source's tunnel refuses the connection (an
	// egress rule requires mTLS and the destination is not enrolled).
	Refused string `json:"refused,omitempty"`
}

// Result is the verdict for one connection.
type Result struct {
	From string `json:"from"`
	To   string `json:"to"`
	// FromIdentity and ToIdentity are the numeric identities each side's
	// datapath sees for the other.
	FromIdentity identity.NumericID `json:"from_identity"`
	ToIdentity   identity.NumericID `json:"to_identity"`
	Protocol     string             `json:"protocol"`
	Port         uint16             `json:"port"`
	Ingress      Side               `json:"ingress"`
	Egress       Side               `json:"egress"`
	Combined     string             `json:"combined"`
	AllowedBy    []Rule             `json:"allowed_by"`
	DeniedBy     []Rule             `json:"denied_by"`
	// Transport is how the connection travels: TransportPlaintext, or
	// TransportTunnel (TCP between enrolled pods, or TCP whose egress rule
	// requires mTLS). Other connections are always plaintext.
	Transport string `json:"transport"`
	// FromEnrolled and ToEnrolled say which ends are enrolled in mTLS.
	FromEnrolled bool `json:"from_enrolled"`
	ToEnrolled   bool `json:"to_enrolled"`
	// Other is the answer for the other transport, when it differs: rules
	// that require mTLS match only tunnelled TCP.
	Other    *Result `json:"other,omitempty"`
	verdicts [2]policy.Verdict
}

// Transports of Result.Transport.
const (
	TransportPlaintext = "plaintext"
	TransportTunnel    = "tunnel"
)

// Passes reports whether the connection's first packet gets through both
// ends (audit passes).
func (r *Result) Passes() bool { return r.verdicts[0].Passes() && r.verdicts[1].Passes() }

// IngressPasses and EgressPasses report each side.
func (r *Result) IngressPasses() bool { return r.verdicts[policy.Ingress].Passes() }
func (r *Result) EgressPasses() bool  { return r.verdicts[policy.Egress].Passes() }

// Verdict decides a connection from src to dst on (proto, port): egress at
// src's endpoint with dst's identity as the peer, ingress at dst's endpoint
// with src's identity, both resolved from addresses of one family (src's
// first that dst has). A side that is not a local endpoint is not enforced
// here and passes.
//
// The answer is for the transport the datapath picks (Result.Transport):
// TCP goes through the mTLS tunnel when both ends are enrolled, or when the
// egress rule that allows it requires mTLS (and the source's tunnel refuses
// it when the destination is not enrolled); everything else is plaintext.
// Both ends are judged as the datapath judges that transport: rules that
// require mTLS match only tunnelled TCP, and plaintext TCP that only they
// would allow is dropped with AUTH_REQUIRED. When the other transport's
// answer differs, it is in Result.Other.
func Verdict(ms *policy.MapState, src, dst Peer, proto uint8, port uint16) Result {
	src, dst = sameFamily(ms, src, dst)
	plain := judge(ms, src, dst, proto, port, false)
	if proto != policy.ProtoTCP {
		// The tunnel carries TCP only.
		return plain
	}
	tun := judge(ms, src, dst, proto, port, true)
	egressMTLS := tun.Egress.Rule != nil && tun.Egress.Rule.MTLS && tun.verdicts[policy.Egress] == policy.VerdictAllow
	if egressMTLS && !tun.ToEnrolled {
		tun.Egress.Refused = dst.Name + " is not enrolled: the tunnel refuses the connection, and nothing is sent in plaintext"
		tun.Egress.Verdict = policy.VerdictDeny.String()
		tun.verdicts[policy.Egress] = policy.VerdictDeny
		tun.Combined = policy.VerdictDeny.String()
	}
	r, other := plain, tun
	if (tun.FromEnrolled && tun.ToEnrolled) || egressMTLS {
		r, other = tun, plain
	}
	if !sameAnswer(&r, &other) {
		r.Other = &other
	}
	return r
}

// sameAnswer reports whether two results say the same of both ends.
func sameAnswer(a, b *Result) bool {
	same := func(x, y Side) bool {
		return x.Verdict == y.Verdict && x.AuthRequired == y.AuthRequired && x.Refused == y.Refused &&
			(x.Rule == nil) == (y.Rule == nil) && (x.Rule == nil || *x.Rule == *y.Rule)
	}
	return a.Combined == b.Combined && same(a.Ingress, b.Ingress) && same(a.Egress, b.Egress)
}

// enrolled reports whether a peer is enrolled in mTLS.
func enrolled(ms *policy.MapState, p Peer) bool {
	if e := ms.Endpoints[p.Endpoint]; p.Endpoint != 0 && e != nil && e.Enrolled {
		return true
	}
	return ms.Enrolled[p.Identity]
}

// judge decides a connection on one transport.
func judge(ms *policy.MapState, src, dst Peer, proto uint8, port uint16, tunnelled bool) Result {
	r := Result{From: src.Name, To: dst.Name, FromIdentity: src.Identity, ToIdentity: dst.Identity, Protocol: ProtoName(proto), Port: port,
		AllowedBy: []Rule{}, DeniedBy: []Rule{}, Transport: TransportPlaintext, FromEnrolled: enrolled(ms, src), ToEnrolled: enrolled(ms, dst)}
	if tunnelled {
		r.Transport = TransportTunnel
	}
	r.Egress, r.verdicts[policy.Egress] = side(ms, src.Endpoint, policy.Egress, dst.Identity, proto, port, tunnelled, &r)
	r.Ingress, r.verdicts[policy.Ingress] = side(ms, dst.Endpoint, policy.Ingress, src.Identity, proto, port, tunnelled, &r)
	in, eg := r.verdicts[policy.Ingress], r.verdicts[policy.Egress]
	switch {
	case in == policy.VerdictDeny || eg == policy.VerdictDeny:
		r.Combined = policy.VerdictDeny.String()
	case in == policy.VerdictAudit || eg == policy.VerdictAudit:
		r.Combined = policy.VerdictAudit.String()
	default:
		r.Combined = policy.VerdictAllow.String()
	}
	return r
}

func side(ms *policy.MapState, ep policy.EndpointID, dir policy.Direction, peer identity.NumericID, proto uint8, port uint16,
	tunnelled bool, r *Result) (Side, policy.Verdict) {
	ept := ms.Endpoints[ep]
	if ep == 0 || ept == nil {
		return Side{Verdict: policy.VerdictAllow.String()}, policy.VerdictAllow
	}
	d := ms.LookupFlow(ep, dir, peer, proto, port, tunnelled)
	// Enforced in this direction: isolated, or with some entry of it (a
	// policy whose rules only deny). The other direction's entries do
	// not count: a policy of one direction leaves the other open.
	enforced := ept.Default[dir] != policy.DefaultAllow
	for i := range ept.Entries {
		enforced = enforced || ept.Entries[i].Direction == dir
	}
	s := Side{Verdict: d.Verdict.String(), Enforced: enforced, AuthRequired: d.AuthRequired}
	if d.Rule != policy.RuleDefault {
		ru := ruleOf(ms, d.Rule)
		s.Rule = &ru
		switch {
		case d.AuthRequired:
			// The rule would allow, through the tunnel; it denies nothing.
		case d.Verdict == policy.VerdictAllow:
			r.AllowedBy = append(r.AllowedBy, ru)
		default:
			r.DeniedBy = append(r.DeniedBy, ru)
		}
	} else {
		switch {
		case dir == policy.Ingress && peer == identity.IDHost && ms.AllowHostIngress:
			s.Default = "allow (host)"
		case ept.Default[dir] == policy.DefaultDeny:
			s.Default = "deny"
		case ept.Default[dir] == policy.DefaultAudit:
			s.Default = "audit"
		default:
			s.Default = "allow"
		}
	}
	var ids, mtlsOnly []policy.RuleID
	for i := range ept.Entries {
		e := &ept.Entries[i]
		if !e.Matches(dir, peer, proto, port) {
			continue
		}
		if e.Action == policy.ActionAllow && e.Flags&policy.FlagMTLSRequired != 0 && !(tunnelled && proto == policy.ProtoTCP) {
			if !slices.Contains(mtlsOnly, e.Rule) {
				mtlsOnly = append(mtlsOnly, e.Rule)
			}
			continue
		}
		if !slices.Contains(ids, e.Rule) {
			ids = append(ids, e.Rule)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		s.Matching = append(s.Matching, ruleOf(ms, id))
	}
	slices.Sort(mtlsOnly)
	for _, id := range mtlsOnly {
		s.NotMatchingMTLS = append(s.NotMatchingMTLS, ruleOf(ms, id))
	}
	return s, d.Verdict
}

func ruleOf(ms *policy.MapState, id policy.RuleID) Rule {
	ri := ms.Rules[id]
	return Rule{Kind: ri.Kind, Namespace: ri.Namespace, Name: ri.Name, Direction: ri.Direction.String(),
		Index: ri.Index, Action: ri.Action.String(), Audit: ri.Audit, MTLS: ri.MTLS}
}

// ProtoName names the protocols policies use.
func ProtoName(p uint8) string {
	switch p {
	case policy.ProtoTCP:
		return "TCP"
	case policy.ProtoUDP:
		return "UDP"
	case policy.ProtoSCTP:
		return "SCTP"
	}
	return "proto-" + strconv.Itoa(int(p))
}

// ParseProto is the inverse of ProtoName for TCP, UDP and SCTP.
func ParseProto(s string) (uint8, bool) {
	switch s {
	case "TCP", "tcp":
		return policy.ProtoTCP, true
	case "UDP", "udp":
		return policy.ProtoUDP, true
	case "SCTP", "sctp":
		return policy.ProtoSCTP, true
	}
	return 0, false
}
