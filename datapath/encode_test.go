package datapath

import (
	"math/rand/v2"
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
