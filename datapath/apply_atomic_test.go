package datapath

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"syscall"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// The intermediate-state tests drive the real Apply and, before every write
// it makes to a map the programs read (beforeWrite), judge a set of probes
// with the real programs. Each probe must get the verdict the old MapState
// gives it or the one the new MapState gives it: never a third one that a
// mix of the two produces.

// atomicUniverse is the node the random states live on: local endpoints
// with one address each, remote pods, a CIDR, the host and world.
type atomicUniverse struct {
	eps    []policy.EndpointID
	epAddr map[policy.EndpointID]netip.Addr
	// peers are the addresses probes talk to.
	peers []netip.Addr
	ports []probePort
}

type probePort struct {
	proto uint8
	port  uint16
}

var (
	atomicCIDR = netip.MustParsePrefix("10.214.9.0/24")
	atomicHost = netip.MustParseAddr("10.214.0.254")
)

func newAtomicUniverse() *atomicUniverse {
	u := &atomicUniverse{epAddr: map[policy.EndpointID]netip.Addr{}}
	for i := 1; i <= 3; i++ {
		ep := policy.EndpointID(i)
		a := netip.MustParseAddr(fmt.Sprintf("10.214.0.%d", i))
		u.eps = append(u.eps, ep)
		u.epAddr[ep] = a
		u.peers = append(u.peers, a)
	}
	u.peers = append(u.peers,
		netip.MustParseAddr("10.214.1.1"), netip.MustParseAddr("10.214.1.2"), // remote pods
		netip.MustParseAddr("10.214.9.9"),              // in atomicCIDR
		atomicHost, netip.MustParseAddr("10.214.99.1")) // host, world
	u.ports = []probePort{{6, 80}, {6, 443}, {17, 53}}
	return u
}

// identities the random states use; peers of entries come from here too.
var atomicIDs = []identity.NumericID{256, 257, 258, 259, 260, 261}

func (u *atomicUniverse) randomState(rng *rand.Rand) *policy.MapState {
	ms := &policy.MapState{
		Revision:         1,
		AllowHostIngress: rng.IntN(2) == 0,
		IPCache:          map[netip.Prefix]identity.NumericID{netip.PrefixFrom(atomicHost, 32): identity.IDHost},
		Endpoints:        map[policy.EndpointID]*policy.EndpointPolicy{},
	}
	for _, a := range u.peers[:5] {
		if rng.IntN(8) != 0 {
			ms.IPCache[netip.PrefixFrom(a, 32)] = atomicIDs[rng.IntN(len(atomicIDs))]
		}
	}
	if rng.IntN(2) == 0 {
		ms.IPCache[atomicCIDR] = atomicIDs[rng.IntN(len(atomicIDs))]
	}
	for _, ep := range u.eps {
		if rng.IntN(6) != 0 {
			ms.Endpoints[ep] = u.randomPolicy(rng)
		}
	}
	return ms
}

func (u *atomicUniverse) randomPolicy(rng *rand.Rand) *policy.EndpointPolicy {
	defs := []policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultDeny, policy.DefaultAllow, policy.DefaultAudit}
	p := &policy.EndpointPolicy{
		Identity: atomicIDs[rng.IntN(len(atomicIDs))],
		Default:  [2]policy.DefaultVerdict{defs[rng.IntN(len(defs))], defs[rng.IntN(len(defs))]},
		Audit:    rng.IntN(10) == 0,
	}
	peers := append([]identity.NumericID{identity.IDNone, identity.IDHost, identity.IDWorld}, atomicIDs...)
	for range rng.IntN(7) {
		e := policy.Entry{
			Direction: policy.Direction(rng.IntN(2)),
			Peer:      peers[rng.IntN(len(peers))],
			Action:    policy.ActionAllow,
			Rule:      policy.RuleID(1 + rng.IntN(9)),
			PortLo:    0, PortHi: 65535,
		}
		switch rng.IntN(4) {
		case 0: // any protocol
		case 1:
			e.Proto, e.PortLo, e.PortHi = 6, 80, 80
		case 2:
			e.Proto, e.PortLo, e.PortHi = 6, 1, 1024
		case 3:
			e.Proto = 17
		}
		if rng.IntN(3) == 0 {
			e.Action = policy.ActionDeny
		}
		if rng.IntN(8) == 0 {
			e.Flags |= policy.FlagAudit
		}
		p.Entries = append(p.Entries, e)
	}
	p.Entries = policy.SortEntries(p.Entries)
	return p
}

