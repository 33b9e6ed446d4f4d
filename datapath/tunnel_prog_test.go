package datapath

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/cilium/ebpf"

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

// enrolledIngressState: the pod admits the client (and otherID) on 80/tcp
// and 53/udp in plaintext, and the node; the pod and the client are
// enrolled, otherID is not. The node's identity is marked enrolled too,
// which the agent never does: its traffic must pass even so.
func enrolledIngressState(rev uint64, enrolled bool) *policy.MapState {
	ms := baseState(allowIn(clientID, 6, 80, 80, 3), allowIn(otherID, 6, 80, 80, 4), allowIn(clientID, 17, 53, 53, 5))
	ms.Revision = rev
	if enrolled {
		ms.Endpoints[testEP].Enrolled = true
		ms.Enrolled = map[identity.NumericID]bool{clientID: true, podID: true, identity.IDHost: true}
	}
	return ms
}

// TestProgIngressEnrolledPlaintext: at the destination, a new plaintext
// TCP flow (not from a tunnel socket) from an enrolled peer to an enrolled
// pod is dropped with AUTH_REQUIRED, rule 0, though policy allows it: the
// source did not tunnel it. The drop is counted each time and reported at
// most once per interval. The node's traffic, UDP, a peer that is not
// enrolled, and a pod that is not enrolled pass as before.
func TestProgIngressEnrolledPlaintext(t *testing.T) {
	f := newProgFixture(t, enrolledIngressState(1, true))

	syn := tcpSyn(clientIP, podIP, 40000, 80)
	if got := f.toPod(t, syn); got != retShot {
		t.Fatalf("plaintext SYN from an enrolled peer: %#x, want drop", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventDrop || ev.DropReason != DropAuthRequired || ev.Rule != 0 || ev.MTLS ||
		ev.SrcIdentity != clientID || ev.Endpoint != testEP {
		t.Fatalf("event %+v, want an AUTH_REQUIRED drop of rule 0 from the client", ev)
	}
	if _, ok := ctLookup(t, f.d, uint32(testEP), syn); ok {
		t.Fatal("a flow dropped for want of mTLS has a conntrack entry")
	}
	ack := syn
	ack.tcpFlags = tcpACK
	if got := f.toPod(t, ack); got != retShot {
		t.Fatalf("plaintext ACK from an enrolled peer: %#x, want drop", got)
	}
	f.noEvent(t) // rate-limited
	if n := dropCount(t, f.d, DropAuthRequired); n != 2 {
		t.Fatalf("AUTH_REQUIRED counter %d, want 2", n)
	}

	for _, c := range []struct {
		what string
		pkt  pktSpec
	}{
		{"the node (kubelet probe)", tcpSyn(hostIP, podIP, 40001, 80)},
		{"UDP from an enrolled peer", pktSpec{src: clientIP, dst: podIP, proto: 17, sport: 5000, dport: 53}},
		{"a peer that is not enrolled", tcpSyn(otherIP, podIP, 40002, 80)},
	} {
		if got := f.toPod(t, c.pkt); got != retPass {
			t.Fatalf("%s: %#x, want pass", c.what, got)
		}
		if ev := f.oneEvent(t); ev.Type != EventFlowNew {
			t.Fatalf("%s: event %+v, want a new flow", c.what, ev)
		}
	}

	// The pod not enrolled (its peer still is): plaintext passes.
	ms := enrolledIngressState(2, true)
	ms.Endpoints[testEP].Enrolled = false
	f.apply(t, ms)
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40003, 80)); got != retPass {
		t.Fatalf("pod not enrolled: %#x, want pass", got)
	}
}

// TestProgEnrolledPlaintextRevised: plaintext TCP flows that were allowed
// before the pair was enrolled end at the next packet after the revision
// that enrolls it (POLICY_REVISED, and the entry stays a tombstone that
// drops the other direction too), at the destination (ingress) and at the
// source (egress). A flow from the node survives.
func TestProgEnrolledPlaintextRevised(t *testing.T) {
	ms := enrolledIngressState(1, false)
	ms.Endpoints[testEP].Entries = policy.SortEntries(append(ms.Endpoints[testEP].Entries, allowOut(clientID, 443, 6, 0)))
	f := newProgFixture(t, ms)

	in := tcpSyn(clientIP, podIP, 40000, 80)
	out := tcpSyn(podIP, clientIP, 40001, 443)
	host := tcpSyn(hostIP, podIP, 40002, 80)
	for _, c := range []struct {
		what string
		run  func(*testing.T, pktSpec) uint32
		pkt  pktSpec
	}{{"ingress", f.toPod, in}, {"egress", f.fromPod, out}, {"host", f.toPod, host}} {
		if got := c.run(t, c.pkt); got != retPass {
			t.Fatalf("%s before enrollment: %#x, want pass", c.what, got)
		}
		f.oneEvent(t)
	}

	ms2 := enrolledIngressState(2, true)
	ms2.Endpoints[testEP].Entries = ms.Endpoints[testEP].Entries
	f.apply(t, ms2)

	ack := func(s pktSpec) pktSpec { s.tcpFlags = tcpACK; return s }
	for _, c := range []struct {
		what       string
		run, reply func(*testing.T, pktSpec) uint32
		pkt        pktSpec
	}{{"ingress", f.toPod, f.fromPod, in}, {"egress", f.fromPod, f.toPod, out}} {
		if got := c.run(t, ack(c.pkt)); got != retShot {
			t.Fatalf("%s plaintext flow of a now enrolled pair: %#x, want drop", c.what, got)
		}
		ev := f.oneEvent(t)
		if ev.Type != EventDrop || ev.DropReason != DropPolicyRevised {
			t.Fatalf("%s: event %+v, want a POLICY_REVISED drop", c.what, ev)
		}
		ct, ok := ctLookup(t, f.d, uint32(testEP), c.pkt)
		if !ok || ct.State&ctDenied == 0 {
			t.Fatalf("%s: conntrack %+v (found %v), want a tombstone", c.what, ct, ok)
		}
		if got := c.reply(t, ack(c.pkt.reversed())); got != retShot {
			t.Fatalf("%s: the reply direction of a revoked flow: %#x, want drop", c.what, got)
		}
	}
	if got := f.toPod(t, ack(host)); got != retPass {
		t.Fatalf("the node's flow after enrollment: %#x, want pass", got)
	}
}

