package datapath

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

const (
	testEP   = policy.EndpointID(10)
	podID    = identity.NumericID(300)
	clientID = identity.NumericID(400)
	otherID  = identity.NumericID(401)
)

var (
	podIP    = netip.MustParseAddr("10.213.0.1")
	clientIP = netip.MustParseAddr("10.213.0.2")
	otherIP  = netip.MustParseAddr("10.213.0.3")
	worldIP  = netip.MustParseAddr("10.213.99.9")
	hostIP   = netip.MustParseAddr("10.213.0.254")
	podIP6   = netip.MustParseAddr("fd00:213::1")
	client6  = netip.MustParseAddr("fd00:213::2")
)

// baseState: the pod is default-deny in both directions; entries are added
// per test.
func baseState(entries ...policy.Entry) *policy.MapState {
	return &policy.MapState{
		Revision:         1,
		AllowHostIngress: true,
		IPCache: map[netip.Prefix]identity.NumericID{
			netip.PrefixFrom(podIP, 32):    podID,
			netip.PrefixFrom(clientIP, 32): clientID,
			netip.PrefixFrom(otherIP, 32):  otherID,
			netip.PrefixFrom(hostIP, 32):   identity.IDHost,
			netip.PrefixFrom(podIP6, 128):  podID,
			netip.PrefixFrom(client6, 128): clientID,
		},
		Endpoints: map[policy.EndpointID]*policy.EndpointPolicy{
			testEP: {
				Identity: podID,
				Default:  [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultDeny},
				Entries:  policy.SortEntries(entries),
			},
		},
	}
}

func allowIn(peer identity.NumericID, proto uint8, lo, hi uint16, rule policy.RuleID) policy.Entry {
	return policy.Entry{Direction: policy.Ingress, Peer: peer, Proto: proto, PortLo: lo, PortHi: hi, Action: policy.ActionAllow, Rule: rule}
}

func denyIn(peer identity.NumericID, proto uint8, lo, hi uint16, rule policy.RuleID) policy.Entry {
	e := allowIn(peer, proto, lo, hi, rule)
	e.Action = policy.ActionDeny
	return e
}

type progFixture struct {
	d  *Datapath
	ev *EventReader
}

func newProgFixture(t *testing.T, ms *policy.MapState) *progFixture {
	t.Helper()
	d := newTestDatapath(t, Config{})
	bindTestEndpoint(t, d, uint32(testEP))
	if ms != nil {
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply: %v", err)
		}
	}
	return &progFixture{d: d, ev: openEvents(t, d)}
}

func (f *progFixture) toPod(t *testing.T, s pktSpec) uint32 {
	t.Helper()
	return run(t, f.d.objs.BulkheadToPod, s.build())
}

func (f *progFixture) fromPod(t *testing.T, s pktSpec) uint32 {
	t.Helper()
	return run(t, f.d.objs.BulkheadFromPod, s.build())
}

func (f *progFixture) apply(t *testing.T, ms *policy.MapState) ApplyStats {
	t.Helper()
	st, err := f.d.Apply(ms)
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	return st
}

// oneEvent asserts that exactly one event is pending and returns it.
func (f *progFixture) oneEvent(t *testing.T) FlowEvent {
	t.Helper()
	evs := drainEvents(t, f.ev)
	if len(evs) != 1 {
		t.Fatalf("got %d events, want 1: %+v", len(evs), evs)
	}
	return evs[0]
}

func (f *progFixture) noEvent(t *testing.T) {
	t.Helper()
	if evs := drainEvents(t, f.ev); len(evs) != 0 {
		t.Fatalf("got events %+v, want none", evs)
	}
}

func tcpSyn(src, dst netip.Addr, sport, dport uint16) pktSpec {
	return pktSpec{src: src, dst: dst, proto: 6, sport: sport, dport: dport, tcpFlags: tcpSYN}
}

func TestProgAllow(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7)))
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	if got := f.toPod(t, syn); got != retPass {
		t.Fatalf("allowed SYN: got %#x, want pass", got)
	}
	ct, ok := ctLookup(t, f.d, uint32(testEP), syn)
	if !ok {
		t.Fatal("no conntrack entry for an allowed flow")
	}
	if ct.RuleId != 7 || ct.Verdict != uint8(policy.VerdictAllow) || ct.Dir != uint8(policy.Ingress) ||
		ct.PeerId != uint32(clientID) || ct.Dport != 80 || ct.Revision != f.d.Revision() {
		t.Fatalf("conntrack entry %+v", ct)
	}
	ev := f.oneEvent(t)
	want := FlowEvent{Type: EventFlowNew, Endpoint: testEP, Ifindex: testIfindex, Direction: policy.Ingress,
		Verdict: policy.VerdictAllow, Rule: 7, Proto: 6, Src: clientIP, Dst: podIP, SrcPort: 40000, DstPort: 80,
		SrcIdentity: clientID, DstIdentity: podID, TCPFlags: tcpSYN}
	ev.Timestamp = 0
	if ev != want {
		t.Fatalf("event\n got %+v\nwant %+v", ev, want)
	}
	// The next packet is established: it passes without a new event.
	ack := syn
	ack.tcpFlags = tcpACK
	if got := f.toPod(t, ack); got != retPass {
		t.Fatalf("established: got %#x", got)
	}
	f.noEvent(t)
	c, err := f.d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.ByVerdict[policy.VerdictAllow].Packets != 2 {
		t.Fatalf("allow counter %+v", c.ByVerdict)
	}
}

