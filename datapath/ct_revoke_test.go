package datapath

import (
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/bulkhead-io/bulkhead/policy"
)

// egressAllTCPTo allows the pod to open TCP to peer on any port.
func egressAllTCPTo(peer policy.Entry) policy.Entry {
	peer.Direction, peer.Proto, peer.PortLo, peer.PortHi = policy.Egress, 6, 0, 65535
	peer.Action, peer.Rule = policy.ActionAllow, 30
	return peer
}

// TestProgRevokedStaysRevoked: the client's allow to pod:80 is revoked
// mid-connection while the pod may still open TCP to the client. The
// revoked connection must stay dropped in both directions as long as its
// ends keep sending, however long that lasts past the tombstone's timeout
// (set low here): before the fix the tombstone expired after the closing
// timeout, the server's next retransmission was judged as a new egress
// flow and allowed, and the client's packets passed as its replies. It
// ends only with a new handshake from the original client, judged as a new
// flow, or with policy allowing it again.
func TestProgRevokedStaysRevoked(t *testing.T) {
	const timeout = 200 * time.Millisecond
	d := newTestDatapath(t, Config{CTTimeoutClosing: timeout, CTTimeoutDenied: timeout})
	bindTestEndpoint(t, d, uint32(testEP))
	f := &progFixture{d: d, ev: openEvents(t, d)}
	egress := egressAllTCPTo(policy.Entry{Peer: clientID})
	allowed := baseState(allowIn(clientID, 6, 80, 80, 7), egress)
	f.apply(t, allowed)

	syn := tcpSyn(clientIP, podIP, 40000, 80)
	synack := syn.reversed()
	synack.tcpFlags = tcpSYN | tcpACK
	data := syn
	data.tcpFlags = tcpACK
	retrans := synack
	retrans.tcpFlags = tcpACK
	for i, s := range []struct {
		p     pktSpec
		toPod bool
	}{{syn, true}, {synack, false}, {data, true}} {
		if got := f.send(t, s.p, s.toPod); got != retPass {
			t.Fatalf("handshake packet %d: got %#x, want pass", i, got)
		}
	}

	f.apply(t, baseState(egress)) // revoke
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("client data after the revocation: got %#x, want drop", got)
	}
	// Both ends retransmit for five timeouts, never silent for more than
	// a third of one.
	deadline := time.Now().Add(5 * timeout)
	for i := 0; time.Now().Before(deadline); i++ {
		time.Sleep(timeout / 3)
		if got := f.fromPod(t, retrans); got != retShot {
			t.Fatalf("server retransmission %d, %v after the revocation: got %#x, want drop", i, 5*timeout-time.Until(deadline), got)
		}
		if got := f.toPod(t, data); got != retShot {
			t.Fatalf("client data %d, %v after the revocation: got %#x, want drop", i, 5*timeout-time.Until(deadline), got)
		}
	}
	// A SYN from the server's side is no new handshake of this flow.
	podSyn := synack
	podSyn.tcpFlags = tcpSYN
	if got := f.fromPod(t, podSyn); got != retShot {
		t.Fatalf("SYN from the server on the revoked 5-tuple: got %#x, want drop", got)
	}
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("client data after the server's SYN: got %#x, want drop", got)
	}
	if ct, ok := ctLookup(t, d, uint32(testEP), syn); !ok || ct.State&ctDenied == 0 {
		t.Fatalf("conntrack entry %+v (found %v), want the tombstone", ct, ok)
	}
	// Policy allows it again: the flow passes again.
	f.apply(t, allowed)
	if got := f.fromPod(t, retrans); got != retPass {
		t.Fatalf("server retransmission after re-allowing: got %#x, want pass", got)
	}
	if ct, _ := ctLookup(t, d, uint32(testEP), syn); ct.State&ctDenied != 0 || ct.Dir != uint8(policy.Ingress) || ct.RuleId != 7 {
		t.Fatalf("revived entry %+v, want the client's ingress flow by rule 7", ct)
	}
	// Revoked again; the client's new handshake is a new flow, judged (and
	// denied) as one.
	f.apply(t, baseState(egress))
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("client data after the second revocation: got %#x, want drop", got)
	}
	drainEvents(t, f.ev)
	if got := f.toPod(t, syn); got != retShot {
		t.Fatalf("client's new SYN while revoked: got %#x, want drop", got)
	}
	if ev := f.oneEvent(t); ev.Type != EventDrop || ev.DropReason != DropPolicy {
		t.Fatalf("event %+v, want a new flow's drop", ev)
	}
}

