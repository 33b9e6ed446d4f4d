package datapath

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// byteSource turns fuzz input into choices; it yields zeros when exhausted.
type byteSource struct {
	b []byte
}

func (s *byteSource) u8() uint8 {
	if len(s.b) == 0 {
		return 0
	}
	v := s.b[0]
	s.b = s.b[1:]
	return v
}

func (s *byteSource) u16() uint16 { return uint16(s.u8())<<8 | uint16(s.u8()) }

func (s *byteSource) pick(n int) int { return int(s.u8()) % n }

var (
	fuzzEP     = policy.EndpointID(1)
	fuzzPodIP4 = netip.MustParseAddr("10.213.5.1")
	fuzzPodIP6 = netip.MustParseAddr("fd00:213:5::1")
)

// fuzzPeers are the addresses packets come from or go to; some resolve to
// workload identities (one through a /32 inside a /24), one to the host, the
// rest to world.
var fuzzPeers = []netip.Addr{
	netip.MustParseAddr("10.213.5.7"), netip.MustParseAddr("10.213.5.8"),
	netip.MustParseAddr("10.213.6.1"), netip.MustParseAddr("10.213.0.254"),
	netip.MustParseAddr("fd00:213:5::7"), netip.MustParseAddr("fd00:213:6::1"),
}

func fuzzPorts(s *byteSource) uint16 {
	interesting := []uint16{0, 1, 53, 79, 80, 81, 443, 1023, 1024, 8080, 32767, 32768, 65534, 65535}
	if s.u8()&1 == 0 {
		return interesting[s.pick(len(interesting))]
	}
	return s.u16()
}

type fuzzPacket struct {
	dir   policy.Direction
	spec  pktSpec
	peer  netip.Addr
	proto uint8
	port  uint16
}

// decodeCase builds a MapState and packets from fuzz input.
func decodeCase(data []byte) (*policy.MapState, []fuzzPacket) {
	s := &byteSource{b: data}
	flags := s.u8()
	ms := &policy.MapState{
		Revision:         1,
		AllowHostIngress: flags&1 != 0,
		IPCache: map[netip.Prefix]identity.NumericID{
			netip.MustParsePrefix("10.213.5.0/24"):     301,
			netip.MustParsePrefix("10.213.0.254/32"):   identity.IDHost,
			netip.MustParsePrefix("fd00:213:5::/64"):   301,
			netip.MustParsePrefix("fd00:213:5::7/128"): 300,
		},
		Endpoints: map[policy.EndpointID]*policy.EndpointPolicy{},
	}
	if flags&2 != 0 {
		ms.IPCache[netip.MustParsePrefix("10.213.5.7/32")] = 300
	}
	if flags&4 == 0 || flags&8 == 0 { // 1 in 4 cases: unmanaged endpoint
		ep := &policy.EndpointPolicy{
			Identity: 500,
			Default:  [2]policy.DefaultVerdict{policy.DefaultVerdict(s.pick(3)), policy.DefaultVerdict(s.pick(3))},
			Audit:    s.pick(8) == 0,
		}
		peers := []identity.NumericID{identity.IDNone, identity.IDNone, 300, 301, identity.IDHost, identity.IDWorld}
		protos := []uint8{0, 6, 6, 17, 132, 1, 58, 47}
		n := s.pick(14)
		for range n {
			e := policy.Entry{
				Direction: policy.Direction(s.pick(2)),
				Peer:      peers[s.pick(len(peers))],
				Proto:     protos[s.pick(len(protos))],
				Action:    policy.ActionAllow,
				Rule:      policy.RuleID(1 + s.pick(8)),
			}
			if s.pick(3) == 0 {
				e.Action = policy.ActionDeny
			}
			if s.pick(4) == 0 {
				e.Flags |= policy.FlagAudit
			}
			e.PortLo, e.PortHi = 0, 65535
			if e.Proto == 6 || e.Proto == 17 || e.Proto == 132 {
				a, b := fuzzPorts(s), fuzzPorts(s)
				if a > b {
					a, b = b, a
				}
				if s.pick(3) == 0 {
					b = a
				}
				e.PortLo, e.PortHi = a, b
			}
			ep.Entries = append(ep.Entries, e)
		}
		// An enforcing wildcard-peer deny under a specific-peer audit deny
		// of the same shape: only the order of the kinds of deny picks the
		// winner, and random entries rarely line up like this.
		if n > 0 && s.pick(2) == 0 {
			e := ep.Entries[s.pick(n)]
			e.Peer, e.Action, e.Flags = identity.IDNone, policy.ActionDeny, 0
			a := e
			a.Peer, a.Flags, a.Rule = peers[2+s.pick(len(peers)-2)], policy.FlagAudit, policy.RuleID(1+s.pick(8))
			ep.Entries = append(ep.Entries, e, a)
		}
		ep.Entries = policy.SortEntries(ep.Entries)
		ms.Endpoints[fuzzEP] = ep
	}
	var pkts []fuzzPacket
	n := 1 + s.pick(8)
	for range n {
		p := fuzzPacket{dir: policy.Direction(s.pick(2)), peer: fuzzPeers[s.pick(len(fuzzPeers))]}
		pod := fuzzPodIP4
		protos := []uint8{6, 6, 17, 132, 1, 47}
		if p.peer.Is6() {
			pod = fuzzPodIP6
			protos[4] = 58
		}
		p.proto = protos[s.pick(len(protos))]
		sp := pktSpec{proto: p.proto, sport: s.u16(), dport: fuzzPorts(s), tcpFlags: tcpSYN}
		if p.proto == 1 {
			sp.icmpType, sp.icmpID = 8, s.u16()
		}
		if p.proto == 58 {
			sp.icmpType, sp.icmpID = 128, s.u16()
		}
		if p.proto == 6 || p.proto == 17 || p.proto == 132 {
			p.port = sp.dport
		}
		// Header variations that must not change the verdict.
		v := s.u8()
		sp.vlan = v&3 == 0
		if p.peer.Is4() {
			sp.ipv4Options = int(v>>2) % 4
		} else {
			sp.ipv6HopByHop = v&4 != 0
		}
		if p.dir == policy.Ingress {
			sp.src, sp.dst = p.peer, pod
		} else {
			sp.src, sp.dst = pod, p.peer
		}
		p.spec = sp
		pkts = append(pkts, p)
	}
	return ms, pkts
}