func TestProgDeny(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7)))
	syn := tcpSyn(clientIP, podIP, 40000, 81)
	if got := f.toPod(t, syn); got != retShot {
		t.Fatalf("denied SYN: got %#x, want drop", got)
	}
	if _, ok := ctLookup(t, f.d, uint32(testEP), syn); ok {
		t.Fatal("conntrack entry for a denied flow")
	}
	ev := f.oneEvent(t)
	if ev.Type != EventDrop || ev.Verdict != policy.VerdictDeny || ev.DropReason != DropPolicy ||
		ev.Rule != policy.RuleDefault || ev.DstPort != 81 || ev.SrcIdentity != clientID {
		t.Fatalf("drop event %+v", ev)
	}
	// A retransmission is dropped again, but its event is rate-limited.
	if got := f.toPod(t, syn); got != retShot {
		t.Fatalf("second SYN: got %#x", got)
	}
	f.noEvent(t)
	c, err := f.d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.ByDrop[DropPolicy].Packets != 2 || c.ByVerdict[policy.VerdictDeny].Packets != 2 {
		t.Fatalf("counters %+v", c)
	}
	// Another peer, another port: also the default.
	if got := f.toPod(t, tcpSyn(otherIP, podIP, 40000, 80)); got != retShot {
		t.Fatalf("other peer: got %#x", got)
	}
}

func TestProgDenyBeatsAllow(t *testing.T) {
	// A specific-peer allow of every TCP port loses to a wildcard deny of 80.
	f := newProgFixture(t, baseState(
		allowIn(clientID, 6, 0, 65535, 7),
		denyIn(identity.IDNone, 6, 80, 80, 9),
	))
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40000, 80)); got != retShot {
		t.Fatalf("port 80: got %#x, want drop", got)
	}
	if ev := f.oneEvent(t); ev.Rule != 9 || ev.Type != EventDrop {
		t.Fatalf("event %+v, want drop by rule 9", ev)
	}
	if _, ok := ctLookup(t, f.d, uint32(testEP), tcpSyn(clientIP, podIP, 40000, 80)); ok {
		t.Fatal("conntrack entry for a denied flow")
	}
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40000, 81)); got != retPass {
		t.Fatalf("port 81: got %#x, want pass", got)
	}
	if ev := f.oneEvent(t); ev.Rule != 7 || ev.Verdict != policy.VerdictAllow {
		t.Fatalf("event %+v, want allow by rule 7", ev)
	}
}

func TestProgPortRange(t *testing.T) {
	ms := baseState(
		allowIn(clientID, 6, 1024, 65535, 5),
		denyIn(clientID, 6, 8080, 8090, 6),
	)
	f := newProgFixture(t, ms)
	cases := []struct {
		port uint16
		want uint32
		rule policy.RuleID
	}{
		{1023, retShot, 0}, {1024, retPass, 5}, {8079, retPass, 5}, {8080, retShot, 6},
		{8085, retShot, 6}, {8090, retShot, 6}, {8091, retPass, 5}, {65535, retPass, 5},
	}
	for _, c := range cases {
		s := tcpSyn(clientIP, podIP, 40000, c.port)
		if got := f.toPod(t, s); got != c.want {
			t.Errorf("port %d: got %#x, want %#x", c.port, got, c.want)
		}
		ev := f.oneEvent(t)
		if ev.Rule != c.rule {
			t.Errorf("port %d: rule %d, want %d", c.port, ev.Rule, c.rule)
		}
		if ct, ok := ctLookup(t, f.d, uint32(testEP), s); ok != (c.want == retPass) || (ok && ct.RuleId != uint32(c.rule)) {
			t.Errorf("port %d: conntrack %+v (found %v)", c.port, ct, ok)
		}
		if d := ms.Lookup(testEP, policy.Ingress, clientID, 6, c.port); d.Rule != c.rule {
			t.Errorf("port %d: test disagrees with Lookup (%+v)", c.port, d)
		}
	}
	// The ranges must not have exploded into one entry per port.
	n := len(f.d.gens[f.d.liveGen()].slots[testEP])
	if n > 60 {
		t.Fatalf("%d policy entries for two ranges", n)
	}
	t.Logf("two overlapping port ranges -> %d LPM entries", n)
}

