package flows

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Drop reasons as Hubble names them.
const (
	DropPolicyDenied  = "POLICY_DENIED" // default deny: no rule allowed it
	DropPolicyDeny    = "POLICY_DENY"   // an explicit deny rule
	DropInvalidPacket = "INVALID_PACKET_DROPPED"
	// Source validation at the pod's egress: the pod claimed an address
	// that is not its own (datapath.DropReason.String gives the names).
	DropInvalidSourceIP  = "INVALID_SOURCE_IP"
	DropInvalidSourceMAC = "INVALID_SOURCE_MAC"
	DropForbiddenICMPv6  = "FORBIDDEN_ICMP6_MESSAGE"
	DropUnsupportedL2    = "UNSUPPORTED_L2_PROTOCOL"
	// DropAuthRequired: plaintext that only an mtls: Required rule would
	// allow; DropTunnelDown: a connection that must go through the tunnel
	// while the node's tunnel endpoint is not there.
	DropAuthRequired = "AUTH_REQUIRED"
	DropTunnelDown   = "TUNNEL_DOWN"
	// DropQuarantined: the pod is quarantined; everything but DNS to the
	// listed resolvers is dropped (Flow.Quarantine says why).
	DropQuarantined = "QUARANTINED"
)

// IdentityView is what a flow record says about an identity. Built once per
// policy apply, shared by every record that names the identity.
type IdentityView struct {
	ID        identity.NumericID
	Namespace string
	Labels    []string
	SPIFFEID  string
	CIDR      string
	// labelsJSON is Labels encoded once for every record that names the
	// identity; nil for views not built by NewContext.
	labelsJSON []byte
	// src is what the view was made from (nil for reserved identities and
	// views not built by NewContext).
	src *viewSource
}

// viewSource is what of an identity its view shows.
type viewSource struct {
	namespace, sa, spiffeID string
	prefix                  netip.Prefix
	podLabels               map[string]string
}

func viewSourceOf(ii policy.IdentityInfo) *viewSource {
	return &viewSource{namespace: ii.Labels.Namespace, sa: ii.Labels.SA(), spiffeID: ii.SPIFFEID, prefix: ii.Prefix,
		podLabels: maps.Clone(ii.Labels.PodLabels)}
}

func (s *viewSource) same(ii policy.IdentityInfo) bool {
	return s.namespace == ii.Labels.Namespace && s.sa == ii.Labels.SA() && s.spiffeID == ii.SPIFFEID &&
		s.prefix == ii.Prefix && maps.Equal(s.podLabels, ii.Labels.PodLabels)
}

// PodName names a pod.
type PodName struct{ Namespace, Name string }

// Context is the state records are enriched from: identities, rules and
// pod addresses as of one policy revision. It is immutable once published.
type Context struct {
	Revision   uint64
	Identities map[identity.NumericID]*IdentityView
	Rules      map[policy.RuleID]*Policy
	Pods       map[netip.Addr]PodName
	// Endpoints names the pods of this node's endpoints, for records of
	// packets whose source address is forged and so names nobody.
	Endpoints map[policy.EndpointID]PodName
	// IsolatedBy names, for this node's endpoints, the policies ("Kind
	// ns/name") that isolate each in each direction (indexed by
	// policy.Direction), for the records of flows dropped by that
	// isolation's default deny. Computed once per apply (the agent asks
	// the compiler, policy.Compiler.IsolatedBy); the slices are shared by
	// every record and never changed.
	IsolatedBy map[policy.EndpointID]*[2][]string
	// Quarantine names the quarantine with a number (the rule of a
	// QUARANTINED drop); nil, or a nil answer, when it is not known.
	// Quarantines change between applies: it is a lookup, not a copy.
	Quarantine func(number uint32) *QuarantineRef
}