// peerIdentity resolves like the ipcache: longest prefix, else world.
func peerIdentity(ms *policy.MapState, a netip.Addr) identity.NumericID {
	best, bits := identity.IDWorld, -1
	for p, id := range ms.IPCache {
		if p.Contains(a) && p.Bits() > bits {
			best, bits = id, p.Bits()
		}
	}
	return best
}

type verdictChecker struct {
	d  *Datapath
	ev *EventReader
	// mtls adds FlagMTLSRequired to some allow entries and checks
	// against lookupFlowModel, both views (see mtlsVerdict).
	mtls bool
	// seen counts outcomes, so a test can show it covered every kind.
	seen map[string]int
}

func newVerdictChecker(t testing.TB, cfg Config) *verdictChecker {
	cfg.DropEventInterval = 1
	d := newTestDatapath(t, cfg)
	bindTestEndpoint(t, d, uint32(fuzzEP))
	return &verdictChecker{d: d, ev: openEvents(t, d), seen: map[string]int{}}
}

// check applies the case's MapState and runs every packet as a new flow,
// comparing verdict and rule with MapState.Lookup.
func (c *verdictChecker) check(t *testing.T, data []byte) {
	ms, pkts := decodeCase(data)
	if c.mtls {
		c.checkMTLS(t, ms, pkts, data)
		return
	}
	if _, err := c.d.Apply(ms); err != nil {
		t.Fatalf("apply: %v", err)
	}
	drainEvents(t, c.ev)
	for _, p := range pkts {
		peer := peerIdentity(ms, p.peer)
		want := ms.Lookup(fuzzEP, p.dir, peer, p.proto, p.port)
		prog := c.d.objs.BulkheadToPod
		if p.dir == policy.Egress {
			prog = c.d.objs.BulkheadFromPod
		}
		got := run(t, prog, p.spec.build())
		key := ctKeyOf(uint32(fuzzEP), p.spec)
		var ct ConntrackItem
		ctErr := c.d.lookupConntrack(key, &ct)
		evs := drainEvents(t, c.ev)
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("%s %v peer=%d proto=%d port=%d want=%+v: "+format+"\nentries=%+v",
				append([]any{p.dir, p.spec.src, peer, p.proto, p.port, want}, append(args, ms.Endpoints[fuzzEP])...)...)
		}
		if want.Verdict.Passes() != (got == retPass) {
			fail("program returned %#x", got)
		}
		_, managed := ms.Endpoints[fuzzEP]
		c.seen[want.Verdict.String()]++
		if want.Rule != policy.RuleDefault {
			c.seen["by-rule"]++
		}
		if !managed {
			c.seen["unmanaged"]++
		} else if auditDenyShadowsEnforcing(ms.Endpoints[fuzzEP], p.dir, peer, p.proto, p.port) {
			c.seen["audit-vs-enforcing-deny"]++
		}
		switch {
		case !managed:
			if ctErr == nil {
				fail("unmanaged endpoint has a conntrack entry")
			}
		case want.Verdict.Passes():
			if ctErr != nil {
				fail("no conntrack entry: %v", ctErr)
			}
			if ct.RuleId != uint32(want.Rule) || ct.Verdict != uint8(want.Verdict) {
				fail("conntrack rule %d verdict %d", ct.RuleId, ct.Verdict)
			}
			if err := c.d.deleteConntrack(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		default:
			if len(evs) != 1 || evs[0].Type != EventDrop || evs[0].Rule != want.Rule {
				fail("events %+v", evs)
			}
			// The next packet of the same flow (protocols without ports
			// repeat keys) must get its event despite the rate limit.
			if err := c.d.objs.DropEvents.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		}
	}
}

