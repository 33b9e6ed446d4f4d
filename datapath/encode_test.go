package datapath

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// TestEncodeCostsTrieSize: what the compiler budgets (TrieSize) is exactly
// what encodeEndpoint writes into one slot, for random policies with
// overlapping, unaligned port ranges, wildcards and deny rules: both come
// from policy.TrieKeys, and no two of its keys collapse into one map key.
func TestEncodeCostsTrieSize(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 2000 {
		var es []policy.Entry
		for range 1 + rng.IntN(30) {
			e := policy.Entry{Direction: policy.Direction(rng.IntN(2)), Peer: identity.NumericID(256 + rng.IntN(4)),
				Action: policy.ActionAllow, Rule: policy.RuleID(1 + rng.IntN(5)), PortLo: 0, PortHi: 65535}
			if rng.IntN(5) == 0 {
				e.Peer = identity.IDNone
			}
			if rng.IntN(4) == 0 {
				e.Action = policy.ActionDeny
			}
			if rng.IntN(5) > 0 {
				e.Proto = []uint8{6, 17, 132}[rng.IntN(3)]
				lo := uint16(rng.IntN(65536))
				e.PortLo, e.PortHi = lo, lo+uint16(rng.IntN(int(65535-lo)+1))
			}
			es = append(es, e)
		}
		p := &policy.EndpointPolicy{Entries: policy.SortEntries(es)}
		if got, want := p.TrieSize(), len(encodeEndpoint(7, p)); got != want {
			t.Fatalf("TrieSize %d, encodeEndpoint writes %d keys: %+v", got, want, es)
		}
	}
}

// TestPolicyKeysMTLS: without mTLS allows an endpoint takes exactly
// TrieSize keys; an any-protocol mTLS allow for another peer adds that
// peer's whole-TCP key, which only the tunnelled view allows.
func TestPolicyKeysMTLS(t *testing.T) {
	plain := &policy.EndpointPolicy{Entries: policy.SortEntries([]policy.Entry{
		allowIn(clientID, 6, 80, 80, 1), allowIn(otherID, 0, 0, 65535, 2)})}
	if got, want := PolicyKeys(plain), plain.TrieSize(); got != want {
		t.Fatalf("no mTLS: %d keys, want TrieSize %d", got, want)
	}
	const peer = identity.NumericID(900)
	m := allowIn(peer, 0, 0, 65535, 3)
	m.Flags = policy.FlagMTLSRequired
	withMTLS := &policy.EndpointPolicy{Entries: policy.SortEntries(append(slices.Clone(plain.Entries), m))}
	keys := encodeEndpoint(1, withMTLS)
	if len(keys) != plain.TrieSize()+1 || PolicyKeys(withMTLS) != len(keys) {
		t.Fatalf("%d keys, want %d", len(keys), plain.TrieSize()+1)
	}
	found := false
	for k, v := range keys {
		if k.Peer != uint32(peer) {
			continue
		}
		found = true
		if k.Proto != 6 || k.Prefixlen != policyProtoBits || v.Action != 0 || v.TunRuleId != 3 ||
			v.TunAction != uint8(policy.ActionAllow) || v.TunFlags != uint8(policy.FlagMTLSRequired) {
			t.Fatalf("key %+v value %+v: want the whole-TCP key, no plain entry, the mTLS allow tunnelled", k, v)
		}
	}
	if !found {
		t.Fatal("no key for the mTLS peer")
	}
}