// NewContext builds a Context from a MapState, the compiler's identities
// and the addresses of known pods.
func NewContext(ms *policy.MapState, ids []policy.IdentityInfo, pods map[netip.Addr]PodName) *Context {
	return NewContextFrom(nil, ms, ids, pods)
}

// NewContextFrom is NewContext that keeps prev's view of every identity
// whose labels did not change: at 10,000 identities, building every view
// (label strings, their JSON) again was most of a policy change's cost.
// Views are never changed once made, so two contexts can share them.
func NewContextFrom(prev *Context, ms *policy.MapState, ids []policy.IdentityInfo, pods map[netip.Addr]PodName) *Context {
	c := &Context{
		Revision:   ms.Revision,
		Identities: make(map[identity.NumericID]*IdentityView, len(ids)+2),
		Rules:      make(map[policy.RuleID]*Policy, len(ms.Rules)),
		Pods:       pods,
	}
	c.Identities[identity.IDHost] = &IdentityView{ID: identity.IDHost, Labels: []string{"reserved:host"}}
	c.Identities[identity.IDWorld] = &IdentityView{ID: identity.IDWorld, Labels: []string{"reserved:world"}}
	for _, ii := range ids {
		if ii.ID.IsReserved() {
			continue // host and world keep their reserved labels above
		}
		if prev != nil {
			if pv := prev.Identities[ii.ID]; pv != nil && pv.src != nil && pv.src.same(ii) {
				c.Identities[ii.ID] = pv
				continue
			}
		}
		v := &IdentityView{ID: ii.ID, SPIFFEID: ii.SPIFFEID, src: viewSourceOf(ii)}
		if ii.Prefix.IsValid() {
			v.CIDR = ii.Prefix.String()
			v.Labels = []string{"cidr:" + v.CIDR, "reserved:world"}
		} else {
			v.Namespace = ii.Labels.Namespace
			v.Labels = append(v.Labels, "k8s:io.kubernetes.pod.namespace="+ii.Labels.Namespace,
				"k8s:io.kubernetes.pod.serviceaccount="+ii.Labels.SA())
			for _, k := range slices.Sorted(maps.Keys(ii.Labels.PodLabels)) {
				v.Labels = append(v.Labels, "k8s:"+k+"="+ii.Labels.PodLabels[k])
			}
			slices.Sort(v.Labels)
		}
		c.Identities[ii.ID] = v
	}
	for _, v := range c.Identities {
		if v.labelsJSON == nil {
			v.labelsJSON = appendLabels(nil, v.Labels)
		}
	}
	for id, ri := range ms.Rules {
		c.Rules[id] = &Policy{Name: ri.Name, Namespace: ri.Namespace, Kind: ri.Kind, Revision: ms.Revision,
			Rule: fmt.Sprintf("%s[%d]", ri.Direction, ri.Index)}
	}
	return c
}

var (
	policyDefaultDeny  = &Policy{Name: "default-deny", Kind: "default"}
	policyDefaultAllow = &Policy{Name: "no-policy-selects", Kind: "default"}
)

// Enricher turns datapath events into flow records.
type Enricher struct {
	nodeName string
	ctx      atomic.Pointer[Context]
	// bootOffset converts CLOCK_MONOTONIC event times to wall clock.
	bootOffset int64
}

// NewEnricher returns an Enricher with an empty context.
func NewEnricher(nodeName string) *Enricher {
	e := &Enricher{nodeName: nodeName}
	e.ctx.Store(&Context{Identities: map[identity.NumericID]*IdentityView{}, Rules: map[policy.RuleID]*Policy{}})
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err == nil {
		e.bootOffset = time.Now().UnixNano() - ts.Nano()
	}
	return e
}

// SetContext publishes a new context; records enriched afterwards use it.
func (e *Enricher) SetContext(c *Context) { e.ctx.Store(c) }

// Context is the context records are enriched with now (nil before the
// first SetContext).
func (e *Enricher) Context() *Context { return e.ctx.Load() }

