package policy

import (
	"math/rand/v2"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
)

// bruteLookupFlow states LookupFlow's rules a second way, without Beats:
// the candidates fall into tiers (enforcing denies, then audit denies, then
// allows), the first tier that is not empty decides, and in it the entry
// with the smallest (wildcard peer, wildcard protocol, port range width,
// rule) wins. Plaintext TCP that does not pass but would pass through the
// tunnel by an mTLS rule needs authentication.
func bruteLookupFlow(m *MapState, ep EndpointID, dir Direction, peer identity.NumericID, proto uint8, port uint16, tunnelled bool) Decision {
	p, ok := m.Endpoints[ep]
	if !ok {
		return Decision{Verdict: VerdictAllow}
	}
	if dir == Ingress && peer == identity.IDHost && m.AllowHostIngress {
		return Decision{Verdict: VerdictAllow}
	}
	var tiers [3][]Entry
	for _, e := range p.Entries {
		if e.Direction != dir {
			continue
		}
		if e.Peer != identity.IDNone && e.Peer != peer {
			continue
		}
		if e.Proto != 0 && e.Proto != proto {
			continue
		}
		if int(port) < int(e.PortLo) || int(port) > int(e.PortHi) {
			continue
		}
		mtls := e.Flags&FlagMTLSRequired != 0
		switch {
		case e.Action == ActionDeny && e.Flags&FlagAudit == 0:
			tiers[0] = append(tiers[0], e)
		case e.Action == ActionDeny:
			tiers[1] = append(tiers[1], e)
		case !mtls || (tunnelled && proto == ProtoTCP):
			tiers[2] = append(tiers[2], e)
		}
	}
	key := func(e Entry) [4]int {
		k := [4]int{0, 0, int(e.PortHi) - int(e.PortLo), int(e.Rule)}
		if e.Peer == identity.IDNone {
			k[0] = 1
		}
		if e.Proto == 0 {
			k[1] = 1
		}
		return k
	}
	less := func(a, b [4]int) bool {
		for i := range a {
			if a[i] != b[i] {
				return a[i] < b[i]
			}
		}
		return false
	}
	var d Decision
	found := false
	for _, tier := range tiers {
		if len(tier) == 0 {
			continue
		}
		w := tier[0]
		for _, e := range tier[1:] {
			if less(key(e), key(w)) {
				w = e
			}
		}
		d = Decision{Verdict: VerdictAllow, Rule: w.Rule, Flags: w.Flags}
		if w.Action == ActionDeny {
			d.Verdict = VerdictDeny
			if w.Flags&FlagAudit != 0 || p.Audit {
				d.Verdict = VerdictAudit
			}
		}
		found = true
		break
	}
	if !found {
		switch {
		case p.Default[dir] == DefaultAllow:
			d = Decision{Verdict: VerdictAllow}
		case p.Default[dir] == DefaultAudit || p.Audit:
			d = Decision{Verdict: VerdictAudit}
		default:
			d = Decision{Verdict: VerdictDeny}
		}
	}
	if proto == ProtoTCP && !tunnelled && d.Verdict != VerdictAllow {
		if t := bruteLookupFlow(m, ep, dir, peer, proto, port, true); t.Verdict == VerdictAllow && t.Flags&FlagMTLSRequired != 0 {
			d.Rule, d.Flags, d.AuthRequired = t.Rule, t.Flags, true
		}
	}
	return d
}