// evolve derives a new state from old the way a node changes: some
// addresses relabelled, some endpoints' policies rewritten, some endpoints
// added or removed. Unchanged endpoints keep their *EndpointPolicy, as the
// compiler hands them over.
func (u *atomicUniverse) evolve(rng *rand.Rand, old *policy.MapState) *policy.MapState {
	ms := &policy.MapState{
		Revision:         old.Revision + 1,
		AllowHostIngress: old.AllowHostIngress != (rng.IntN(5) == 0),
		IPCache:          map[netip.Prefix]identity.NumericID{},
		Endpoints:        map[policy.EndpointID]*policy.EndpointPolicy{},
	}
	for p, id := range old.IPCache {
		ms.IPCache[p] = id
		if p.Addr() != atomicHost && rng.IntN(3) == 0 {
			ms.IPCache[p] = atomicIDs[rng.IntN(len(atomicIDs))]
		}
	}
	if rng.IntN(4) == 0 {
		if _, ok := ms.IPCache[atomicCIDR]; ok {
			delete(ms.IPCache, atomicCIDR)
		} else {
			ms.IPCache[atomicCIDR] = atomicIDs[rng.IntN(len(atomicIDs))]
		}
	}
	for _, ep := range u.eps {
		p, ok := old.Endpoints[ep]
		switch {
		case rng.IntN(8) == 0:
			if !ok {
				ms.Endpoints[ep] = u.randomPolicy(rng)
			} // else removed
		case ok && rng.IntN(2) == 0:
			ms.Endpoints[ep] = u.randomPolicy(rng)
		case ok:
			ms.Endpoints[ep] = p
		}
	}
	return ms
}

// probe is one new flow judged at an endpoint.
type probe struct {
	ep   policy.EndpointID
	dir  policy.Direction
	peer netip.Addr
	pp   probePort
}

func (u *atomicUniverse) probes() []probe {
	var out []probe
	for _, ep := range u.eps {
		for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
			for _, peer := range u.peers {
				if peer == u.epAddr[ep] {
					continue
				}
				for _, pp := range u.ports {
					out = append(out, probe{ep, dir, peer, pp})
				}
			}
		}
	}
	return out
}

func (u *atomicUniverse) spec(p probe) pktSpec {
	s := pktSpec{proto: p.pp.proto, sport: 40000, dport: p.pp.port, tcpFlags: tcpSYN}
	if p.dir == policy.Ingress {
		s.src, s.dst = p.peer, u.epAddr[p.ep]
	} else {
		s.src, s.dst = u.epAddr[p.ep], p.peer
	}
	return s
}

func wantPasses(ms *policy.MapState, p probe) bool {
	return ms.Lookup(p.ep, p.dir, ms.ResolveIP(p.peer), p.pp.proto, p.pp.port).Verdict.Passes()
}

// prober judges probes with the real programs as new flows. It runs inside
// Apply's beforeWrite, under d.mu, so it touches conntrack without the
// helpers that take d.mu.
type prober struct {
	t    testing.TB
	d    *Datapath
	seed uint32
	u    *atomicUniverse
	// bound is the endpoint the test device belongs to.
	bound policy.EndpointID
}

func newProber(t testing.TB, d *Datapath, u *atomicUniverse) *prober {
	return &prober{t: t, d: d, seed: d.ctSeed(), u: u}
}

// passes runs p's first packet and forgets the flow it may have created,
// so that the next run is judged as new again.
func (pr *prober) passes(p probe) bool {
	pr.t.Helper()
	if p.ep != pr.bound {
		if err := pr.d.setEndpoint(testIfindex, p.ep); err != nil {
			pr.t.Fatal(err)
		}
		pr.bound = p.ep
	}
	prog := pr.d.objs.BulkheadToPod
	if p.dir == policy.Egress {
		prog = pr.d.objs.BulkheadFromPod
	}
	s := pr.u.spec(p)
	ret := run(pr.t, prog, s.build())
	k := ctKeyOf(uint32(p.ep), s)
	pr.d.unmapMu.RLock()
	if _, ref, ok := pr.d.ctTableOf(k).find(k, pr.seed); ok {
		ref.remove()
	}
	pr.d.unmapMu.RUnlock()
	return ret == retPass
}

// mixed returns the probes whose live verdict neither state gives.
func (pr *prober) mixed(old, new *policy.MapState, probes []probe) []string {
	var bad []string
	for _, p := range probes {
		got, o, n := pr.passes(p), wantPasses(old, p), wantPasses(new, p)
		if got != o && got != n {
			bad = append(bad, fmt.Sprintf("ep %d %s %v %d/%d: passes=%v, old and new say %v",
				p.ep, p.dir, p.peer, p.pp.proto, p.pp.port, got, o))
		}
	}
	return bad
}