func TestProgWildcardPeer(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(identity.IDNone, 17, 53, 53, 11)))
	dns := pktSpec{src: worldIP, dst: podIP, proto: 17, sport: 5353, dport: 53}
	if got := f.toPod(t, dns); got != retPass {
		t.Fatalf("world to 53/udp: got %#x, want pass", got)
	}
	ev := f.oneEvent(t)
	if ev.Rule != 11 || ev.SrcIdentity != identity.IDWorld {
		t.Fatalf("event %+v, want rule 11 from world", ev)
	}
	ct, ok := ctLookup(t, f.d, uint32(testEP), dns)
	if !ok || ct.PeerId != uint32(identity.IDWorld) || ct.RuleId != 11 {
		t.Fatalf("conntrack %+v %v", ct, ok)
	}
	if got := f.toPod(t, pktSpec{src: clientIP, dst: podIP, proto: 6, sport: 5353, dport: 53}); got != retShot {
		t.Fatalf("53/tcp: got %#x, want drop", got)
	}
}

func TestProgIPv6(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 443, 443, 3)))
	syn := tcpSyn(client6, podIP6, 40000, 443)
	syn.ipv6HopByHop = true // the extension header walk
	if got := f.toPod(t, syn); got != retPass {
		t.Fatalf("v6 SYN: got %#x, want pass", got)
	}
	ct, ok := ctLookup(t, f.d, uint32(testEP), syn)
	if !ok || ct.RuleId != 3 {
		t.Fatalf("conntrack %+v %v", ct, ok)
	}
	ev := f.oneEvent(t)
	if ev.Src != client6 || ev.Dst != podIP6 || ev.SrcIdentity != clientID || ev.Rule != 3 {
		t.Fatalf("event %+v", ev)
	}
	if got := f.toPod(t, tcpSyn(client6, podIP6, 40000, 444)); got != retShot {
		t.Fatalf("v6 444: got %#x, want drop", got)
	}
	// Neighbour discovery passes under default deny while it stays on the
	// link: a link-scope destination and hop limit 255.
	solicited := netip.MustParseAddr("ff02::1:ff00:2")
	ns := pktSpec{src: client6, dst: solicited, proto: 58, icmpType: 135, hopLimit: 255}
	if got := f.toPod(t, ns); got != retPass {
		t.Fatalf("neighbour solicitation: got %#x, want pass", got)
	}
	// The same message to a routable address, or with a hop limit a
	// router would have lowered, is judged like any ICMPv6: it could
	// carry data past policy.
	for _, c := range []pktSpec{
		{src: client6, dst: podIP6, proto: 58, icmpType: 135, hopLimit: 255},
		{src: client6, dst: solicited, proto: 58, icmpType: 136, hopLimit: 64},
	} {
		if got := f.toPod(t, c); got != retShot {
			t.Fatalf("ND to %s, hop limit %d: got %#x, want drop (judged by policy)", c.dst, c.hopLimit, got)
		}
	}
	// So do MLD messages, sent from :: while an interface comes up, with
	// hop limit 1; an echo request from the same (unknown) source is
	// judged and dropped.
	for _, typ := range []uint8{130, 131, 132, 143} {
		mld := pktSpec{src: netip.IPv6Unspecified(), dst: netip.MustParseAddr("ff02::16"), proto: 58, icmpType: typ, hopLimit: 1}
		if got := f.toPod(t, mld); got != retPass {
			t.Fatalf("MLD type %d: got %#x, want pass", typ, got)
		}
		mld.hopLimit = 64
		if got := f.toPod(t, mld); got != retShot {
			t.Fatalf("MLD type %d with hop limit 64: got %#x, want drop", typ, got)
		}
	}
	echo := pktSpec{src: netip.IPv6Unspecified(), dst: podIP6, proto: 58, icmpType: 128}
	if got := f.toPod(t, echo); got != retShot {
		t.Fatalf("echo request from an unknown source: got %#x, want drop", got)
	}
}

