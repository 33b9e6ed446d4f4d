package datapath

import (
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

func allowOut(peer identity.NumericID, port uint16, rule policy.RuleID, flags policy.Flags) policy.Entry {
	return policy.Entry{Direction: policy.Egress, Peer: peer, Proto: 6, PortLo: port, PortHi: port,
		Action: policy.ActionAllow, Flags: flags, Rule: rule}
}

// TestProgEnrolledNeedsTunnel: with no tunnel listener, an enrolled pod's
// TCP to an enrolled peer is dropped (TUNNEL_DOWN, flagged tunnelled, no
// conntrack entry); to a peer that is not enrolled, and UDP, pass as
// before; a pod that is not enrolled is untouched.
func TestProgEnrolledNeedsTunnel(t *testing.T) {
	ms := baseState(allowOut(clientID, 80, 3, 0), allowOut(otherID, 80, 4, 0),
		policy.Entry{Direction: policy.Egress, Peer: clientID, Proto: 17, PortLo: 53, PortHi: 53, Action: policy.ActionAllow, Rule: 5})
	ms.Endpoints[testEP].Enrolled = true
	ms.Enrolled = map[identity.NumericID]bool{clientID: true, podID: true}
	f := newProgFixture(t, ms)

	syn := tcpSyn(podIP, clientIP, 40000, 80)
	if got := f.fromPod(t, syn); got != retShot {
		t.Fatalf("enrolled pair without a listener: %#x, want drop", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventDrop || ev.DropReason != DropTunnelDown || !ev.Tunnelled || ev.Rule != 3 {
		t.Fatalf("event %+v, want a TUNNEL_DOWN drop of rule 3, tunnelled", ev)
	}
	if _, ok := ctLookup(t, f.d, uint32(testEP), syn); ok {
		t.Fatal("a flow dropped for want of the tunnel has a conntrack entry")
	}
	if c, _ := f.d.Counters(); c.ByDrop[DropTunnelDown].Packets != 1 {
		t.Fatalf("TUNNEL_DOWN counter %+v", c.ByDrop[DropTunnelDown])
	}
	if got := f.fromPod(t, tcpSyn(podIP, otherIP, 40001, 80)); got != retPass {
		t.Fatalf("to a peer that is not enrolled: %#x, want pass", got)
	}
	if ev := f.oneEvent(t); ev.Tunnelled {
		t.Fatalf("flow to a peer that is not enrolled flagged tunnelled: %+v", ev)
	}
	if got := f.fromPod(t, pktSpec{src: podIP, dst: clientIP, proto: 17, sport: 5000, dport: 53}); got != retPass {
		t.Fatalf("UDP to an enrolled peer: %#x, want pass", got)
	}
	f.oneEvent(t)

	// Not enrolled any more: the same TCP passes.
	ms2 := baseState(allowOut(clientID, 80, 3, 0))
	ms2.Revision = 2
	ms2.Enrolled = ms.Enrolled
	f.apply(t, ms2)
	if got := f.fromPod(t, tcpSyn(podIP, clientIP, 40002, 80)); got != retPass {
		t.Fatalf("pod not enrolled: %#x, want pass", got)
	}
}

// TestProgEgressMTLSRequiredRevised: a plaintext flow whose egress allow
// becomes mtls: Required cannot move into the tunnel: it is dropped at
// its next packet.
func TestProgEgressMTLSRequiredRevised(t *testing.T) {
	f := newProgFixture(t, baseState(allowOut(clientID, 80, 3, 0)))
	syn := tcpSyn(podIP, clientIP, 40000, 80)
	if got := f.fromPod(t, syn); got != retPass {
		t.Fatalf("plain egress: %#x", got)
	}
	f.oneEvent(t)
	ms := baseState(allowOut(clientID, 80, 3, policy.FlagMTLSRequired))
	ms.Revision = 2
	f.apply(t, ms)
	ack := syn
	ack.tcpFlags = tcpACK
	if got := f.fromPod(t, ack); got != retShot {
		t.Fatalf("plaintext flow under an mtls: Required egress allow: %#x, want drop", got)
	}
	if ev := f.oneEvent(t); ev.DropReason != DropPolicyRevised || ev.Rule != 3 {
		t.Fatalf("event %+v", ev)
	}
}
