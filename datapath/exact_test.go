package datapath

import (
	"net/netip"
	"slices"
	"testing"
)

// get returns key's value from an exact table.
func (t *exactTable) get(key []uint32, seed uint32) ([]uint32, bool) {
	base := t.bucket(key, seed)
	for w := range exactWays {
		if _, k, v := t.parts(t.slot(base + w)); !isZero(v) && slices.Equal(k, key) {
			return slices.Clone(v), true
		}
	}
	return nil, false
}

// TestExactTablesResyncOnOpen leaves the exact-match tables out of step
// with the tries, as a process that died between the two writes would, and
// checks that re-opening the pins puts them right: a stale identity, a
// stale policy value and an entry the trie no longer has.
func TestExactTablesResyncOnOpen(t *testing.T) {
	d := newTestDatapath(t, Config{})
	bindTestEndpoint(t, d, uint32(testEP))
	if _, err := d.Apply(baseState(allowIn(clientID, 6, 80, 80, 7))); err != nil {
		t.Fatal(err)
	}
	seed := d.ctSeed()
	live := d.liveGen()
	clientKey := ipcacheKeyOf(netip.PrefixFrom(clientIP, 32))
	clientKey.Gen = uint32(live)
	client := hostKey(clientKey)
	var pk PolicyKey
	var pv PolicyValue
	for k, v := range d.gens[live].slots[testEP] {
		if k.Prefixlen == policyFullBits {
			pk, pv = k, v
			pk.Slot = live
		}
	}
	if pk.Prefixlen == 0 {
		t.Fatal("no full-length policy entry to test with")
	}
	if got, ok := d.hosts.get(client, seed); !ok || got[0] != uint32(clientID) {
		t.Fatalf("host table: %v %v, want the client's identity", got, ok)
	}
	// Out of step: a wrong identity, a wrong rule, an address nobody has.
	ghostKey := ipcacheKeyOf(netip.PrefixFrom(otherIP, 32))
	ghostKey.Addr[3] ^= 0xff000000
	ghost := hostKey(ghostKey)
	d.hosts.put(client, []uint32{9999}, seed)
	bad := pv
	bad.RuleId = 4242
	d.policyExact.put(policyExactKey(&pk), policyExactValue(bad), seed)
	d.hosts.put(ghost, []uint32{77}, seed)

	d2, err := New(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if got, ok := d2.hosts.get(client, seed); !ok || got[0] != uint32(clientID) {
		t.Errorf("after re-open, host table says %v %v for the client, want %d", got, ok, clientID)
	}
	if got, ok := d2.policyExact.get(policyExactKey(&pk), seed); !ok || got[0] != pv.RuleId {
		t.Errorf("after re-open, policy_exact says %v %v, want rule %d", got, ok, pv.RuleId)
	}
	if got, ok := d2.hosts.get(ghost, seed); ok {
		t.Errorf("after re-open, an address the ipcache does not hold is still there: %v", got)
	}
}

// TestCTHashSpreads checks that ct_hash's Go twin spreads the keys nodes
// really see (one client address and consecutive source ports, a /16 of
// consecutive addresses on one port, IPv6 keys that differ in one word)
// over the buckets about as evenly as random placement would: for 65,536
// keys in 16,384 buckets (4 each on average) random placement's fullest
// bucket holds about 13, and a hash that keeps structure piles far more
// into some buckets.
func TestCTHashSpreads(t *testing.T) {
	const buckets = 16384
	for _, seed := range []uint32{0, 1, 0xdeadbeef, 0x80000000} {
		for name, key := range map[string]func(i uint32) []uint32{
			"ports":   func(i uint32) []uint32 { return []uint32{0x0a000001, 0x0a000002, 7, i<<16 | 80, 6} },
			"addrs":   func(i uint32) []uint32 { return []uint32{0x0a000000 + i, 0x0a640001, 7, 40000<<16 | 443, 6} },
			"ipv6":    func(i uint32) []uint32 { return []uint32{0xfd00, 0, 0, i, 0xfd00, 0, 0, 1, 3, 80<<16 | 5353, 17} },
			"ep-port": func(i uint32) []uint32 { return []uint32{0x0a000001, 0x0a000002, i >> 8, (i&0xff)<<16 | 53, 17} },
		} {
			load := make([]int, buckets)
			most := 0
			for i := range uint32(4 * buckets) {
				b := ctHash(key(i), seed) & (buckets - 1)
				load[b]++
				most = max(most, load[b])
			}
			if most > 20 {
				t.Errorf("seed %#x, %s: fullest bucket holds %d of %d keys (random: about 13)", seed, name, most, 4*buckets)
			}
		}
	}
}
