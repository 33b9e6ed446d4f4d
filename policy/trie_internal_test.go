package policy

import (
	"math/rand/v2"
	"testing"
)

// TestPortBlocks checks the port range decomposition:
// the blocks cover exactly [lo, hi], are aligned, and never exceed 30.
func TestPortBlocks(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	check := func(lo, hi uint32) {
		ps := portBlocks(lo, hi)
		if len(ps) > 30 {
			t.Fatalf("[%d,%d]: %d prefixes", lo, hi, len(ps))
		}
		next := lo
		for _, p := range ps {
			size := uint32(1) << (16 - p.bits)
			if uint32(p.base) != next || uint32(p.base)%size != 0 {
				t.Fatalf("[%d,%d]: block %+v not aligned or not contiguous at %d", lo, hi, p, next)
			}
			next += size
		}
		if next != hi+1 {
			t.Fatalf("[%d,%d]: blocks end at %d", lo, hi, next-1)
		}
	}
	check(0, 65535)
	check(1, 65534)
	check(80, 80)
	for range 20000 {
		a, b := rng.Uint32N(65536), rng.Uint32N(65536)
		if a > b {
			a, b = b, a
		}
		check(a, b)
	}
	if n := len(portBlocks(1, 65534)); n != 30 {
		t.Fatalf("[1,65534] takes %d prefixes, want the worst case 30", n)
	}
}

// TestTrieKeysLongestPrefixIsLookup: within one (direction, peer) group,
// the longest trie key that matches a packet holds the entry Lookup picks
// (same rule, action and flags), and no two keys are equal.
func TestTrieKeysLongestPrefixIsLookup(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 3000 {
		var es []Entry
		for range 1 + rng.IntN(12) {
			e := Entry{Direction: Ingress, Peer: 300, Action: ActionAllow, Rule: RuleID(1 + rng.IntN(6)), PortHi: 65535}
			if rng.IntN(3) == 0 {
				e.Action = ActionDeny
			}
			if rng.IntN(6) > 0 {
				e.Proto = []uint8{6, 17}[rng.IntN(2)]
				lo := uint16(rng.IntN(2000))
				e.PortLo, e.PortHi = lo, lo+uint16(rng.IntN(2000))
			}
			es = append(es, e)
		}
		p := &EndpointPolicy{Default: [2]DefaultVerdict{DefaultDeny, DefaultDeny}, Entries: SortEntries(es)}
		type kv struct {
			k TrieKey
			e *Entry
		}
		var keys []kv
		seen := map[TrieKey]bool{}
		p.TrieKeys(func(k TrieKey, e *Entry) {
			if seen[k] {
				t.Fatalf("key %+v yielded twice", k)
			}
			seen[k] = true
			keys = append(keys, kv{k, e})
		})
		ms := &MapState{Endpoints: map[EndpointID]*EndpointPolicy{1: p}}
		for range 200 {
			proto := []uint8{6, 17, 132}[rng.IntN(3)]
			port := uint16(rng.IntN(4200))
			var best *kv
			bestLen := -1
			for i := range keys {
				k := keys[i].k
				l := 0
				if k.Proto != 0 {
					if k.Proto != proto || (port^k.Port)>>(16-k.PortBits) != 0 && k.PortBits > 0 {
						continue
					}
					l = 1 + k.PortBits
				}
				if l > bestLen {
					best, bestLen = &keys[i], l
				}
			}
			d := ms.Lookup(1, Ingress, 300, proto, port)
			if best == nil {
				if d.Rule != RuleDefault {
					t.Fatalf("proto %d port %d: no key matches, Lookup says rule %d: %+v", proto, port, d.Rule, es)
				}
				continue
			}
			if best.e.Rule != d.Rule || (best.e.Action == ActionDeny) != (d.Verdict == VerdictDeny) {
				t.Fatalf("proto %d port %d: trie gives %+v, Lookup %+v: %+v", proto, port, *best.e, d, es)
			}
		}
	}
}