// TestProgTunnelForwardNoSlot: tunnel_forward drops (TUNNEL_DOWN) a
// redirected packet of an endpoint whose endpoint_addrs slot is empty,
// where it cannot tell whether a bridge would switch the frame in
// plaintext; it passes one of an endpoint that is not a bridge port as it
// is, and addresses one of a bridge port to the bridge.
func TestProgTunnelForwardNoSlot(t *testing.T) {
	f := newProgFixture(t, baseState())
	const bridgeEP = 11
	v, err := encodeAddrs(Endpoint{ID: bridgeEP, MAC: testPodMAC, Addrs: testPodAddrs})
	if err != nil {
		t.Fatal(err)
	}
	v.BrIfindex = 42
	v.BrMac = [6]byte{2, 0xb, 0xb, 0xb, 0xb, 0xb}
	if err := f.d.setAddrs(bridgeEP, v); err != nil {
		t.Fatal(err)
	}
	frame := func(ep uint32) []byte {
		b := tcpSyn(podIP, clientIP, 40000, 80).build()
		binary.NativeEndian.PutUint32(b, ep)
		return b
	}
	fwd := func(ep uint32) (uint32, []byte) {
		in := frame(ep)
		out := make([]byte, len(in))
		ret, err := f.d.objs.BulkheadTunnelForwardTest.Run(&ebpf.RunOptions{Data: in, DataOut: out})
		if err != nil {
			t.Fatal(err)
		}
		return ret, out
	}

	if ret, _ := fwd(77); ret != retShot {
		t.Fatalf("endpoint without an endpoint_addrs slot: %#x, want drop", ret)
	}
	if n := dropCount(t, f.d, DropTunnelDown); n != 1 {
		t.Fatalf("TUNNEL_DOWN counter %d, want 1", n)
	}
	if err := f.d.clearAddrs(bridgeEP); err != nil {
		t.Fatal(err)
	}
	if ret, _ := fwd(bridgeEP); ret != retShot {
		t.Fatalf("bridge endpoint whose slot was cleared: %#x, want drop", ret)
	}
	if ret, out := fwd(uint32(testEP)); ret != retPass || !bytes.Equal(out, frame(uint32(testEP))) {
		t.Fatalf("endpoint that is not a bridge port: %#x, frame changed %v; want pass, unchanged", ret,
			!bytes.Equal(out, frame(uint32(testEP))))
	}
	if err := f.d.setAddrs(bridgeEP, v); err != nil {
		t.Fatal(err)
	}
	if ret, out := fwd(bridgeEP); ret != retPass || !bytes.Equal(out[:6], v.BrMac[:]) {
		t.Fatalf("bridge port: %#x, destination MAC %x; want pass, the bridge's %x", ret, out[:6], v.BrMac)
	}
}

// TestClearTunnelSockets: ClearTunnelSockets empties tunnel_socks (what
// a killed agent left there), and a flow from a socket it forgot is
// plaintext again.
func TestClearTunnelSockets(t *testing.T) {
	f := newProgFixture(t, baseState())
	if err := f.d.ClearTunnelSockets(); err != nil {
		t.Fatalf("clear an empty map: %v", err)
	}
	for c := range uint64(300) {
		if err := f.d.MarkTunnelSocket(c+1, clientID); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.d.ClearTunnelSockets(); err != nil {
		t.Fatal(err)
	}
	var k uint64
	var v uint32
	n := 0
	it := f.d.objs.TunnelSocks.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d tunnel sockets left after ClearTunnelSockets", n)
	}
	if err := f.d.ForgetTunnelSocket(1); err != nil {
		t.Fatalf("forget a cleared socket: %v", err)
	}
}
