package datapath

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
)

// Frames for source validation, built by hand: pktSpec makes IP packets
// with a fixed MAC and hop limit.

var (
	otherMAC  = net.HardwareAddr{2, 0, 0, 0, 0, 9}
	linkLocal = netip.MustParseAddr("fe80::2")
	gateway6  = netip.MustParseAddr("fd00:213::fe")
	allNodes  = netip.MustParseAddr("ff02::1")
	allRouter = netip.MustParseAddr("ff02::2")
	mldv2     = netip.MustParseAddr("ff02::16")
	// solicitedOf is the solicited-node group of podIP6 (fd00:213::1).
	solicitedPod = netip.MustParseAddr("ff02::1:ff00:1")
)

// frame is an Ethernet frame from src MAC with the given tags, ethertype
// and payload.
func frame(src net.HardwareAddr, ethType uint16, payload []byte, tags ...uint16) []byte {
	b := make([]byte, 12, 64)
	copy(b[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(b[6:12], src)
	for _, tpid := range tags {
		b = binary.BigEndian.AppendUint16(b, tpid)
		b = binary.BigEndian.AppendUint16(b, 42)
	}
	b = binary.BigEndian.AppendUint16(b, ethType)
	b = append(b, payload...)
	for len(b) < 60 {
		b = append(b, 0) // Ethernet padding, after the IP payload
	}
	return b
}

// withMAC replaces a pktSpec frame's Ethernet source.
func withMAC(pkt []byte, mac net.HardwareAddr) []byte {
	out := append([]byte{}, pkt...)
	copy(out[6:12], mac)
	return out
}

// withTags inserts 802.1Q/AD tags after the MAC addresses of a frame.
func withTags(pkt []byte, tags ...uint16) []byte {
	out := append([]byte{}, pkt[:12]...)
	for _, tpid := range tags {
		out = binary.BigEndian.AppendUint16(out, tpid)
		out = binary.BigEndian.AppendUint16(out, 42)
	}
	return append(out, pkt[12:]...)
}

// arpFrame is an Ethernet/IPv4 ARP packet.
func arpFrame(ethSrc, sha net.HardwareAddr, op uint16, spa, tpa netip.Addr) []byte {
	p := make([]byte, 28)
	binary.BigEndian.PutUint16(p[0:], 1)
	binary.BigEndian.PutUint16(p[2:], 0x0800)
	p[4], p[5] = 6, 4
	binary.BigEndian.PutUint16(p[6:], op)
	copy(p[8:14], sha)
	s, t := spa.As4(), tpa.As4()
	copy(p[14:18], s[:])
	copy(p[24:28], t[:])
	return frame(ethSrc, 0x0806, p)
}

// icmp6Frame is an ICMPv6 message (type, code, checksum, 4 reserved bytes,
// body) from src to
// dst with the hop limit; hbh adds a hop-by-hop header with a router alert,
// as MLD carries.
func icmp6Frame(mac net.HardwareAddr, src, dst netip.Addr, hop, typ uint8, body []byte, hbh bool) []byte {
	l4 := append([]byte{typ, 0, 0, 0, 0, 0, 0, 0}, body...)
	var ext []byte
	nh := uint8(58)
	if hbh {
		ext = []byte{58, 0, 5, 2, 0, 0, 1, 0} // router alert (MLD), PadN
		nh = 0
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
	ip[6] = nh
	ip[7] = hop
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return frame(mac, 0x86DD, append(append(ip, ext...), l4...))
}

// ndBody is an NS/NA body after the flags/reserved word: the target and
// options.
func ndBody(target netip.Addr, opts ...[]byte) []byte {
	t := target.As16()
	b := append([]byte{}, t[:]...)
	for _, o := range opts {
		b = append(b, o...)
	}
	return b
}

// llOpt is a source (1) or target (2) link-layer address option.
func llOpt(typ uint8, mac net.HardwareAddr) []byte { return append([]byte{typ, 1}, mac...) }

// nonceOpt is the nonce option Linux puts into DAD solicitations.
var nonceOpt = []byte{14, 1, 1, 2, 3, 4, 5, 6}

func mldReport(src, dst netip.Addr, hop uint8) []byte {
	// MLDv2 report: reserved and a record count of 0 are icmp6Frame's
	// 4 reserved bytes.
	return icmp6Frame(testPodMAC, src, dst, hop, 143, nil, true)
}

func udp4(src, dst netip.Addr, sport, dport uint16) []byte {
	return pktSpec{src: src, dst: dst, proto: 17, sport: sport, dport: dport}.build()
}

func TestSourceValidation(t *testing.T) {
	// The pod may send anything to anyone, so every refusal below is source
	// validation's, not policy's.
	ms := baseState()
	ms.Endpoints[testEP].Default = [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow}
	d := newTestDatapath(t, Config{})
	bindTestEndpoint(t, d, uint32(testEP))
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	f := &progFixture{d: d, ev: openEvents(t, d)}
	bcast := netip.MustParseAddr("255.255.255.255")
	zero4 := netip.IPv4Unspecified()
	zero6 := netip.IPv6Unspecified()
	ipv6Own := pktSpec{src: podIP6, dst: client6, proto: 17, sport: 5000, dport: 53}.build()

	cases := []struct {
		name   string
		pkt    []byte
		reason DropReason // DropNone: passes
		// src is the address the drop event reports (the claimed one).
		src netip.Addr
	}{
		{"ipv4 own", udp4(podIP, clientIP, 5000, 53), DropNone, podIP},
		{"ipv4 other pod", udp4(clientIP, otherIP, 5000, 82), DropInvalidSource, clientIP},
		{"ipv4 gateway/node", udp4(hostIP, clientIP, 5000, 82), DropInvalidSource, hostIP},
		{"ipv4 unassigned", udp4(worldIP, clientIP, 5000, 82), DropInvalidSource, worldIP},
		{"ipv4 tcp other pod", tcpSyn(clientIP, otherIP, 40000, 80).build(), DropInvalidSource, clientIP},
		{"dhcp discover", udp4(zero4, bcast, 68, 67), DropNone, zero4},
		{"0.0.0.0 unicast", udp4(zero4, hostIP, 68, 67), DropInvalidSource, zero4},
		{"0.0.0.0 other port", udp4(zero4, bcast, 68, 82), DropInvalidSource, zero4},
		{"ipv4 own, other MAC", withMAC(udp4(podIP, clientIP, 5000, 53), otherMAC), DropInvalidSourceMAC, podIP},
		{"ipv6 own", ipv6Own, DropNone, podIP6},
		{"ipv6 other pod", pktSpec{src: client6, dst: podIP6, proto: 17, sport: 5000, dport: 82}.build(), DropInvalidSource, client6},
		{"ipv6 gateway", pktSpec{src: gateway6, dst: client6, proto: 17, sport: 5000, dport: 82}.build(), DropInvalidSource, gateway6},
		{"ipv6 link-local udp", pktSpec{src: linkLocal, dst: client6, proto: 17, sport: 5000, dport: 82}.build(), DropInvalidSource, linkLocal},
		{"ipv6 :: udp", pktSpec{src: zero6, dst: client6, proto: 17, sport: 5000, dport: 82}.build(), DropInvalidSource, zero6},
		{"ipv6 own, other MAC", withMAC(ipv6Own, otherMAC), DropInvalidSourceMAC, podIP6},

		{"dad ns", icmp6Frame(testPodMAC, zero6, solicitedPod, 255, 135, ndBody(podIP6, nonceOpt), false), DropNone, zero6},
		{"ns link-local", icmp6Frame(testPodMAC, linkLocal, solicitedPod, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), DropNone, linkLocal},
		{"ns nud own global", icmp6Frame(testPodMAC, podIP6, client6, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), DropNone, podIP6},
		{"ns hop limit 64", icmp6Frame(testPodMAC, linkLocal, solicitedPod, 64, 135, ndBody(client6, llOpt(1, testPodMAC)), false), DropForbiddenICMPv6, linkLocal},
		{"ns other MAC option", icmp6Frame(testPodMAC, linkLocal, solicitedPod, 255, 135, ndBody(client6, llOpt(1, otherMAC)), false), DropInvalidSourceMAC, linkLocal},
		{"ns other pod source", icmp6Frame(testPodMAC, client6, solicitedPod, 255, 135, ndBody(gateway6, llOpt(1, testPodMAC)), false), DropInvalidSource, client6},
		{"ns link-local to global (a reachability probe)", icmp6Frame(testPodMAC, linkLocal, client6, 255, 135, ndBody(client6), false), DropNone, linkLocal},
		{"ns :: to unicast", icmp6Frame(testPodMAC, zero6, client6, 255, 135, ndBody(podIP6), false), DropForbiddenICMPv6, zero6},
		{"na own target", icmp6Frame(testPodMAC, linkLocal, allNodes, 255, 136, ndBody(podIP6, llOpt(2, testPodMAC)), false), DropNone, linkLocal},
		{"na link-local target", icmp6Frame(testPodMAC, linkLocal, linkLocal, 255, 136, ndBody(linkLocal, llOpt(2, testPodMAC)), false), DropNone, linkLocal},
		{"na other pod target", icmp6Frame(testPodMAC, linkLocal, allNodes, 255, 136, ndBody(client6, llOpt(2, testPodMAC)), false), DropInvalidSource, linkLocal},
		{"na gateway target", icmp6Frame(testPodMAC, podIP6, gateway6, 255, 136, ndBody(gateway6, llOpt(2, testPodMAC)), false), DropInvalidSource, podIP6},
		{"na other MAC option", icmp6Frame(testPodMAC, linkLocal, allNodes, 255, 136, ndBody(podIP6, llOpt(2, otherMAC)), false), DropInvalidSourceMAC, linkLocal},
		{"na from ::", icmp6Frame(testPodMAC, zero6, allNodes, 255, 136, ndBody(podIP6), false), DropForbiddenICMPv6, zero6},
		{"rs", icmp6Frame(testPodMAC, linkLocal, allRouter, 255, 133, llOpt(1, testPodMAC), false), DropNone, linkLocal},
		{"ra", icmp6Frame(testPodMAC, linkLocal, allNodes, 255, 134, make([]byte, 8), false), DropForbiddenICMPv6, linkLocal},
		{"redirect", icmp6Frame(testPodMAC, linkLocal, linkLocal, 255, 137, make([]byte, 32), false), DropForbiddenICMPv6, linkLocal},
		{"mld report", mldReport(linkLocal, mldv2, 1), DropNone, linkLocal},
		{"mld report from ::", mldReport(zero6, mldv2, 1), DropNone, zero6},
		{"mld hop limit 255", mldReport(linkLocal, mldv2, 255), DropForbiddenICMPv6, linkLocal},
		{"mld to unicast", mldReport(linkLocal, linkLocal, 1), DropForbiddenICMPv6, linkLocal},
		{"mld other pod source", mldReport(client6, mldv2, 1), DropInvalidSource, client6},
		{"mld query", icmp6Frame(testPodMAC, linkLocal, allNodes, 1, 130, make([]byte, 20), true), DropForbiddenICMPv6, linkLocal},
		{"dad ns for another pod's address", icmp6Frame(testPodMAC, zero6, solicitedPod, 255, 135, ndBody(client6, nonceOpt), false), DropInvalidSource, zero6},

		{"arp own", arpFrame(testPodMAC, testPodMAC, 1, podIP, hostIP), DropNone, podIP},
		{"arp probe", arpFrame(testPodMAC, testPodMAC, 1, zero4, podIP), DropNone, zero4},
		{"arp reply from 0.0.0.0", arpFrame(testPodMAC, testPodMAC, 2, zero4, hostIP), DropInvalidSource, zero4},
		{"gratuitous arp other pod", arpFrame(testPodMAC, testPodMAC, 1, clientIP, clientIP), DropInvalidSource, clientIP},
		{"gratuitous arp other pod ip", arpFrame(testPodMAC, testPodMAC, 2, clientIP, clientIP), DropInvalidSource, clientIP},
		{"arp reply gateway", arpFrame(testPodMAC, testPodMAC, 2, hostIP, clientIP), DropInvalidSource, hostIP},
		{"arp other sender MAC", arpFrame(testPodMAC, otherMAC, 1, podIP, hostIP), DropInvalidSourceMAC, podIP},
		{"arp other Ethernet MAC", arpFrame(otherMAC, testPodMAC, 1, podIP, hostIP), DropInvalidSourceMAC, netip.Addr{}},

		{"lldp", frame(testPodMAC, 0x88cc, make([]byte, 20)), DropUnsupportedL2, netip.Addr{}},
		{"802.3 length", frame(testPodMAC, 0x0040, make([]byte, 64)), DropUnsupportedL2, netip.Addr{}},
		{"vlan own", withTags(udp4(podIP, clientIP, 5000, 53), 0x8100), DropNone, podIP},
		{"vlan other pod", withTags(udp4(clientIP, otherIP, 5000, 82), 0x8100), DropInvalidSource, clientIP},
		{"qinq own", withTags(udp4(podIP, clientIP, 5000, 53), 0x88a8, 0x8100), DropUnsupportedL2, podIP},
		{"qinq other pod", withTags(udp4(clientIP, otherIP, 5000, 82), 0x88a8, 0x8100), DropUnsupportedL2, clientIP},
		{"three tags", withTags(udp4(podIP, clientIP, 5000, 53), 0x88a8, 0x8100, 0x8100), DropMalformed, netip.Addr{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			drainEvents(t, f.ev)
			forgetDropEvents(t, f.d)
			before, err := f.d.Counters()
			if err != nil {
				t.Fatal(err)
			}
			got := run(t, f.d.objs.BulkheadFromPod, c.pkt)
			after, err := f.d.Counters()
			if err != nil {
				t.Fatal(err)
			}
			evs := drainEvents(t, f.ev)
			if c.reason == DropNone {
				if got != retPass {
					t.Fatalf("verdict %#x, want pass; counters %+v", got, after.ByDrop)
				}
				for _, ev := range evs {
					if ev.Type == EventDrop {
						t.Fatalf("drop event %+v for a frame that passed", ev)
					}
				}
				return
			}
			if got != retShot {
				t.Fatalf("verdict %#x, want drop (%s)", got, c.reason)
			}
			if d := after.ByDrop[c.reason].Packets - before.ByDrop[c.reason].Packets; d != 1 {
				t.Fatalf("%s counter went up by %d, want 1", c.reason, d)
			}
			if len(evs) != 1 {
				t.Fatalf("got %d events, want one drop: %+v", len(evs), evs)
			}
			ev := evs[0]
			if ev.Type != EventDrop || ev.DropReason != c.reason || ev.Verdict != policy.VerdictDeny ||
				ev.Endpoint != testEP || ev.Direction != policy.Egress || ev.SrcIdentity != podID {
				t.Fatalf("event %+v, want a %s drop of endpoint %d (identity %d)", ev, c.reason, testEP, podID)
			}
			if c.src.IsValid() && ev.Src.Unmap() != c.src {
				t.Fatalf("event source %v, want the claimed %v", ev.Src, c.src)
			}
		})
	}
}

// TestSourceValidationRateLimitedEvents: a pod that floods forged packets
// is counted packet by packet but reported once per interval.
func TestSourceValidationRateLimitedEvents(t *testing.T) {
	f := newProgFixture(t, baseState())
	forged := udp4(clientIP, otherIP, 5000, 82)
	for range 3 {
		if got := run(t, f.d.objs.BulkheadFromPod, forged); got != retShot {
			t.Fatalf("forged: %#x, want drop", got)
		}
	}
	if ev := f.oneEvent(t); ev.DropReason != DropInvalidSource {
		t.Fatalf("event %+v", ev)
	}
	c, err := f.d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.ByDrop[DropInvalidSource].Packets != 3 || c.ByVerdict[policy.VerdictDeny].Packets != 3 {
		t.Fatalf("counters %+v", c)
	}
}

// TestSourceValidationFailsClosed: an endpoint the programs attribute but
// whose addresses were never written (or were cleared) sends nothing, even
// when it is unmanaged (identity 0, where policy passes everything).
func TestSourceValidationFailsClosed(t *testing.T) {
	f := newProgFixture(t, nil)
	if got := run(t, f.d.objs.BulkheadFromPod, udp4(podIP, clientIP, 5000, 53)); got != retPass {
		t.Fatalf("registered, unmanaged: %#x, want pass", got)
	}
	if got := run(t, f.d.objs.BulkheadFromPod, udp4(clientIP, otherIP, 5000, 53)); got != retShot {
		t.Fatalf("forged from an unmanaged endpoint: %#x, want drop", got)
	}
	if err := f.d.clearAddrs(testEP); err != nil {
		t.Fatal(err)
	}
	for name, pkt := range map[string][]byte{
		"ipv4": udp4(podIP, clientIP, 5000, 53),
		"arp":  arpFrame(testPodMAC, testPodMAC, 1, podIP, hostIP),
		"dad":  icmp6Frame(testPodMAC, netip.IPv6Unspecified(), solicitedPod, 255, 135, ndBody(podIP6), false),
	} {
		if got := run(t, f.d.objs.BulkheadFromPod, pkt); got != retShot {
			t.Fatalf("%s from an endpoint without addresses: %#x, want drop", name, got)
		}
	}
	// Towards the pod nothing changes: its ingress is policy's business.
	if got := run(t, f.d.objs.BulkheadToPod, udp4(clientIP, podIP, 5000, 53)); got != retPass {
		t.Fatalf("to the pod: %#x, want pass", got)
	}
}

// TestQinQJudgedToPod: a double-tagged frame towards the pod is parsed and
// judged by policy; it used to pass as "not IP".
func TestQinQJudgedToPod(t *testing.T) {
	f := newProgFixture(t, baseState(allowIn(clientID, 17, 53, 53, 7)))
	if got := run(t, f.d.objs.BulkheadToPod, withTags(udp4(clientIP, podIP, 5000, 82), 0x88a8, 0x8100)); got != retShot {
		t.Fatalf("QinQ to a denied port: %#x, want drop", got)
	}
	if ev := f.oneEvent(t); ev.DropReason != DropPolicy || ev.DstPort != 82 {
		t.Fatalf("event %+v", ev)
	}
	if got := run(t, f.d.objs.BulkheadToPod, withTags(udp4(clientIP, podIP, 5000, 53), 0x88a8, 0x8100)); got != retPass {
		t.Fatalf("QinQ to an allowed port: %#x, want pass", got)
	}
}

func TestEncodeAddrs(t *testing.T) {
	mac := net.HardwareAddr{2, 1, 2, 3, 4, 5}
	a4, a6 := netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("fd00::5")
	for name, ep := range map[string]Endpoint{
		"no MAC":        {ID: 1, Addrs: []netip.Addr{a4}},
		"zero MAC":      {ID: 1, MAC: make(net.HardwareAddr, 6), Addrs: []netip.Addr{a4}},
		"multicast MAC": {ID: 1, MAC: net.HardwareAddr{1, 0, 0x5e, 0, 0, 1}, Addrs: []netip.Addr{a4}},
		"no address":    {ID: 1, MAC: mac},
		"unspecified":   {ID: 1, MAC: mac, Addrs: []netip.Addr{netip.IPv4Unspecified()}},
		"too many v4": {ID: 1, MAC: mac, Addrs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"),
			netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.4"), netip.MustParseAddr("10.0.0.5")}},
	} {
		if _, err := encodeAddrs(ep); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	v, err := encodeAddrs(Endpoint{ID: 1, MAC: mac, Addrs: []netip.Addr{a4, a6, netip.AddrFrom16(a4.As16()), a4}})
	if err != nil {
		t.Fatal(err)
	}
	if v.N4 != 1 || v.N6 != 1 || net.HardwareAddr(v.Mac[:]).String() != mac.String() {
		t.Fatalf("encoded %+v", v)
	}
}

// forgetDropEvents empties the drop events' rate limit: the conntrack clock
// has a tick's resolution, so cases whose frames share a key (all-zero
// addresses for non-IP) would otherwise silence each other.
func forgetDropEvents(t *testing.T, d *Datapath) {
	t.Helper()
	var k ConntrackKey
	var v uint64
	var keys []ConntrackKey
	it := d.objs.DropEvents.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := d.objs.DropEvents.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
}

// TestNDJudgedOffLink: neighbour discovery that source validation accepts
// passes policy only while it stays on the link. An NS from the pod's own
// address to a routable one (a reachability probe, or a way to carry data)
// is judged by the pod's egress policy like any ICMPv6.
func TestNDJudgedOffLink(t *testing.T) {
	f := newProgFixture(t, baseState()) // default deny both ways
	cases := []struct {
		name string
		pkt  []byte
		want uint32
	}{
		{"ns to a routable address", icmp6Frame(testPodMAC, podIP6, client6, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), retShot},
		{"ns from link-local to a routable address", icmp6Frame(testPodMAC, linkLocal, client6, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), retShot},
		{"na to a routable address", icmp6Frame(testPodMAC, podIP6, client6, 255, 136, ndBody(podIP6, llOpt(2, testPodMAC)), false), retShot},
		{"ns to the solicited-node group", icmp6Frame(testPodMAC, podIP6, solicitedPod, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), retPass},
		{"ns link-local to link-local", icmp6Frame(testPodMAC, linkLocal, linkLocal, 255, 135, ndBody(linkLocal, llOpt(1, testPodMAC)), false), retPass},
	}
	for _, c := range cases {
		before := dropCount(t, f.d, DropPolicy)
		if got := run(t, f.d.objs.BulkheadFromPod, c.pkt); got != c.want {
			t.Errorf("%s: got %#x, want %#x", c.name, got, c.want)
		}
		if n := dropCount(t, f.d, DropPolicy) - before; (c.want == retShot) != (n == 1) {
			t.Errorf("%s: %d policy drops counted", c.name, n)
		}
	}
}

// TestNDLinkLocalBound: once the agent has registered the pod's link-local
// address, neighbour discovery and MLD from another link-local source, and
// an NA or DAD probe for another link-local target, are forged: a pod would
// otherwise advertise the bridge's or another pod's fe80:: address with its
// own MAC and poison neighbour caches. The link-local address stays invalid
// for ordinary traffic.
func TestNDLinkLocalBound(t *testing.T) {
	// As in TestSourceValidation, every refusal is source validation's.
	ms := baseState()
	ms.Endpoints[testEP].Default = [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow}
	f := newProgFixture(t, ms)
	own := linkLocal
	other := netip.MustParseAddr("fe80::99")
	v, err := encodeAddrs(Endpoint{ID: testEP, MAC: testPodMAC, Addrs: testPodAddrs, LinkLocal: []netip.Addr{own.WithZone("eth0")}})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.d.setAddrs(testEP, v); err != nil {
		t.Fatal(err)
	}
	zero6 := netip.IPv6Unspecified()
	// The solicited-node group of fe80::99 and of fe80::2.
	solOther, solOwn := netip.MustParseAddr("ff02::1:ff00:99"), netip.MustParseAddr("ff02::1:ff00:2")
	cases := []struct {
		name   string
		pkt    []byte
		reason DropReason
	}{
		{"na own link-local target", icmp6Frame(testPodMAC, own, allNodes, 255, 136, ndBody(own, llOpt(2, testPodMAC)), false), DropNone},
		{"na own global target", icmp6Frame(testPodMAC, own, allNodes, 255, 136, ndBody(podIP6, llOpt(2, testPodMAC)), false), DropNone},
		{"ns from own link-local", icmp6Frame(testPodMAC, own, solOther, 255, 135, ndBody(other, llOpt(1, testPodMAC)), false), DropNone},
		{"dad ns for own link-local", icmp6Frame(testPodMAC, zero6, solOwn, 255, 135, ndBody(own, nonceOpt), false), DropNone},
		{"rs from own link-local", icmp6Frame(testPodMAC, own, allRouter, 255, 133, llOpt(1, testPodMAC), false), DropNone},
		{"mld from own link-local", mldReport(own, mldv2, 1), DropNone},
		{"ns nud own global", icmp6Frame(testPodMAC, podIP6, client6, 255, 135, ndBody(client6, llOpt(1, testPodMAC)), false), DropNone},

		{"na other link-local target", icmp6Frame(testPodMAC, own, allNodes, 255, 136, ndBody(other, llOpt(2, testPodMAC)), false), DropInvalidSource},
		{"na other link-local target from global", icmp6Frame(testPodMAC, podIP6, allNodes, 255, 136, ndBody(other, llOpt(2, testPodMAC)), false), DropInvalidSource},
		{"na from other link-local", icmp6Frame(testPodMAC, other, allNodes, 255, 136, ndBody(podIP6, llOpt(2, testPodMAC)), false), DropInvalidSource},
		{"ns from other link-local", icmp6Frame(testPodMAC, other, solOwn, 255, 135, ndBody(own, llOpt(1, testPodMAC)), false), DropInvalidSource},
		{"dad ns for other link-local", icmp6Frame(testPodMAC, zero6, solOther, 255, 135, ndBody(other, nonceOpt), false), DropInvalidSource},
		{"rs from other link-local", icmp6Frame(testPodMAC, other, allRouter, 255, 133, llOpt(1, testPodMAC), false), DropInvalidSource},
		{"mld from other link-local", mldReport(other, mldv2, 1), DropInvalidSource},
		{"udp from own link-local", pktSpec{src: own, dst: client6, proto: 17, sport: 5000, dport: 82}.build(), DropInvalidSource},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, err := f.d.Counters()
			if err != nil {
				t.Fatal(err)
			}
			got := run(t, f.d.objs.BulkheadFromPod, c.pkt)
			after, err := f.d.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if c.reason == DropNone {
				if got != retPass {
					t.Fatalf("verdict %#x, want pass; counters %+v", got, after.ByDrop)
				}
				return
			}
			if got != retShot {
				t.Fatalf("verdict %#x, want drop (%s)", got, c.reason)
			}
			if d := after.ByDrop[c.reason].Packets - before.ByDrop[c.reason].Packets; d != 1 {
				t.Fatalf("%s counter went up by %d, want 1", c.reason, d)
			}
		})
	}
}

// TestEncodeLinkLocal: link-local addresses go to their own slots, never
// among the addresses ordinary traffic may come from.
func TestEncodeLinkLocal(t *testing.T) {
	mac := net.HardwareAddr{2, 1, 2, 3, 4, 5}
	a6 := netip.MustParseAddr("fd00::5")
	ll := netip.MustParseAddr("fe80::1")
	v, err := encodeAddrs(Endpoint{ID: 1, MAC: mac, Addrs: []netip.Addr{a6}, LinkLocal: []netip.Addr{ll, ll.WithZone("eth0")}})
	if err != nil {
		t.Fatal(err)
	}
	if v.N6 != 1 || v.Nll != 1 {
		t.Fatalf("encoded %+v, want one global and one link-local address", v)
	}
	for name, lls := range map[string][]netip.Addr{
		"global":   {a6},
		"ipv4":     {netip.MustParseAddr("169.254.0.1")},
		"mapped":   {netip.MustParseAddr("::ffff:169.254.0.1")},
		"too many": {ll, netip.MustParseAddr("fe80::2"), netip.MustParseAddr("fe80::3")},
	} {
		if _, err := encodeAddrs(Endpoint{ID: 1, MAC: mac, Addrs: []netip.Addr{a6}, LinkLocal: lls}); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