// mismatches returns the probes whose live verdict is not ms's.
func (pr *prober) mismatches(ms *policy.MapState, probes []probe) []string {
	var bad []string
	for _, p := range probes {
		if got, w := pr.passes(p), wantPasses(ms, p); got != w {
			bad = append(bad, fmt.Sprintf("ep %d %s %v %d/%d: passes=%v, want %v",
				p.ep, p.dir, p.peer, p.pp.proto, p.pp.port, got, w))
		}
	}
	return bad
}

// transition applies old, then new with every intermediate state judged.
// It returns the writes new's Apply made and how many of the states before
// them were mixed.
func (pr *prober) transition(t *testing.T, old, new *policy.MapState, probes []probe) (steps, mixed int) {
	t.Helper()
	if _, err := pr.d.Apply(old); err != nil {
		t.Fatalf("apply old: %v", err)
	}
	if bad := pr.mismatches(old, probes); len(bad) > 0 {
		t.Fatalf("old state not live after its apply: %v", bad)
	}
	pr.d.beforeWrite = func(op string) error {
		if bad := pr.mixed(old, new, probes); len(bad) > 0 {
			mixed++
			if mixed == 1 {
				t.Logf("mixed state before write %d (%s): %v", steps+1, op, bad[0])
			}
		}
		steps++
		return nil
	}
	_, err := pr.d.Apply(new)
	pr.d.beforeWrite = nil
	if err != nil {
		t.Fatalf("apply new: %v", err)
	}
	if bad := pr.mismatches(new, probes); len(bad) > 0 {
		t.Fatalf("new state not live after its apply: %v", bad)
	}
	return steps, mixed
}

// relabelStates is the example: x (10.214.1.1) is relabelled from
// identity 257 to 258 under "allow all, deny tier=untrusted" on db
// (endpoint 1); x is untrusted before and after, so both states deny
// x -> db:80, but the new ipcache with db's old policy allows it.
func relabelStates() (old, new *policy.MapState) {
	db := netip.MustParseAddr("10.214.0.1")
	x := netip.MustParseAddr("10.214.1.1")
	state := func(xid identity.NumericID) *policy.MapState {
		return &policy.MapState{
			Revision: uint64(xid),
			IPCache: map[netip.Prefix]identity.NumericID{
				netip.PrefixFrom(db, 32): 256, netip.PrefixFrom(x, 32): xid,
			},
			Endpoints: map[policy.EndpointID]*policy.EndpointPolicy{1: {
				Identity: 256,
				Default:  [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow},
				Entries: policy.SortEntries([]policy.Entry{
					{Direction: policy.Ingress, Peer: identity.IDNone, PortHi: 65535, Action: policy.ActionAllow, Rule: 1},
					{Direction: policy.Ingress, Peer: xid, PortHi: 65535, Action: policy.ActionDeny, Rule: 2},
				}),
			}},
		}
	}
	return state(257), state(258)
}

func TestApplyIntermediateStates(t *testing.T) {
	d := newTestDatapath(t, Config{})
	u := newAtomicUniverse()
	pr := newProber(t, d, u)
	probes := u.probes()

	t.Run("relabel-257-258", func(t *testing.T) {
		old, new := relabelStates()
		x := probe{1, policy.Ingress, netip.MustParseAddr("10.214.1.1"), probePort{6, 80}}
		if wantPasses(old, x) || wantPasses(new, x) {
			t.Fatal("the example must deny x -> db:80 in both states")
		}
		steps, mixed := pr.transition(t, old, new, probes)
		t.Logf("%d writes, %d mixed states", steps, mixed)
		if mixed > 0 {
			t.Errorf("%d of %d intermediate states were mixed", mixed, steps)
		}
	})

	t.Run("random", func(t *testing.T) {
		rng := rand.New(rand.NewPCG(10, 2))
		cases := 100
		if testing.Short() {
			cases = 25
		}
		var steps, mixed, mixedCases int
		for range cases {
			old := u.randomState(rng)
			new := u.evolve(rng, old)
			s, m := pr.transition(t, old, new, probes)
			steps += s
			mixed += m
			if m > 0 {
				mixedCases++
			}
		}
		t.Logf("%d cases, %d probes each, %d intermediate states, %d mixed (in %d cases)",
			cases, len(probes), steps, mixed, mixedCases)
		if mixed > 0 {
			t.Errorf("%d of %d intermediate states were mixed, in %d of %d cases", mixed, steps, mixedCases, cases)
		}
	})
}