// flowBlock holds a record and everything it points to, so that a record
// costs one allocation. The pointers of f point into the block, which the
// garbage collector keeps alive as a whole while f is referenced.
type flowBlock struct {
	f        Flow
	ip       IP
	l4       Layer4
	tcp      TCP
	flags    TCPFlags
	ports    Ports
	icmp     ICMP
	src, dst Endpoint
	by       [1]*Policy
	// addrs holds the text of both addresses; IP.Source and IP.Destination
	// are strings over it. The block is never reused or written after
	// Enrich returns, so the strings are immutable as Go requires.
	addrs [2 * len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")]byte
}

// Enrich builds the record of one event. The record is new (one
// allocation) and immutable: the hub and followers keep it.
func (e *Enricher) Enrich(ev *datapath.FlowEvent) *Flow {
	c := e.ctx.Load()
	b := new(flowBlock)
	f := &b.f
	f.Time = time.Unix(0, int64(ev.Timestamp)+e.bootOffset)
	f.Type = "L3_L4"
	f.NodeName = e.nodeName
	f.IsReply = ev.IsReply
	f.MTLS = ev.MTLS || ev.Tunnelled
	f.PickedUp = ev.PickedUp
	f.TrafficDirection = DirectionIngress
	f.EventKind = ev.Type.String()
	if ev.Direction == policy.Egress {
		f.TrafficDirection = DirectionEgress
	}
	switch ev.Verdict {
	case policy.VerdictDeny:
		f.Verdict = VerdictDropped
	case policy.VerdictAudit:
		f.Verdict = VerdictAudit
	default:
		f.Verdict = VerdictForwarded
	}
	if f.Verdict == VerdictDropped {
		switch {
		case ev.DropReason == datapath.DropMalformed:
			f.DropReasonDesc = DropInvalidPacket
		case ev.DropReason.SourceValidation():
			f.DropReasonDesc = ev.DropReason.String()
		case ev.DropReason == datapath.DropAuthRequired:
			f.DropReasonDesc = DropAuthRequired
		case ev.DropReason == datapath.DropTunnelDown:
			f.DropReasonDesc = DropTunnelDown
		case ev.DropReason == datapath.DropQuarantined:
			f.DropReasonDesc = DropQuarantined
			if c.Quarantine != nil {
				f.Quarantine = c.Quarantine(uint32(ev.Rule))
			}
		case ev.Rule == policy.RuleDefault:
			f.DropReasonDesc = DropPolicyDenied
		default:
			f.DropReasonDesc = DropPolicyDeny
		}
	}
	b.ip.IPVersion = "IPv4"
	if ev.Src.Is6() && !ev.Src.Is4In6() {
		b.ip.IPVersion = "IPv6"
	}
	a := ev.Src.AppendTo(b.addrs[:0])
	n := len(a)
	a = ev.Dst.AppendTo(a)
	if len(a) <= len(b.addrs) { // always, unless zoned addresses
		b.ip.Source = unsafe.String(unsafe.SliceData(a), n)
		b.ip.Destination = unsafe.String(&b.addrs[n], len(a)-n)
	} else {
		b.ip.Source, b.ip.Destination = ev.Src.String(), ev.Dst.String()
	}
	f.IP = &b.ip
	f.L4 = b.layer4(ev)
	forged := ev.DropReason.SourceValidation()
	if forged {
		// The source address is what the pod claimed: name the sending
		// endpoint's pod, never the pod that owns the address.
		c.endpoint(&b.src, ev.SrcIdentity, netip.Addr{})
		if p, ok := c.Endpoints[ev.Endpoint]; ok {
			b.src.Namespace, b.src.PodName = p.Namespace, p.Name
		}
	} else {
		c.endpoint(&b.src, ev.SrcIdentity, ev.Src)
	}
	c.endpoint(&b.dst, ev.DstIdentity, ev.Dst)
	f.Source, f.Destination = &b.src, &b.dst
	// The local endpoint is the source of the packets that leave the pod:
	// those of its egress flows and the replies of its ingress flows.
	// Otherwise it is the destination.
	if (ev.Direction == policy.Egress) != ev.IsReply {
		f.Source.ID = uint32(ev.Endpoint)
	} else {
		f.Destination.ID = uint32(ev.Endpoint)
	}
	// Malformed, forged and quarantined packets are dropped before
	// policy: no policy decided them (a quarantine drop's rule is the
	// quarantine's number).
	if ev.DropReason != datapath.DropMalformed && ev.DropReason != datapath.DropQuarantined && !forged {
		by := policyDefaultAllow
		switch {
		case ev.Rule != policy.RuleDefault:
			if p := c.Rules[ev.Rule]; p != nil {
				by = p
			} else {
				by = &Policy{Name: fmt.Sprintf("rule-%d", ev.Rule), Kind: "unknown"}
			}
		case f.Verdict != VerdictForwarded:
			by = policyDefaultDeny
			// A drop (or audit) of the isolation's default deny names
			// what isolates the deciding pod: the local endpoint, in the
			// event's direction (the destination at ingress, the source
			// at egress). Not the drops with rule 0 that policy did not
			// decide (AUTH_REQUIRED between enrolled pods, TUNNEL_DOWN).
			iso := c.IsolatedBy[ev.Endpoint]
			if iso != nil && int(ev.Direction) < len(iso) && (f.DropReasonDesc == DropPolicyDenied || f.Verdict == VerdictAudit) {
				f.IsolatedBy = iso[ev.Direction]
			}
		}
		b.by[0] = by
		list := b.by[:]
		// FORWARDED flows name what allowed them, including those no
		// policy judged (VerdictPass); DROPPED and AUDIT (would have been
		// dropped) name what denied them.
		switch {
		case f.Verdict == VerdictForwarded && ev.Direction == policy.Ingress:
			f.IngressAllowedBy = list
		case f.Verdict == VerdictForwarded:
			f.EgressAllowedBy = list
		case ev.Direction == policy.Ingress:
			f.IngressDeniedBy = list
		default:
			f.EgressDeniedBy = list
		}
	}
	return f
}

func (c *Context) endpoint(e *Endpoint, id identity.NumericID, addr netip.Addr) {
	e.Identity = uint32(id)
	if v := c.Identities[id]; v != nil {
		e.Namespace, e.Labels, e.SPIFFEID, e.CIDR = v.Namespace, v.Labels, v.SPIFFEID, v.CIDR
		e.labelsJSON = v.labelsJSON
	}
	if p, ok := c.Pods[addr.Unmap()]; ok {
		e.Namespace, e.PodName = p.Namespace, p.Name
	}
}

func (b *flowBlock) layer4(ev *datapath.FlowEvent) *Layer4 {
	switch ev.Proto {
	case 6:
		b.tcp = TCP{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}
		if fl := ev.TCPFlags; fl != 0 {
			b.flags = TCPFlags{FIN: fl&0x01 != 0, SYN: fl&0x02 != 0, RST: fl&0x04 != 0, PSH: fl&0x08 != 0,
				ACK: fl&0x10 != 0, URG: fl&0x20 != 0, ECE: fl&0x40 != 0, CWR: fl&0x80 != 0}
			b.tcp.Flags = &b.flags
		}
		b.l4.TCP = &b.tcp
	case 17:
		b.ports = Ports{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}
		b.l4.UDP = &b.ports
	case 132:
		b.ports = Ports{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}
		b.l4.SCTP = &b.ports
	// The datapath reports the ICMP type; it does not parse the code.
	case 1:
		b.icmp = ICMP{Type: ev.ICMPType}
		b.l4.ICMPv4 = &b.icmp
	case 58:
		b.icmp = ICMP{Type: ev.ICMPType}
		b.l4.ICMPv6 = &b.icmp
	default:
		return nil
	}
	return &b.l4
}