func TestProgReplies(t *testing.T) {
	// Egress is default-deny, yet replies to an allowed ingress flow pass.
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(clientID, 1, 0, 65535, 8)))
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	if got := f.toPod(t, syn); got != retPass {
		t.Fatalf("SYN: %#x", got)
	}
	drainEvents(t, f.ev)
	synack := syn.reversed()
	synack.tcpFlags = tcpSYN | tcpACK
	if got := f.fromPod(t, synack); got != retPass {
		t.Fatalf("SYN-ACK from pod: got %#x, want pass", got)
	}
	f.noEvent(t)
	ct, _ := ctLookup(t, f.d, uint32(testEP), syn)
	if ct.State&(ctSynA|ctSynB) != ctSynA|ctSynB {
		t.Fatalf("conntrack state %#x, want both SYNs", ct.State)
	}
	// The pod's own new flow to the client is not a reply: denied.
	if got := f.fromPod(t, tcpSyn(podIP, clientIP, 40001, 80)); got != retShot {
		t.Fatalf("pod-initiated: got %#x, want drop", got)
	}
	drainEvents(t, f.ev)
	// ICMP echo: the reply reverses the request by identifier.
	req := pktSpec{src: clientIP, dst: podIP, proto: 1, icmpType: 8, icmpID: 77}
	if got := f.toPod(t, req); got != retPass {
		t.Fatalf("echo request: %#x", got)
	}
	rep := pktSpec{src: podIP, dst: clientIP, proto: 1, icmpType: 0, icmpID: 77}
	if got := f.fromPod(t, rep); got != retPass {
		t.Fatalf("echo reply: got %#x, want pass", got)
	}
	evs := drainEvents(t, f.ev)
	if len(evs) != 1 || evs[0].Type != EventFlowNew || evs[0].Rule != 8 || evs[0].ICMPType != 8 || evs[0].TCPFlags != 0 {
		t.Fatalf("events %+v, want one new flow by rule 8 of an echo request (ICMP type 8)", evs)
	}
	// Close: FIN from both sides ends the flow with one event.
	fin := syn
	fin.tcpFlags = tcpFIN | tcpACK
	f.toPod(t, fin)
	f.noEvent(t)
	finr := synack
	finr.tcpFlags = tcpFIN | tcpACK
	if got := f.fromPod(t, finr); got != retPass {
		t.Fatalf("FIN from pod: %#x", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventFlowEnd || !ev.IsReply || ev.Direction != policy.Ingress {
		t.Fatalf("end event %+v", ev)
	}
	ct, _ = ctLookup(t, f.d, uint32(testEP), syn)
	if ct.State&ctClosed == 0 {
		t.Fatalf("conntrack state %#x, want closed", ct.State)
	}
}

func TestProgTighteningMidConnection(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(otherID, 6, 80, 80, 12)))
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	f.toPod(t, syn)
	other := tcpSyn(otherIP, podIP, 40000, 80)
	f.toPod(t, other)
	drainEvents(t, f.ev)
	rev := f.d.Revision()

	// Unrelated change: still allowed, the entry moves to the new revision.
	st := f.apply(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(otherID, 6, 80, 80, 12), allowIn(clientID, 17, 53, 53, 20)))
	if st.Revision != rev+1 || st.Flipped != 1 {
		t.Fatalf("apply stats %+v", st)
	}
	ack := syn.reversed()
	ack.tcpFlags = tcpACK
	if got := f.fromPod(t, ack); got != retPass {
		t.Fatalf("after unrelated change: %#x", got)
	}
	if ct, _ := ctLookup(t, f.d, uint32(testEP), syn); ct.Revision != rev+1 {
		t.Fatalf("entry revision %d, want %d", ct.Revision, rev+1)
	}
	// An identical MapState changes nothing, not even the revision.
	if st := f.apply(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(otherID, 6, 80, 80, 12), allowIn(clientID, 17, 53, 53, 20))); st.Revision != rev+1 || st.PolicyWrites != 0 {
		t.Fatalf("no-op apply %+v", st)
	}

	// Tighten: the client loses port 80. Its established flow dies at its
	// next packet (a reply here); the other peer's flow lives on.
	f.apply(t, baseState(allowIn(otherID, 6, 80, 80, 12)))
	if got := f.fromPod(t, ack); got != retShot {
		t.Fatalf("established after tightening: got %#x, want drop", got)
	}
	if ct, ok := ctLookup(t, f.d, uint32(testEP), syn); !ok || ct.State&ctDenied == 0 {
		t.Fatalf("conntrack entry %+v (found %v), want a denied tombstone", ct, ok)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventDrop || ev.DropReason != DropPolicyRevised || !ev.IsReply {
		t.Fatalf("event %+v", ev)
	}
	// Both directions stay dropped, without more events: the server's
	// retransmission must not start a reverse "new" flow.
	if got := f.fromPod(t, ack); got != retShot {
		t.Fatalf("retransmission from pod: got %#x, want drop", got)
	}
	data := syn
	data.tcpFlags = tcpACK
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("client packet after tightening: got %#x, want drop", got)
	}
	f.noEvent(t)
	// Loosening again revives the flow.
	f.apply(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(otherID, 6, 80, 80, 12)))
	if got := f.toPod(t, data); got != retPass {
		t.Fatalf("after re-allowing: got %#x, want pass", got)
	}
	if ct, _ := ctLookup(t, f.d, uint32(testEP), syn); ct.State&ctDenied != 0 || ct.RuleId != 7 {
		t.Fatalf("revived entry %+v", ct)
	}
	drainEvents(t, f.ev)
	oack := other
	oack.tcpFlags = tcpACK
	if got := f.toPod(t, oack); got != retPass {
		t.Fatalf("other peer's flow after tightening: %#x", got)
	}
	if ct, _ := ctLookup(t, f.d, uint32(testEP), other); ct.RuleId != 12 {
		t.Fatalf("other flow entry %+v", ct)
	}
	// A new SYN on the tombstoned 5-tuple is judged as a new flow.
	f.apply(t, baseState(allowIn(otherID, 6, 80, 80, 12)))
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("after tightening again: got %#x, want drop", got)
	}
	drainEvents(t, f.ev)
	if got := f.toPod(t, syn); got != retShot {
		t.Fatalf("new SYN after tightening: got %#x, want drop", got)
	}
	if ev := f.oneEvent(t); ev.DropReason != DropPolicy {
		t.Fatalf("event %+v, want a new-flow drop", ev)
	}
}

