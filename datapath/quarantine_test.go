package datapath

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
)

func udpTo(src, dst netip.Addr, sport, dport uint16) pktSpec {
	return pktSpec{src: src, dst: dst, proto: 17, sport: sport, dport: dport}
}

// TestProgQuarantine: a quarantined endpoint drops every packet in and out,
// its established flows included, with DropQuarantined and the
// quarantine's number as the rule; only DNS to a listed resolver is left
// to policy, which still judges it. An Apply keeps the quarantine; lifting
// it gives the flows back.
func TestProgQuarantine(t *testing.T) {
	const qid = 77
	ms := baseState(allowIn(clientID, 6, 80, 80, 7),
		policy.Entry{Direction: policy.Egress, Peer: clientID, Proto: 17, PortLo: 53, PortHi: 53, Action: policy.ActionAllow, Rule: 8},
		policy.Entry{Direction: policy.Egress, Peer: clientID, Proto: 6, PortLo: 53, PortHi: 53, Action: policy.ActionAllow, Rule: 8},
		policy.Entry{Direction: policy.Egress, Peer: otherID, Proto: 17, PortLo: 53, PortHi: 53, Action: policy.ActionAllow, Rule: 9},
		policy.Entry{Direction: policy.Egress, Peer: clientID, Proto: 6, PortLo: 80, PortHi: 80, Action: policy.ActionAllow, Rule: 10})
	f := newProgFixture(t, ms)
	syn := tcpSyn(clientIP, podIP, 40000, 80)
	ack := syn
	ack.tcpFlags = tcpACK
	if got := f.toPod(t, syn); got != retPass {
		t.Fatalf("allowed SYN: got %#x, want pass", got)
	}
	drainEvents(t, f.ev)

	if err := f.d.SetQuarantine(testEP, qid); err != nil {
		t.Fatal(err)
	}
	if got := f.d.Quarantined(testEP); got != qid {
		t.Fatalf("Quarantined = %d, want %d", got, qid)
	}
	if got := f.toPod(t, ack); got != retShot {
		t.Fatalf("established flow's packet to a quarantined pod: got %#x, want drop", got)
	}
	ev := f.oneEvent(t)
	if ev.Type != EventDrop || ev.DropReason != DropQuarantined || ev.Rule != qid || ev.Direction != policy.Ingress ||
		ev.Src != clientIP || ev.Dst != podIP || ev.SrcIdentity != clientID || ev.DstIdentity != podID {
		t.Fatalf("quarantine drop event %+v", ev)
	}
	if got := f.fromPod(t, ack.reversed()); got != retShot {
		t.Fatalf("established flow's reply from a quarantined pod: got %#x, want drop", got)
	}
	f.noEvent(t) // one event per flow and drop_event_interval
	if got := f.fromPod(t, tcpSyn(podIP, clientIP, 42000, 80)); got != retShot {
		t.Fatalf("new flow that policy allows, from a quarantined pod: got %#x, want drop", got)
	}
	ev = f.oneEvent(t)
	if ev.DropReason != DropQuarantined || ev.Direction != policy.Egress || ev.SrcIdentity != podID || ev.DstIdentity != clientID {
		t.Fatalf("egress quarantine drop event %+v", ev)
	}
	// DNS with no resolver listed: dropped like the rest.
	query := udpTo(podIP, clientIP, 41000, 53)
	if got := f.fromPod(t, query); got != retShot {
		t.Fatalf("DNS from a quarantined pod, no resolver listed: got %#x, want drop", got)
	}
	if err := f.d.SetQuarantineDNS([]netip.Addr{clientIP, worldIP}); err != nil {
		t.Fatal(err)
	}
	drainEvents(t, f.ev)
	cases := []struct {
		name string
		pkt  pktSpec
		out  bool
		want uint32
		why  DropReason
	}{
		{"UDP query to a resolver", udpTo(podIP, clientIP, 41001, 53), true, retPass, 0},
		{"its answer", udpTo(clientIP, podIP, 53, 41001), false, retPass, 0},
		{"TCP query to a resolver", tcpSyn(podIP, clientIP, 41002, 53), true, retPass, 0},
		{"UDP 53 to another address", udpTo(podIP, otherIP, 41003, 53), true, retShot, DropQuarantined},
		{"a resolver on another port", tcpSyn(podIP, clientIP, 41004, 80), true, retShot, DropQuarantined},
		{"port 53 from a resolver, not an answer", udpTo(clientIP, podIP, 41005, 53), false, retShot, DropQuarantined},
		{"a resolver that policy does not allow", udpTo(podIP, worldIP, 41006, 53), true, retShot, DropPolicy},
	}
	for _, c := range cases {
		var got uint32
		if c.out {
			got = f.fromPod(t, c.pkt)
		} else {
			got = f.toPod(t, c.pkt)
		}
		if got != c.want {
			t.Errorf("%s: got %#x, want %#x", c.name, got, c.want)
		}
		evs := drainEvents(t, f.ev)
		if c.why != 0 && (len(evs) != 1 || evs[0].DropReason != c.why) {
			t.Errorf("%s: events %+v, want one drop for %s", c.name, evs, c.why)
		}
	}
	// An apply does not lift it.
	ms.Revision = 2
	f.apply(t, ms)
	if got := f.toPod(t, ack); got != retShot {
		t.Fatalf("after an apply: got %#x, want the quarantine to hold", got)
	}
	if err := f.d.SetQuarantineDNS(nil); err != nil {
		t.Fatal(err)
	}
	if got, err := f.d.QuarantineDNS(); err != nil || len(got) != 0 {
		t.Fatalf("resolvers after clearing: %v %v", got, err)
	}
	if err := f.d.SetQuarantine(testEP, 0); err != nil {
		t.Fatal(err)
	}
	if got := f.toPod(t, ack); got != retPass {
		t.Fatalf("after release: established packet got %#x, want pass", got)
	}
	if q := f.d.QuarantinedEndpoints(); len(q) != 0 {
		t.Fatalf("quarantined endpoints after release: %v", q)
	}
	if err := f.d.SetQuarantine(0, 1); err == nil {
		t.Fatal("endpoint ID 0 accepted")
	}
	if err := f.d.SetQuarantine(MaxEndpointID+1, 1); err == nil {
		t.Fatal("endpoint ID past the table accepted")
	}
}

