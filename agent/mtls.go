package agent

import (
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/agent/svids"
	"github.com/bulkhead-io/bulkhead/agent/tunnel"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Tunnel defaults (DESIGN.md §5).
const (
	DefaultTunnelPort   = 15008
	DefaultRedirectPort = 15001
	// DefaultTunnelMark is the packet mark (under TunnelMarkMask) that
	// steers a pod's tunnelled packets to the node's transparent listener.
	DefaultTunnelMark = datapath.DefaultTunnelMark
	// TunnelMarkMask is the part of the mark the tunnel owns.
	TunnelMarkMask = datapath.DefaultTunnelMask
)

// mtlsView is what the tunnel endpoint asks of the agent: pods by address,
// identities by SPIFFE ID, and the nodes' addresses. Built with every
// publish, never mutated.
type mtlsView struct {
	pods     map[netip.Addr]tunnel.Pod
	bySPIFFE map[string][]identity.NumericID
	// nodes are every store pod's status.hostIPs and this node's own
	// addresses (self): where peer tunnel endpoints connect from.
	nodes map[netip.Addr]bool
	self  map[netip.Addr]bool
}

// buildMTLSView runs on the batch goroutine (it reads storePods). self
// are this node's addresses.
func (a *Agent) buildMTLSView(ms *policy.MapState, ids map[uint32]policy.IdentityInfo, v *view, self []netip.Addr) *mtlsView {
	mv := &mtlsView{pods: map[netip.Addr]tunnel.Pod{}, bySPIFFE: map[string][]identity.NumericID{},
		nodes: map[netip.Addr]bool{}, self: map[netip.Addr]bool{}}
	for _, ip := range self {
		mv.self[ip.Unmap()] = true
		mv.nodes[ip.Unmap()] = true
	}
	spiffeOf := func(id identity.NumericID) spiffeid.ID {
		sid, _ := spiffeid.FromString(ids[uint32(id)].SPIFFEID)
		return sid
	}
	for _, ii := range ids {
		if ii.ID.IsReserved() || ii.ID.IsCIDR() || ii.SPIFFEID == "" {
			continue
		}
		mv.bySPIFFE[ii.SPIFFEID] = append(mv.bySPIFFE[ii.SPIFFEID], ii.ID)
	}
	for ref, p := range a.storePods {
		for _, ip := range p.HostIPs {
			mv.nodes[ip.Unmap()] = true
		}
		for _, ip := range p.IPs {
			id, ok := ms.IPCache[netip.PrefixFrom(ip, ip.BitLen())]
			if !ok || id.IsReserved() || id.IsCIDR() {
				continue
			}
			mv.pods[ip] = tunnel.Pod{Key: ref.String(), IPs: p.IPs, Identity: id, SPIFFEID: spiffeOf(id),
				Enrolled: ms.Enrolled[id], Node: sameFamily(p.HostIPs, ip)}
		}
	}
	// Local pods: their addresses come from CNI, and their node is this one.
	for epID, rec := range v.endpoints {
		ep := ms.Endpoints[epID]
		if ep == nil {
			continue
		}
		ips := make([]netip.Addr, 0, len(rec.IPs))
		for _, p := range rec.IPs {
			ips = append(ips, p.Addr())
		}
		pod := tunnel.Pod{Key: v.pods[epID].String(), IPs: ips, Identity: ep.Identity, SPIFFEID: spiffeOf(ep.Identity),
			Enrolled: ep.Enrolled, Endpoint: epID}
		for _, ip := range ips {
			mv.pods[ip] = pod
		}
	}
	return mv
}

// sameFamily picks the address of ips in ip's family, else the first.
func sameFamily(ips []netip.Addr, ip netip.Addr) netip.Addr {
	for _, a := range ips {
		if a.Is4() == ip.Is4() {
			return a
		}
	}
	if len(ips) > 0 {
		return ips[0]
	}
	return netip.Addr{}
}

// tunnelDirectory answers the tunnel from the published view.
type tunnelDirectory struct{ a *Agent }

func (d tunnelDirectory) PodByIP(ip netip.Addr) (tunnel.Pod, bool) {
	mv := d.a.view.Load().mtls
	if mv == nil {
		return tunnel.Pod{}, false
	}
	p, ok := mv.pods[ip.Unmap()]
	return p, ok
}

// IsNode reports whether addr is a node's: a store pod's status.hostIPs,
// one of this node's addresses, or loopback (this node's tunnel dials its
// own listener for same-node pairs).
func (d tunnelDirectory) IsNode(addr netip.Addr) bool {
	addr = addr.Unmap()
	if addr.IsLoopback() {
		return true
	}
	mv := d.a.view.Load().mtls
	return mv != nil && mv.nodes[addr]
}

// livesOn reports whether pod p is on the node at from: the node the
// claim of a source address came from may only speak for its own pods.
func (mv *mtlsView) livesOn(p tunnel.Pod, from netip.Addr) bool {
	from = from.Unmap()
	if p.Local() {
		return from.IsLoopback() || mv.self[from]
	}
	return p.Node.IsValid() && p.Node.Unmap() == from
}

// Admit judges a tunnelled connection by the verified SPIFFE ID. The
// identity is the one of the pod at the claimed source address when that
// pod holds the verified ID and lives on the node that opened the
// connection (from): pods with one ID may differ in labels, and the
// address says which, but a node must not pick another node's pod to be
// judged as. Otherwise the one identity with that ID; when several have
// it, every one must be allowed. An ID no workload of the store holds is
// judged as world: only rules that allow any peer admit it.
func (d tunnelDirectory) Admit(dst tunnel.Pod, id spiffeid.ID, src, from netip.Addr, port uint16) (identity.NumericID, policy.Decision) {
	v := d.a.view.Load()
	judge := func(peer identity.NumericID) policy.Decision {
		return v.ms.LookupFlow(dst.Endpoint, policy.Ingress, peer, policy.ProtoTCP, port, true)
	}
	if v.mtls == nil {
		return identity.IDWorld, judge(identity.IDWorld)
	}
	if p, ok := v.mtls.pods[src.Unmap()]; ok && p.SPIFFEID == id && v.mtls.livesOn(p, from) {
		return p.Identity, judge(p.Identity)
	}
	cands := v.mtls.bySPIFFE[id.String()]
	if len(cands) == 0 {
		return identity.IDWorld, judge(identity.IDWorld)
	}
	var first policy.Decision
	for i, c := range cands {
		dec := judge(c)
		if !dec.Verdict.Passes() {
			return c, dec
		}
		if i == 0 {
			first = dec
		}
	}
	return cands[0], first
}

// svidIdentities gives the tunnel the SVIDs the manager holds.
type svidIdentities struct{ m *svids.Manager }

func (s svidIdentities) SVID(podKey string) (*x509svid.SVID, bool) { return s.m.SVID(podKey) }

func (s svidIdentities) Bundles() x509bundle.Source {
	if b := s.m.Bundles(); b != nil {
		return b
	}
	return x509bundle.NewSet()
}

// openTunnel builds the node's tunnel endpoint; nil when no identity source
// serves SVIDs (enrolled pods' TCP is then dropped: status says so).
func (a *Agent) openTunnel() (*tunnel.Tunnel, error) {
	if a.svids == nil {
		return nil, nil
	}
	td, err := spiffeid.TrustDomainFromString(a.cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain: %w", err)
	}
	if err := datapath.EnsureTunnelRouting(a.cfg.TunnelMark, TunnelMarkMask, datapath.DefaultTunnelTable, datapath.DefaultTunnelPriority); err != nil {
		return nil, fmt.Errorf("tunnel routing: %w", err)
	}
	return tunnel.New(tunnel.Config{
		Logger:       a.log.With("component", "tunnel"),
		Directory:    tunnelDirectory{a},
		Identities:   svidIdentities{a.svids},
		Datapath:     a.dp,
		TrustDomain:  td,
		ListenAddr:   fmt.Sprintf("[::]:%d", a.cfg.TunnelPort),
		RedirectAddr: fmt.Sprintf("[::]:%d", a.cfg.RedirectPort),
		PeerPort:     a.cfg.TunnelPort,
		OnEvent:      a.tunnelEvent,
	})
}

// mtlsStatus reports the tunnel for `bulkhead status`.
func (a *Agent) mtlsStatus() *api.MTLSStatus {
	st := &api.MTLSStatus{Port: a.cfg.TunnelPort}
	if a.tunnel == nil {
		st.Reason = "no identity source (--identity-source none): enrolled pods' TCP is dropped (TUNNEL_DOWN), never sent in plaintext"
		return st
	}
	s := a.tunnel.Stats()
	st.Enabled = true
	st.KernelTLS, st.KernelTLSReason = s.KernelTLS, s.KernelTLSReason
	st.ActiveOutbound, st.ActiveInbound, st.PooledTLS, st.InboundTLS = s.ActiveOutbound, s.ActiveInbound, s.PoolConns, s.InboundConns
	st.Forwarded, st.Refused, st.Admitted, st.Denied = s.Forwarded, s.Refused, s.Admitted, s.Denied
	st.HandshakeFailures, st.DialFailures, st.PoolReuses = s.HandshakeFailures, s.DialFailures, s.PoolReuses
	return st
}

// tunnelStat is the tunnel's numbers for the metrics.
func (a *Agent) tunnelStat() metrics.TunnelStat {
	s := a.tunnel.Stats()
	return metrics.TunnelStat{Forwarded: s.Forwarded, Refused: s.Refused, RejectedByPeer: s.RejectedByPeer,
		DialFailures: s.DialFailures, HandshakeFailures: s.HandshakeFailures, InboundAccepted: s.InboundAccepted,
		PoolDials: s.PoolDials, PoolReuses: s.PoolReuses, Admitted: s.Admitted, Denied: s.Denied,
		BytesOut: s.BytesOut, BytesIn: s.BytesIn, PoolConns: s.PoolConns, InboundConns: s.InboundConns,
		ActiveOutbound: s.ActiveOutbound, ActiveInbound: s.ActiveInbound,
		NotFromNode: s.NotFromNode, HandshakesShed: s.HandshakesShed}
}

// tunnelEvent turns what the tunnel reports into logs and, for connections
// the tunnel refused, flow records: the datapath recorded the pod's SYN as
// forwarded into the tunnel, and the record that follows says it went no
// further.
func (a *Agent) tunnelEvent(e tunnel.Event) {
	switch e.Kind {
	case tunnel.EventHandshakeFailed:
		a.log.Warn("tunnel handshake failed", "side", e.Side.String(), "node", e.Node, "src", e.Src, "dst", e.Dst, "reason", e.Reason, "error", e.Err)
		return
	case tunnel.EventRefused:
	default:
		return
	}
	a.log.Info("tunnel refused a connection", "side", e.Side.String(), "src", e.Src, "dst", e.Dst,
		"srcID", e.SrcID.String(), "dstID", e.DstID.String(), "cause", e.Cause.String(), "reason", e.Reason, "status", e.Status)
	pipe := a.pipe.Load()
	if pipe == nil {
		return
	}
	v := a.view.Load()
	ev := datapath.FlowEvent{Type: datapath.EventDrop, Timestamp: monotonicNow(), Verdict: policy.VerdictDeny,
		Proto: policy.ProtoTCP, Src: e.Src.Addr(), Dst: e.Dst.Addr(), SrcPort: e.Src.Port(), DstPort: e.Dst.Port(),
		TCPFlags: 0x02}
	if e.Side == tunnel.SideSource {
		src, _ := tunnelDirectory{a}.PodByIP(e.Src.Addr())
		dst, _ := tunnelDirectory{a}.PodByIP(e.Dst.Addr())
		ev.Endpoint, ev.Direction, ev.SrcIdentity = src.Endpoint, policy.Egress, src.Identity
		ev.DstIdentity = dst.Identity
		if ev.DstIdentity == identity.IDNone {
			ev.DstIdentity = identity.IDWorld
		}
		reason, ok := dropReasonOf(e.Cause)
		if !ok {
			return
		}
		ev.DropReason = reason
		if reason == datapath.DropAuthRequired {
			// Only an egress mtls: Required rule sends a connection to
			// a peer that cannot be tunnelled: name it.
			ev.Rule = v.ms.LookupFlow(src.Endpoint, policy.Egress, ev.DstIdentity, policy.ProtoTCP, e.Dst.Port(), true).Rule
		}
	} else {
		// The destination's ingress policy refused the verified peer.
		dst, _ := tunnelDirectory{a}.PodByIP(e.Dst.Addr())
		ev.Endpoint, ev.Direction, ev.DstIdentity = dst.Endpoint, policy.Ingress, dst.Identity
		ev.SrcIdentity, ev.Rule, ev.MTLS = e.Identity, e.Decision.Rule, true
		ev.DropReason = datapath.DropPolicy
		if e.Identity == identity.IDNone || e.Cause != tunnel.CausePolicy {
			return // not a policy answer (wrong target, dial error): the log says it
		}
	}
	if ev.Endpoint == 0 {
		return
	}
	pipe.emit(&ev)
}

// dropReasonOf is the drop reason of a connection the tunnel refused at its
// source: it could not be tunnelled (the peer is not enrolled: an mtls:
// Required rule sent it), the tunnel could not carry it, or the peer's
// policy refused it.
func dropReasonOf(c tunnel.Cause) (datapath.DropReason, bool) {
	switch c {
	case tunnel.CauseNotTunnelable:
		return datapath.DropAuthRequired, true
	case tunnel.CauseTunnelDown:
		return datapath.DropTunnelDown, true
	case tunnel.CausePolicy:
		return datapath.DropPolicy, true
	}
	return 0, false
}

func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