func TestProgAudit(t *testing.T) {
	ms := baseState(allowIn(clientID, 6, 80, 80, 7))
	ms.Endpoints[testEP].Audit = true
	f := newProgFixture(t, ms)
	s := tcpSyn(clientIP, podIP, 40000, 81)
	if got := f.toPod(t, s); got != retPass {
		t.Fatalf("audit endpoint: got %#x, want pass", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventFlowNew || ev.Verdict != policy.VerdictAudit {
		t.Fatalf("event %+v, want new flow with verdict audit", ev)
	}
	if ct, ok := ctLookup(t, f.d, uint32(testEP), s); !ok || ct.Verdict != uint8(policy.VerdictAudit) {
		t.Fatalf("conntrack %+v %v", ct, ok)
	}

	// Per rule: an audit deny passes as AUDIT, the endpoint enforces.
	d := denyIn(clientID, 6, 90, 90, 4)
	d.Flags = policy.FlagAudit
	f.apply(t, baseState(allowIn(clientID, 6, 80, 80, 7), d))
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40000, 90)); got != retPass {
		t.Fatalf("audit rule: got %#x, want pass", got)
	}
	if ev := f.oneEvent(t); ev.Verdict != policy.VerdictAudit || ev.Rule != 4 {
		t.Fatalf("event %+v", ev)
	}
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40000, 91)); got != retShot {
		t.Fatalf("enforcing default: got %#x, want drop", got)
	}
	drainEvents(t, f.ev)

	// DefaultAudit: only audit policies select the endpoint.
	ms = baseState()
	ms.Endpoints[testEP].Default[policy.Ingress] = policy.DefaultAudit
	f.apply(t, ms)
	if got := f.toPod(t, tcpSyn(clientIP, podIP, 40000, 92)); got != retPass {
		t.Fatalf("default audit: got %#x, want pass", got)
	}
	if ev := f.oneEvent(t); ev.Verdict != policy.VerdictAudit {
		t.Fatalf("event %+v", ev)
	}
}

func TestProgHostIngress(t *testing.T) {
	ms := baseState()
	f := newProgFixture(t, ms)
	probe := tcpSyn(hostIP, podIP, 40000, 8080)
	if got := f.toPod(t, probe); got != retPass {
		t.Fatalf("host probe: got %#x, want pass", got)
	}
	ms = baseState()
	ms.AllowHostIngress = false
	f.apply(t, ms)
	probe.sport++
	if got := f.toPod(t, probe); got != retShot {
		t.Fatalf("host probe with host ingress off: got %#x, want drop", got)
	}
}

func TestProgUnmanagedAndNonIP(t *testing.T) {
	f := newProgFixture(t, nil) // ifindex known, no policy: unmanaged
	s := tcpSyn(clientIP, podIP, 40000, 81)
	if got := f.toPod(t, s); got != retPass {
		t.Fatalf("unmanaged: got %#x, want pass", got)
	}
	if _, ok := ctLookup(t, f.d, uint32(testEP), s); ok {
		t.Fatal("unmanaged endpoint got a conntrack entry")
	}
	f.apply(t, baseState())
	arp := make([]byte, 42)
	arp[12], arp[13] = 0x08, 0x06
	if got := run(t, f.d.objs.BulkheadToPod, arp); got != retPass {
		t.Fatalf("ARP: got %#x, want pass", got)
	}
	// Truncated TCP header on a managed endpoint.
	pkt := s.build()
	if got := run(t, f.d.objs.BulkheadToPod, pkt[:14+20+8]); got != retShot {
		t.Fatalf("truncated: got %#x, want drop", got)
	}
	c, _ := f.d.Counters()
	if c.ByDrop[DropMalformed].Packets != 1 {
		t.Fatalf("counters %+v", c)
	}
}