// TestIntegrationQuarantine: with real traffic, a quarantine cuts an open
// connection and refuses new ones both ways; it survives a re-open of the
// pins (a restarted agent); release restores traffic; detaching the
// endpoint lifts its quarantine, so that its ID starts clean for the next
// pod.
func TestIntegrationQuarantine(t *testing.T) {
	tp, d := servedPair(t)
	client, server := tp.pods[0], tp.pods[1]
	keep, err := dialTCP(client, server.ip4, 8080)
	mustWork(t, "dial", err)
	defer keep.Close()
	mustWork(t, "echo before", echo(keep, "one"))

	if err := d.SetQuarantine(client.ep, 5); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "echo on the open connection while quarantined", echo(keep, "two"))
	mustFail(t, "new TCP while quarantined", tcpWorks(client, server.ip4, 8080))
	mustFail(t, "new TCP over IPv6 while quarantined", tcpWorks(client, server.ip6, 8080))
	mustFail(t, "UDP while quarantined", udpWorks(client, server.ip4, 5353))
	mustFail(t, "ping while quarantined", pingWorks(client, server.ip4))

	// A restarted agent re-opens the pins: the quarantine is still there.
	d2, err := New(Config{BPFFS: d.cfg.BPFFS})
	if err != nil {
		t.Fatal(err)
	}
	if got := d2.Quarantined(client.ep); got != 5 {
		t.Errorf("after re-opening the pins: quarantine %d, want 5", got)
	}
	d2.Close()
	mustFail(t, "new TCP after the re-open", tcpWorks(client, server.ip4, 8080))

	if err := d.SetQuarantine(client.ep, 0); err != nil {
		t.Fatal(err)
	}
	mustWork(t, "new TCP after release", tcpWorks(client, server.ip4, 8080))
	mustWork(t, "ping after release", pingWorks(client, server.ip4))

	// The server's quarantine cuts it off from the client too.
	if err := d.SetQuarantine(server.ep, 6); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "TCP to a quarantined server", tcpWorks(client, server.ip4, 8080))
	if err := d.Detach(tp.endpoint(server)); err != nil {
		t.Fatal(err)
	}
	if got := d.Quarantined(server.ep); got != 0 {
		t.Errorf("a detached endpoint's quarantine stayed: %d", got)
	}
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.ByDrop[DropQuarantined].Packets == 0 {
		t.Error("no packet counted as dropped by quarantine")
	}
}