// randomEndpoint builds an endpoint policy from a seed. As in the
// compiler's output, a rule has one action and one set of flags, so two
// entries that tie in every criterion decide alike.
func randomEndpoint(r *rand.Rand) (*MapState, []identity.NumericID, []uint16) {
	peers := []identity.NumericID{identity.IDHost, identity.IDWorld, 300, 301, 302}
	ports := []uint16{0, 22, 80, 81, 443, 65535}
	type rule struct {
		action Action
		flags  Flags
	}
	rules := make([]rule, 1+r.IntN(6))
	for i := range rules {
		switch r.IntN(5) {
		case 0:
			rules[i] = rule{ActionDeny, 0}
		case 1:
			rules[i] = rule{ActionDeny, FlagAudit}
		case 2, 3:
			rules[i] = rule{ActionAllow, FlagMTLSRequired}
		default:
			rules[i] = rule{ActionAllow, 0}
		}
	}
	p := &EndpointPolicy{Identity: 400, Audit: r.IntN(5) == 0}
	for d := range 2 {
		p.Default[d] = DefaultVerdict(r.IntN(3))
	}
	var es []Entry
	for range r.IntN(10) {
		ri := r.IntN(len(rules))
		e := Entry{Direction: Direction(r.IntN(2)), Peer: identity.IDNone, Action: rules[ri].action, Flags: rules[ri].flags, Rule: RuleID(ri + 1)}
		if r.IntN(3) > 0 {
			e.Peer = peers[r.IntN(len(peers))]
		}
		switch r.IntN(4) {
		case 0:
			e.PortLo, e.PortHi = 0, 65535
		case 1:
			e.Proto, e.PortLo, e.PortHi = udp, 0, 65535
		default:
			e.Proto = tcp
			a, b := ports[r.IntN(len(ports))], ports[r.IntN(len(ports))]
			e.PortLo, e.PortHi = min(a, b), max(a, b)
		}
		es = append(es, e)
	}
	p.Entries = SortEntries(es)
	ms := &MapState{AllowHostIngress: r.IntN(2) == 0, Endpoints: map[EndpointID]*EndpointPolicy{1: p}}
	return ms, peers, []uint16{0, 21, 22, 23, 80, 81, 82, 443, 1000, 65535}
}

func checkAgainstBrute(t *testing.T, ms *MapState, peers []identity.NumericID, ports []uint16) {
	t.Helper()
	for _, ep := range []EndpointID{1, 2} {
		for dir := range Direction(2) {
			for _, peer := range peers {
				for _, proto := range []uint8{tcp, udp, 132} {
					for _, port := range ports {
						for _, tun := range []bool{false, true} {
							got := ms.LookupFlow(ep, dir, peer, proto, port, tun)
							want := bruteLookupFlow(ms, ep, dir, peer, proto, port, tun)
							if got != want {
								t.Fatalf("endpoint %d %v peer %d proto %d port %d tunnelled %v: LookupFlow %+v, brute force %+v\nentries: %+v",
									ep, dir, peer, proto, port, tun, got, want, ms.Endpoints[1])
							}
							// mtls: Required is never silently ignored: an
							// mTLS rule never lets plaintext or non-TCP pass.
							if (!tun || proto != tcp) && got.Verdict == VerdictAllow && got.Flags&FlagMTLSRequired != 0 {
								t.Fatalf("an mTLS rule allowed a flow it cannot match: tunnelled %v proto %d: %+v", tun, proto, got)
							}
							if !tun && got != ms.Lookup(ep, dir, peer, proto, port) {
								t.Fatalf("Lookup differs from LookupFlow(..., false)")
							}
						}
					}
				}
			}
		}
	}
}

// TestLookupFlowBruteForce compares LookupFlow with bruteLookupFlow on
// random endpoint policies and every packet that tells them apart.
func TestLookupFlowBruteForce(t *testing.T) {
	auth := 0
	for seed := range uint64(3000) {
		ms, peers, ports := randomEndpoint(rand.New(rand.NewPCG(seed, 12)))
		checkAgainstBrute(t, ms, peers, ports)
		for _, port := range ports {
			if ms.Lookup(1, Ingress, 300, tcp, port).AuthRequired {
				auth++
			}
		}
	}
	// The generator must reach the interesting case, or this tests little.
	if auth == 0 {
		t.Fatal("no random policy needed authentication")
	}
}

// FuzzLookupFlow: LookupFlow agrees with the brute-force statement on
// policies the fuzzer picks by seed.
func FuzzLookupFlow(f *testing.F) {
	f.Add(uint64(1), uint64(2))
	f.Add(uint64(99), uint64(7))
	f.Fuzz(func(t *testing.T, a, b uint64) {
		ms, peers, ports := randomEndpoint(rand.New(rand.NewPCG(a, b)))
		checkAgainstBrute(t, ms, peers, ports)
	})
}
