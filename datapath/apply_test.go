package datapath

import (
	"errors"
	"maps"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// genRef names an endpoint's entries in one generation.
type genRef struct {
	ep  policy.EndpointID
	gen uint8
}

// liveSlots dumps the policy map per (endpoint, generation), keys with
// Slot 0.
func liveSlots(t *testing.T, d *Datapath) map[genRef]map[PolicyKey]PolicyValue {
	t.Helper()
	out := map[genRef]map[PolicyKey]PolicyValue{}
	var k PolicyKey
	var v PolicyValue
	it := d.objs.Policy.Iterate()
	for it.Next(&k, &v) {
		ref := genRef{policy.EndpointID(k.EpId), k.Slot}
		k.Slot = 0
		if out[ref] == nil {
			out[ref] = map[PolicyKey]PolicyValue{}
		}
		out[ref][k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func fillers(base identity.NumericID, n int) []policy.Entry {
	var es []policy.Entry
	for i := range n {
		es = append(es, allowIn(base+identity.NumericID(i), 6, uint16(1000+i), uint16(2000+i), policy.RuleID(100+i)))
	}
	return es
}

// TestApplyWritesOnlyDifferences: Apply writes into the inactive
// generation only what differs from what that generation holds, the state
// from two applies ago, and publishes nothing when the state is live
// already.
func TestApplyWritesOnlyDifferences(t *testing.T) {
	d := newTestDatapath(t, Config{})
	a := baseState(fillers(600, 20)...)
	b := baseState(append(fillers(600, 20), allowIn(clientID, 6, 80, 80, 7))...)
	c := baseState(append(fillers(600, 20), allowIn(clientID, 6, 80, 80, 7), allowIn(clientID, 17, 53, 53, 8))...)
	full := func(ms *policy.MapState) int { return len(encodeEndpoint(testEP, ms.Endpoints[testEP])) }

	st, err := d.Apply(a)
	if err != nil {
		t.Fatal(err)
	}
	if st.PolicyWrites != full(a) || st.Flipped != 1 || !st.Published {
		t.Fatalf("first apply %+v, want %d writes", st, full(a))
	}
	// The other generation is empty: B is written whole.
	if st, err = d.Apply(b); err != nil || st.PolicyWrites != full(b) || !st.Published {
		t.Fatalf("second apply %+v %v, want %d writes", st, err, full(b))
	}
	// The first generation still holds A: only A -> C is written.
	if st, err = d.Apply(c); err != nil || st.PolicyWrites != full(c)-full(a) || st.PolicyDeletes != 0 {
		t.Fatalf("third apply %+v %v, want %d writes", st, err, full(c)-full(a))
	}
	// Back to A: the second generation holds B, so one delete.
	if st, err = d.Apply(a); err != nil || st.PolicyWrites != 0 || st.PolicyDeletes != full(b)-full(a) {
		t.Fatalf("fourth apply %+v %v", st, err)
	}
	// What the map holds is what the mirrors say, and the live generation
	// holds A.
	live := liveSlots(t, d)
	for g := range uint8(2) {
		for id, want := range d.gens[g].slots {
			if len(want) == 0 && len(live[genRef{id, g}]) == 0 {
				continue
			}
			if !maps.Equal(live[genRef{id, g}], want) {
				t.Fatalf("endpoint %d generation %d: map and mirror differ", id, g)
			}
		}
	}
	if !maps.Equal(live[genRef{testEP, d.liveGen()}], encodeEndpoint(testEP, a.Endpoints[testEP])) {
		t.Fatal("the live generation does not hold A")
	}
	// The same state again, even as a new *EndpointPolicy: nothing to
	// write, nothing published, so conntrack re-judges nothing.
	rev := d.Revision()
	again := baseState(fillers(600, 20)...)
	if st, err = d.Apply(again); err != nil || st.Published || st.PolicyWrites+st.PolicyDeletes+st.IPCacheWrites != 0 || d.Revision() != rev {
		t.Fatalf("unchanged apply %+v %v", st, err)
	}
	// Removing the endpoint removes every entry of both generations.
	empty := baseState()
	delete(empty.Endpoints, testEP)
	if st, err = d.Apply(empty); err != nil || st.Removed != 1 {
		t.Fatalf("removing apply %+v %v", st, err)
	}
	if n := len(liveSlots(t, d)); n != 0 {
		t.Fatalf("%d endpoint generations left after removing the endpoint", n)
	}
	for g := range uint8(2) {
		if _, ok := d.epcfg.load(g, testEP); ok {
			t.Fatalf("generation %d still configures the endpoint", g)
		}
	}
}

// TestApplyMakeBeforeBreak judges new flows while policies flip back and
// forth: every verdict must be the old policy's or the new one's, never
// that of an empty or half-written slot.
func TestApplyMakeBeforeBreak(t *testing.T) {
	d := newTestDatapath(t, Config{DropEventInterval: 1})
	bindTestEndpoint(t, d, uint32(testEP))
	ev := openEvents(t, d)
	// Under p1, port 80 is denied by a wildcard-peer deny that shadows a
	// specific allow; p2 has neither. A slot caught between the two (the
	// deny gone, the allow not yet) would allow port 80: a third outcome.
	p1 := baseState(append(fillers(600, 150), allowIn(clientID, 6, 80, 80, 1), denyIn(identity.IDNone, 6, 80, 80, 2))...)
	p2 := baseState(append(fillers(900, 150), allowIn(clientID, 6, 81, 81, 3))...)
	if _, err := d.Apply(p1); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var applies atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			ms := p2
			if i%2 == 1 {
				ms = p1
			}
			if _, err := d.Apply(ms); err != nil {
				t.Errorf("apply: %v", err)
				return
			}
			applies.Add(1)
		}
	}()
	allowed := map[uint16][2]policy.RuleID{80: {2, policy.RuleDefault}, 81: {policy.RuleDefault, 3}}
	for i := 0; i < 3000 || applies.Load() < 20; i++ {
		port := uint16(80 + i%2)
		s := tcpSyn(clientIP, podIP, 40000, port)
		ret := run(t, d.objs.BulkheadToPod, s.build())
		key := ctKeyOf(uint32(testEP), s)
		var rule policy.RuleID
		if ret == retPass {
			var ct ConntrackItem
			if err := d.lookupConntrack(key, &ct); err != nil {
				t.Fatalf("no conntrack entry: %v", err)
			}
			rule = policy.RuleID(ct.RuleId)
			d.deleteConntrack(key)
		} else {
			evs := drainEvents(t, ev)
			if len(evs) == 0 {
				t.Fatal("drop without event")
			}
			rule = evs[len(evs)-1].Rule
			if err := d.objs.DropEvents.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		}
		if w := allowed[port]; rule != w[0] && rule != w[1] {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("port %d judged by rule %d during a flip; want %d or %d", port, rule, w[0], w[1])
		}
		drainEvents(t, ev)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d applies during the run", applies.Load())
}

func TestApplyRejectsInvalidEntries(t *testing.T) {
	d := newTestDatapath(t, Config{})
	for _, e := range []policy.Entry{
		allowIn(clientID, 0, 80, 80, 1),
		allowIn(clientID, 6, 81, 80, 1),
	} {
		if _, err := d.Apply(baseState(e)); !errors.Is(err, ErrInvalidEntry) {
			t.Fatalf("entry %+v: got %v, want ErrInvalidEntry", e, err)
		}
	}
}

// TestApplyNearFullTrie: the generation Apply writes is not live, so it is
// emptied of what goes before it gets what comes. Three policies of 400
// keys each, applied in turn on a 1,024-key trie: with writes first the
// target would hold the old and the new policy (800) beside the live one
// (400), and the apply would fail with ENOSPC, every retry again.
func TestApplyNearFullTrie(t *testing.T) {
	d := newTestDatapath(t, Config{MaxPolicyEntries: 1024})
	state := func(base uint16) *policy.MapState {
		var es []policy.Entry
		for i := range uint16(400) {
			es = append(es, allowIn(clientID, 6, base+i, base+i, policy.RuleID(1+i)))
		}
		return baseState(es...)
	}
	for round, base := range []uint16{1000, 2000, 3000, 4000} {
		if _, err := d.Apply(state(base)); err != nil {
			t.Fatalf("apply %d (ports %d-%d): %v", round, base, base+399, err)
		}
	}
}