// auditDenyShadowsEnforcing reports whether the packet is one where the two
// policy lookups BPF combines disagree on the kind of deny: the best matching
// specific-peer entry is an audit deny and the best wildcard-peer one an
// enforcing deny. Combining "deny, then specific peer" gets these wrong.
func auditDenyShadowsEnforcing(ep *policy.EndpointPolicy, dir policy.Direction, peer identity.NumericID, proto uint8, port uint16) bool {
	var exact, wild *policy.Entry
	for i := range ep.Entries {
		e := &ep.Entries[i]
		if !e.Matches(dir, peer, proto, port) {
			continue
		}
		best := &wild
		if e.Peer != identity.IDNone {
			best = &exact
		}
		if *best == nil || e.Beats(*best) {
			*best = e
		}
	}
	return exact != nil && wild != nil &&
		exact.Action == policy.ActionDeny && exact.Flags&policy.FlagAudit != 0 &&
		wild.Action == policy.ActionDeny && wild.Flags&policy.FlagAudit == 0
}

func FuzzDatapathVerdict(f *testing.F) {
	f.Add([]byte{0})
	f.Add([]byte{1, 1, 1, 3, 0, 2, 1, 0, 1, 0, 0, 80, 0, 0, 80, 4, 0, 3, 1, 1, 0, 1, 0, 80})
	f.Add([]byte{3, 2, 2, 0, 8, 1, 4, 1, 2, 1, 0, 1, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
	c := newVerdictChecker(f, Config{})
	f.Fuzz(func(t *testing.T, data []byte) {
		c.check(t, data)
	})
}

// TestDatapathVerdictRandom runs thousands of seeded random cases in every
// `go test`, fuzz or not. The "tiny-exact" run gives the exact-match tables
// one bucket each, so that most keys find no slot there and are found in
// the tries, and some are in both: the two must always agree.
func TestDatapathVerdictRandom(t *testing.T) {
	randomVerdicts(t, false, 2, 13, 50, "allow", "deny", "audit", "by-rule", "unmanaged", "audit-vs-enforcing-deny")
}

// randomVerdicts runs seeded random cases through a verdictChecker (with
// mTLS allows when mtls is set), with the default exact-match tables and
// with one bucket each, and fails when an outcome in want came up in
// fewer than 1/share of the cases: then the generator is too narrow to
// test it.
func randomVerdicts(t *testing.T, mtls bool, seed1, seed2 uint64, share int, want ...string) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{{"default", Config{}}, {"tiny-exact", Config{exactBuckets: 1}}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newVerdictChecker(t, tc.cfg)
			c.mtls = mtls
			rng := rand.New(rand.NewPCG(seed1, seed2))
			cases := 3000
			if testing.Short() {
				cases = 300
			}
			buf := make([]byte, 160)
			for range cases {
				for i := range buf {
					buf[i] = uint8(rng.Uint32())
				}
				c.check(t, buf)
			}
			t.Logf("outcomes: %v", c.seen)
			for _, k := range want {
				if c.seen[k] < cases/share {
					t.Errorf("only %d %s outcomes in %d cases: the generator is too narrow", c.seen[k], k, cases)
				}
			}
		})
	}
}