func TestProgFragmentsAndUnknownL4(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 17, 4789, 4789, 2), allowIn(clientID, 47, 0, 65535, 3)))
	for _, src := range []netip.Addr{clientIP, client6} {
		dst := podIP
		if src.Is6() {
			dst = podIP6
		}
		first := pktSpec{src: src, dst: dst, proto: 17, sport: 999, dport: 4789, fragFirst: true, fragID: 0x4242}
		if got := f.toPod(t, first); got != retPass {
			t.Fatalf("%v first fragment: %#x", src, got)
		}
		later := first
		later.fragFirst, later.fragLater = false, true
		if got := f.toPod(t, later); got != retPass {
			t.Fatalf("%v later fragment: %#x, want pass (ports from the first)", src, got)
		}
		// A later fragment whose first was not seen is judged with port 0.
		orphan := later
		orphan.fragID = 0x4343
		if got := f.toPod(t, orphan); got != retShot {
			t.Fatalf("%v orphan fragment: %#x, want drop", src, got)
		}
	}
	// GRE (47): no ports, judged under its protocol number with port 0.
	gre := pktSpec{src: clientIP, dst: podIP, proto: 47}
	if got := f.toPod(t, gre); got != retPass {
		t.Fatalf("GRE: %#x", got)
	}
	if got := f.toPod(t, pktSpec{src: otherIP, dst: podIP, proto: 47}); got != retShot {
		t.Fatalf("GRE from other: %#x", got)
	}
	// One VLAN tag and IPv4 options are parsed through.
	v := pktSpec{src: clientIP, dst: podIP, proto: 17, sport: 1000, dport: 4789, vlan: true, ipv4Options: 3}
	if got := f.toPod(t, v); got != retPass {
		t.Fatalf("vlan+options: %#x", got)
	}
	v.dport = 4790
	if got := f.toPod(t, v); got != retShot {
		t.Fatalf("vlan+options denied port: %#x", got)
	}
}

func TestProgRSTAndGC(t *testing.T) {
	d := newTestDatapath(t, Config{CTTimeoutOther: 50 * time.Millisecond, CTTimeoutClosing: 50 * time.Millisecond})
	bindTestEndpoint(t, d, uint32(testEP))
	if _, err := d.Apply(baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(clientID, 17, 53, 53, 8))); err != nil {
		t.Fatal(err)
	}
	ev := openEvents(t, d)
	f := &progFixture{d: d, ev: ev}
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	f.toPod(t, syn)
	rst := syn.reversed()
	rst.tcpFlags = tcpRST
	f.fromPod(t, rst)
	evs := drainEvents(t, ev)
	if len(evs) != 2 || evs[1].Type != EventFlowEnd {
		t.Fatalf("events %+v, want new then end", evs)
	}
	udp := pktSpec{src: clientIP, dst: podIP, proto: 17, sport: 5000, dport: 53}
	f.toPod(t, udp)
	drainEvents(t, ev)
	time.Sleep(100 * time.Millisecond)
	n, ended, err := d.GC()
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 || len(ended) != 1 || ended[0].Proto != 17 || ended[0].Src != clientIP || ended[0].DstPort != 53 ||
		ended[0].SrcIdentity != clientID || ended[0].DstIdentity != podID || ended[0].Rule != 8 {
		t.Fatalf("GC deleted %d, ended %+v; want 2 deleted, one UDP end", n, ended)
	}
	if ents, _ := d.Conntrack(); len(ents) != 0 {
		t.Fatalf("conntrack after GC: %+v", ents)
	}
}

const (
	ctSynA = 1 << 0
	ctSynB = 1 << 1
)

func TestProgEventsLostCounted(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7)))
	// Each run is a new flow (SYN+RST leaves a closed entry that the next
	// SYN replaces), so each emits an event; nobody reads the ring.
	s := tcpSyn(clientIP, podIP, 40000, 80)
	s.tcpFlags = tcpSYN | tcpRST
	if _, _, err := f.d.objs.BulkheadToPod.Benchmark(s.build(), 30000, nil); err != nil {
		t.Fatal(err)
	}
	c, err := f.d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	evs := drainEvents(t, f.ev)
	if c.EventsLost == 0 || uint64(len(evs))+c.EventsLost != 30000 {
		t.Fatalf("%d events read, %d lost; want some lost and 30000 in all", len(evs), c.EventsLost)
	}
}

