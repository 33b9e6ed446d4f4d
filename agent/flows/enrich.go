package flows

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

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
)

// IdentityView is what a flow record says about an identity. Built once per
// policy apply, shared by every record that names the identity.
type IdentityView struct {
	ID        identity.NumericID
	Namespace string
	Labels    []string
	SPIFFEID  string
	CIDR      string
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
}

// NewContext builds a Context from a MapState, the compiler's identities
// and the addresses of known pods.
func NewContext(ms *policy.MapState, ids []policy.IdentityInfo, pods map[netip.Addr]PodName) *Context {
	c := &Context{
		Revision:   ms.Revision,
		Identities: make(map[identity.NumericID]*IdentityView, len(ids)+2),
		Rules:      make(map[policy.RuleID]*Policy, len(ms.Rules)),
		Pods:       pods,
	}
	c.Identities[identity.IDHost] = &IdentityView{ID: identity.IDHost, Labels: []string{"reserved:host"}}
	c.Identities[identity.IDWorld] = &IdentityView{ID: identity.IDWorld, Labels: []string{"reserved:world"}}
	for _, ii := range ids {
		v := &IdentityView{ID: ii.ID, SPIFFEID: ii.SPIFFEID}
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

// Enrich builds the record of one event.
func (e *Enricher) Enrich(ev *datapath.FlowEvent) *Flow {
	c := e.ctx.Load()
	f := &Flow{
		Time:             time.Unix(0, int64(ev.Timestamp)+e.bootOffset),
		Type:             "L3_L4",
		NodeName:         e.nodeName,
		IsReply:          ev.IsReply,
		TrafficDirection: DirectionIngress,
		EventKind:        ev.Type.String(),
	}
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
		case ev.Rule == policy.RuleDefault:
			f.DropReasonDesc = DropPolicyDenied
		default:
			f.DropReasonDesc = DropPolicyDeny
		}
	}
	ipv := "IPv4"
	if ev.Src.Is6() && !ev.Src.Is4In6() {
		ipv = "IPv6"
	}
	f.IP = &IP{Source: ev.Src.String(), Destination: ev.Dst.String(), IPVersion: ipv}
	f.L4 = layer4(ev)
	f.Source = c.endpoint(ev.SrcIdentity, ev.Src)
	f.Destination = c.endpoint(ev.DstIdentity, ev.Dst)
	// The local endpoint is the source of what leaves the pod (egress, not
	// a reply) and of replies into it; otherwise the destination.
	if (ev.Direction == policy.Egress) != ev.IsReply {
		f.Source.ID = uint32(ev.Endpoint)
	} else {
		f.Destination.ID = uint32(ev.Endpoint)
	}
	if ev.DropReason != datapath.DropMalformed {
		by := policyDefaultAllow
		switch {
		case ev.Rule != policy.RuleDefault:
			if p := c.Rules[ev.Rule]; p != nil {
				by = p
			} else {
				by = &Policy{Name: fmt.Sprintf("rule-%d", ev.Rule), Kind: "unknown"}
			}
		case ev.Verdict != policy.VerdictAllow:
			by = policyDefaultDeny
		}
		list := []*Policy{by}
		switch {
		case ev.Verdict == policy.VerdictAllow && ev.Direction == policy.Ingress:
			f.IngressAllowedBy = list
		case ev.Verdict == policy.VerdictAllow:
			f.EgressAllowedBy = list
		case ev.Direction == policy.Ingress:
			f.IngressDeniedBy = list
		default:
			f.EgressDeniedBy = list
		}
	}
	return f
}

func (c *Context) endpoint(id identity.NumericID, addr netip.Addr) *Endpoint {
	e := &Endpoint{Identity: uint32(id)}
	if v := c.Identities[id]; v != nil {
		e.Namespace, e.Labels, e.SPIFFEID, e.CIDR = v.Namespace, v.Labels, v.SPIFFEID, v.CIDR
	}
	if p, ok := c.Pods[addr.Unmap()]; ok {
		e.Namespace, e.PodName = p.Namespace, p.Name
	}
	return e
}

func layer4(ev *datapath.FlowEvent) *Layer4 {
	switch ev.Proto {
	case 6:
		t := &TCP{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}
		if fl := ev.TCPFlags; fl != 0 {
			t.Flags = &TCPFlags{FIN: fl&0x01 != 0, SYN: fl&0x02 != 0, RST: fl&0x04 != 0, PSH: fl&0x08 != 0,
				ACK: fl&0x10 != 0, URG: fl&0x20 != 0, ECE: fl&0x40 != 0, CWR: fl&0x80 != 0}
		}
		return &Layer4{TCP: t}
	case 17:
		return &Layer4{UDP: &Ports{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}}
	case 132:
		return &Layer4{SCTP: &Ports{SourcePort: ev.SrcPort, DestinationPort: ev.DstPort}}
	// The datapath event carries the echo identifier, not the ICMP type.
	case 1:
		return &Layer4{ICMPv4: &ICMP{}}
	case 58:
		return &Layer4{ICMPv6: &ICMP{}}
	}
	return nil
}