// TestApplyFailureLeavesOldState fails the Nth write of an Apply, for every
// N the Apply makes: the live verdicts must stay exactly the old state's,
// and the next Apply must then make the new state live.
func TestApplyFailureLeavesOldState(t *testing.T) {
	d := newTestDatapath(t, Config{})
	u := newAtomicUniverse()
	pr := newProber(t, d, u)
	probes := u.probes()
	rng := rand.New(rand.NewPCG(7, 7))
	cases := 40
	if testing.Short() {
		cases = 10
	}
	var runs, failed, broken int
	for c := range cases {
		old := u.randomState(rng)
		new := u.evolve(rng, old)
		if c == 0 {
			old, new = relabelStates()
		}
		for n := 1; ; n++ {
			if _, err := d.Apply(old); err != nil {
				t.Fatalf("apply old: %v", err)
			}
			writes := 0
			d.beforeWrite = func(string) error {
				writes++
				if writes == n {
					return fmt.Errorf("injected: %w", syscall.ENOMEM)
				}
				return nil
			}
			_, err := d.Apply(new)
			d.beforeWrite = nil
			if writes < n {
				if err != nil {
					t.Fatalf("apply without injection: %v", err)
				}
				break // every write of this Apply has been failed once
			}
			runs++
			// A failed Apply leaves the old state; one that reports
			// success (the write failed after the new state went live)
			// leaves the new one.
			want := old
			if err == nil {
				want = new
			} else if !errors.Is(err, syscall.ENOMEM) {
				t.Fatalf("write %d failed, Apply returned %v", n, err)
			} else {
				failed++
			}
			if bad := pr.mismatches(want, probes); len(bad) > 0 {
				broken++
				if broken == 1 {
					t.Logf("after failing write %d (Apply returned %v): %v", n, err, bad[0])
				}
			}
			// A retry makes the new state live.
			if _, err := d.Apply(new); err != nil {
				t.Fatalf("retry: %v", err)
			}
			if bad := pr.mismatches(new, probes); len(bad) > 0 {
				t.Fatalf("after a retry: %v", bad)
			}
		}
	}
	t.Logf("%d cases, %d injected failures, %d of them failed the Apply, %d left a state neither old nor as reported",
		cases, runs, failed, broken)
	if broken > 0 {
		t.Errorf("%d of %d injected failures left the old state when Apply succeeded, or another when it failed", broken, runs)
	}
	if failed == 0 {
		t.Error("no injected failure failed an Apply")
	}
}

// TestApplyCrashThenReopen stops an Apply part-way, as a killed agent's
// would (every write from the fifth on fails), and re-opens the pins as the
// next agent does: the old state is live, the new process rebuilds both
// generations' mirrors from the maps and knows which one is live, and its
// first Apply makes the new state live, mirrors and maps in agreement.
func TestApplyCrashThenReopen(t *testing.T) {
	d := newTestDatapath(t, Config{})
	u := newAtomicUniverse()
	probes := u.probes()
	old, new := relabelStates()
	// More for the crashed apply to leave half-written.
	new.Endpoints[2] = &policy.EndpointPolicy{Identity: 259, Entries: fillers(600, 40)}
	if _, err := d.Apply(old); err != nil {
		t.Fatal(err)
	}
	writes := 0
	d.beforeWrite = func(string) error {
		if writes++; writes >= 5 {
			return syscall.EINTR
		}
		return nil
	}
	if _, err := d.Apply(new); err == nil {
		t.Fatal("the crashed apply succeeded")
	}
	d.beforeWrite = nil

	d2, err := New(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if d2.liveGen() != d.liveGen() || d2.Revision() != d.Revision() {
		t.Fatalf("re-opened: live generation %d revision %d, want %d %d", d2.liveGen(), d2.Revision(), d.liveGen(), d.Revision())
	}
	for g := range 2 {
		a, b := &d.gens[g], &d2.gens[g]
		if a.flags != b.flags || !maps.Equal(a.epConfigs, b.epConfigs) || !maps.Equal(a.ipcache, b.ipcache) {
			t.Fatalf("generation %d: re-opened mirrors differ from the crashed process's", g)
		}
		for id, e := range a.slots {
			if !maps.Equal(e, b.slots[id]) {
				t.Fatalf("generation %d endpoint %d: re-opened policy mirror differs", g, id)
			}
		}
	}
	pr := newProber(t, d2, u)
	if bad := pr.mismatches(old, probes); len(bad) > 0 {
		t.Fatalf("after the crash the old state is not live: %v", bad)
	}
	st, err := d2.Apply(new)
	if err != nil || !st.Published {
		t.Fatalf("apply after re-open: %+v %v", st, err)
	}
	if bad := pr.mismatches(new, probes); len(bad) > 0 {
		t.Fatalf("after the re-opened apply: %v", bad)
	}
	live := liveSlots(t, d2)
	for g := range uint8(2) {
		for id, want := range d2.gens[g].slots {
			if len(want)+len(live[genRef{id, g}]) > 0 && !maps.Equal(live[genRef{id, g}], want) {
				t.Fatalf("endpoint %d generation %d: map and mirror differ", id, g)
			}
		}
	}
}