// TestProgICMPErrorsOfTrackedFlows: an ICMP error about a flow conntrack
// tracks passes a default-deny endpoint (path MTU discovery keeps working);
// one about an unknown flow is judged, and dropped, like any new flow.
func TestProgICMPErrorsOfTrackedFlows(t *testing.T) {
	router4 := netip.MustParseAddr("192.0.2.1")
	router6 := netip.MustParseAddr("2001:db8::1")
	// Both directions are default-deny; the pod may open TCP 8443 to the
	// client, and only the client may reach its port 443.
	egress := policy.Entry{Direction: policy.Egress, Peer: clientID, Proto: 6, PortLo: 8443, PortHi: 8443,
		Action: policy.ActionAllow, Rule: 4}
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 443, 443, 3), egress))
	for _, c := range []struct {
		name           string
		pod, peer, rtr netip.Addr
		proto, typ     uint8
	}{
		{"v4 fragmentation needed", podIP, clientIP, router4, 1, 3},
		{"v4 time exceeded", podIP, clientIP, router4, 1, 11},
		{"v6 packet too big", podIP6, client6, router6, 58, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := tcpSyn(c.pod, c.peer, 40100, 8443)
			if got := f.fromPod(t, out); got != retPass {
				t.Fatalf("pod's own SYN: got %#x, want pass", got)
			}
			drainEvents(t, f.ev)
			related := pktSpec{src: c.rtr, dst: c.pod, proto: c.proto, icmpType: c.typ, icmpQuote: &out}
			if got := f.toPod(t, related); got != retPass {
				t.Fatalf("ICMP error about the pod's flow: got %#x, want pass", got)
			}
			unknown := out
			unknown.sport = 40101 // a flow conntrack never saw
			stray := pktSpec{src: c.rtr, dst: c.pod, proto: c.proto, icmpType: c.typ, icmpQuote: &unknown}
			if got := f.toPod(t, stray); got != retShot {
				t.Fatalf("ICMP error about an unknown flow: got %#x, want drop", got)
			}
			drainEvents(t, f.ev)
		})
	}
}

// TestConntrackBucketEviction fills one conntrack bucket and checks which
// flow a fifth one evicts: a closed flow first, then the flow seen longest
// ago; and that a flow's own slot is reused when it starts again.
func TestConntrackBucketEviction(t *testing.T) {
	d := newTestDatapath(t, Config{MaxConntrack: 64}) // 16 buckets
	bindTestEndpoint(t, d, uint32(testEP))
	if _, err := d.Apply(baseState(allowIn(clientID, 6, 80, 80, 7))); err != nil {
		t.Fatal(err)
	}
	f := &progFixture{d: d}
	seed := d.ctSeed()
	bucketOf := func(s pktSpec) uint32 {
		k4 := ct4KeyOf(ctKeyOf(uint32(testEP), s))
		return ctHash((*[5]uint32)(unsafe.Pointer(&k4))[:], seed) & (d.ct4.buckets - 1)
	}
	// Six flows that share the bucket of the first.
	var flows []pktSpec
	want := bucketOf(tcpSyn(clientIP, podIP, 1024, 80))
	for sport := uint16(1024); len(flows) < 6; sport++ {
		if s := tcpSyn(clientIP, podIP, sport, 80); bucketOf(s) == want {
			flows = append(flows, s)
		}
	}
	present := func() []bool {
		var out []bool
		for _, s := range flows {
			_, ok := ctLookup(t, d, uint32(testEP), s)
			out = append(out, ok)
		}
		return out
	}
	for _, s := range flows[:4] {
		if got := f.toPod(t, s); got != retPass {
			t.Fatalf("SYN: %#x", got)
		}
		time.Sleep(10 * time.Millisecond) // a later tick: a distinct last_seen
	}
	// Close flow 2, the youngest but one: it goes first all the same.
	rst := flows[2].reversed()
	rst.tcpFlags = tcpRST
	f.fromPod(t, rst)
	f.toPod(t, flows[4])
	if got := present(); !slices.Equal(got, []bool{true, true, false, true, true, false}) {
		t.Fatalf("after a fifth flow: present %v, want flow 2 (closed) evicted", got)
	}
	// The bucket is full of open flows: the sixth evicts flow 0, the oldest.
	f.toPod(t, flows[5])
	if got := present(); !slices.Equal(got, []bool{false, true, false, true, true, true}) {
		t.Fatalf("after a sixth flow: present %v, want flow 0 (oldest) evicted", got)
	}
	// A SYN on the closed-then-evicted flow 2 evicts the next oldest (1),
	// and an RST+SYN cycle of flow 3 keeps using flow 3's own slot.
	f.toPod(t, flows[2])
	if got := present(); !slices.Equal(got, []bool{false, false, true, true, true, true}) {
		t.Fatalf("flow 2 again: present %v", got)
	}
	rst = flows[3].reversed()
	rst.tcpFlags = tcpRST
	f.fromPod(t, rst)
	f.toPod(t, flows[3])
	if got := present(); !slices.Equal(got, []bool{false, false, true, true, true, true}) {
		t.Fatalf("flow 3 restarted: present %v", got)
	}
	if n, _ := d.Conntrack(); len(n) != 4 {
		t.Fatalf("conntrack holds %d entries, want the 4 of one bucket", len(n))
	}
}