// send passes s to the pod (toPod) or from it.
func (f *progFixture) send(t *testing.T, s pktSpec, toPod bool) uint32 {
	t.Helper()
	if toPod {
		return f.toPod(t, s)
	}
	return f.fromPod(t, s)
}

// TestConntrackTombstonesEvictedLast: a bucket holds a tombstone and three
// live flows; new flows that hash there evict the live flows, oldest first,
// and never the tombstone, which would let the revoked connection's next
// packet start over as a new flow (before the fix the tombstone went
// first, so any burst of new flows revived it).
func TestConntrackTombstonesEvictedLast(t *testing.T) {
	d := newTestDatapath(t, Config{MaxConntrack: 64}) // 16 buckets
	bindTestEndpoint(t, d, uint32(testEP))
	egress := egressAllTCPTo(policy.Entry{Peer: clientID})
	f := &progFixture{d: d}
	f.apply(t, baseState(allowIn(clientID, 6, 80, 80, 7), allowIn(otherID, 6, 80, 80, 8), egress))
	seed := d.ctSeed()
	bucketOf := func(s pktSpec) uint32 {
		k4 := ct4KeyOf(ctKeyOf(uint32(testEP), s))
		return ctHash((*[5]uint32)(unsafe.Pointer(&k4))[:], seed) & (d.ct4.buckets - 1)
	}
	// The revoked flow is the client's, the others are from otherIP.
	revoked := tcpSyn(clientIP, podIP, 40000, 80)
	want := bucketOf(revoked)
	var flows []pktSpec
	for sport := uint16(1024); len(flows) < 7; sport++ {
		if s := tcpSyn(otherIP, podIP, sport, 80); bucketOf(s) == want {
			flows = append(flows, s)
		}
	}
	if got := f.toPod(t, revoked); got != retPass {
		t.Fatalf("client SYN: %#x", got)
	}
	for _, s := range flows[:3] {
		time.Sleep(10 * time.Millisecond) // a later tick: a distinct last_seen
		if got := f.toPod(t, s); got != retPass {
			t.Fatalf("SYN: %#x", got)
		}
	}
	f.apply(t, baseState(allowIn(otherID, 6, 80, 80, 8), egress))
	data := revoked
	data.tcpFlags = tcpACK
	if got := f.toPod(t, data); got != retShot {
		t.Fatalf("client data after the revocation: got %#x, want drop", got)
	}
	present := func() []bool {
		out := []bool{}
		if ct, ok := ctLookup(t, d, uint32(testEP), revoked); ok && ct.State&ctDenied != 0 {
			out = append(out, true)
		} else {
			out = append(out, false)
		}
		for _, s := range flows {
			_, ok := ctLookup(t, d, uint32(testEP), s)
			out = append(out, ok)
		}
		return out
	}
	// The tombstone is not the oldest entry of the bucket (the drop just
	// now refreshed it), but it is the only one that must not go.
	for i, s := range flows[3:] {
		time.Sleep(10 * time.Millisecond)
		if got := f.toPod(t, s); got != retPass {
			t.Fatalf("new flow %d: %#x", 3+i, got)
		}
		if got := present(); !got[0] {
			t.Fatalf("after new flow %d: present %v, the tombstone was evicted", 3+i, got)
		}
	}
	if got := present(); !slices.Equal(got, []bool{true, false, false, false, false, true, true, true}) {
		t.Fatalf("present %v: want the tombstone and the three newest flows", got)
	}
	if got := f.fromPod(t, data.reversed()); got != retShot {
		t.Fatalf("server packet of the revoked flow after the burst: got %#x, want drop", got)
	}
}