// TestEndpointIDRange checks that IDs the ep_configs array cannot hold are
// refused with an error that says so, and change nothing.
func TestEndpointIDRange(t *testing.T) {
	d := newTestDatapath(t, Config{})
	ms := baseState(allowIn(clientID, 6, 80, 80, 7))
	ms.Endpoints[policy.EndpointID(4096)] = ms.Endpoints[testEP]
	rev := d.Revision()
	if _, err := d.Apply(ms); err == nil || !strings.Contains(err.Error(), "endpoint ID 4096 out of range") {
		t.Fatalf("apply with endpoint 4096: %v", err)
	}
	if d.Revision() != rev {
		t.Fatal("a refused apply bumped the revision")
	}
	if _, err := d.EndpointIdentity(testEP); err == nil {
		t.Fatal("a refused apply configured an endpoint")
	}
	if _, ok, err := d.IPCacheLookup(clientIP); err != nil || ok {
		t.Fatalf("a refused apply wrote the ipcache: %v %v", ok, err)
	}
}

// A TCP reply whose flow lost its conntrack entry (evicted, expired,
// flushed) and which its own direction denies is picked up when the
// direction its connection was opened in is allowed: the connection goes
// on instead of hanging behind a misleading POLICY_DENIED. Only TCP
// segments past the handshake are picked up, and only when that original
// direction is allowed.
func TestProgPicksUpLostReply(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 6, 80, 80, 7)))
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	if got := f.toPod(t, syn); got != retPass {
		t.Fatalf("SYN: %#x", got)
	}
	drainEvents(t, f.ev)
	if err := f.d.flushEndpointFlows(testEP); err != nil {
		t.Fatal(err)
	}
	// The server pushes data: egress is default-deny, the flow is gone.
	push := syn.reversed()
	push.tcpFlags = tcpACK
	if got := f.fromPod(t, push); got != retPass {
		t.Fatalf("server push after the entry was lost: got %#x, want pass (picked up)", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventFlowNew || !ev.PickedUp || !ev.IsReply || ev.Direction != policy.Ingress || ev.Rule != 7 ||
		ev.Verdict != policy.VerdictAllow || ev.SrcPort != 80 || ev.DstIdentity != clientID {
		t.Fatalf("pick-up event %+v", ev)
	}
	ct, ok := ctLookup(t, f.d, uint32(testEP), syn)
	if !ok || ct.Dir != uint8(policy.Ingress) || ct.Dport != 80 || ct.RuleId != 7 || ct.State&(ctSynA|ctSynB) != ctSynA|ctSynB {
		t.Fatalf("picked-up entry %+v (found %v), want the client's ingress flow to 80, established", ct, ok)
	}
	// It is tracked again in its original direction: both ways pass
	// without new events.
	data := syn
	data.tcpFlags = tcpACK
	if got := f.toPod(t, data); got != retPass {
		t.Fatalf("client data after the pick-up: %#x", got)
	}
	if got := f.fromPod(t, push); got != retPass {
		t.Fatalf("server data after the pick-up: %#x", got)
	}
	f.noEvent(t)

	drops := func(what string, s pktSpec, fromPod bool) {
		t.Helper()
		run := f.toPod
		if fromPod {
			run = f.fromPod
		}
		if got := run(t, s); got != retShot {
			t.Errorf("%s: got %#x, want drop", what, got)
		}
		if _, ok := ctLookup(t, f.d, uint32(testEP), s); ok {
			t.Errorf("%s: left a conntrack entry", what)
		}
		drainEvents(t, f.ev)
	}
	// Not picked up: a SYN or SYN-ACK (a handshake is never skipped), a
	// segment without ACK, UDP, and a reply whose original direction is
	// denied too (another port, another peer).
	synack := syn.reversed()
	synack.sport = 81
	synack.tcpFlags = tcpSYN | tcpACK
	drops("SYN-ACK from the pod's port 81", synack, true)
	bare := tcpSyn(podIP, clientIP, 80, 40001)
	bare.tcpFlags = tcpSYN
	drops("SYN from the pod's port 80", bare, true)
	rst := tcpSyn(podIP, clientIP, 80, 40002)
	rst.tcpFlags = tcpRST
	drops("RST without ACK", rst, true)
	drops("UDP from the pod's port 80", pktSpec{src: podIP, dst: clientIP, proto: 17, sport: 80, dport: 40003}, true)
	other := push
	other.sport = 81
	drops("ACK from the pod's port 81", other, true)
	toOther := push
	toOther.dst = otherIP
	drops("ACK from port 80 to a peer not allowed in", toOther, true)
	// Towards the pod the same holds the other way round: an ACK from a
	// peer's port the pod may not connect to is dropped.
	in := tcpSyn(clientIP, podIP, 443, 40004)
	in.tcpFlags = tcpACK
	drops("ACK into the pod from a port it may not reach", in, false)
}
