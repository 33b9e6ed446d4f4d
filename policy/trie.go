package policy

import (
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
)

// TrieKey is one key of an endpoint's policy in the datapath's LPM trie (in
// one policy generation). The datapath encodes exactly the keys TrieKeys yields,
// so the compiler can budget trie space without knowing the map layout.
type TrieKey struct {
	Direction Direction
	Peer      identity.NumericID
	// Proto 0 is the key that matches every protocol and port of the peer.
	Proto uint8
	// Port and PortBits describe a port block, for Proto != 0: the ports
	// whose first PortBits bits equal Port's.
	Port     uint16
	PortBits int
}

// TrieKeys calls yield with every trie key of the endpoint's policy and the
// entry that wins there by Lookup's order. Per (direction, peer), the
// any-protocol entries share one key; each protocol's port space is cut at
// the entries' bounds into cells with one winner, neighbouring cells with
// the same outcome merge, and each cell becomes the fewest aligned port
// blocks (an unaligned range costs up to 30 keys). The keys are disjoint,
// so the longest prefix holds the winner.
func (p *EndpointPolicy) TrieKeys(yield func(TrieKey, *Entry)) {
	es := p.Entries
	// In canonical order (the invariant of Entries) a (direction, peer)
	// group, and a protocol within it, are runs: no maps needed.
	if !slices.IsSortedFunc(es, CompareEntries) {
		es = SortEntries(slices.Clone(es))
	}
	var group []*Entry
	for i := 0; i < len(es); {
		j := i
		for j < len(es) && es[j].Direction == es[i].Direction && es[j].Peer == es[i].Peer {
			j++
		}
		group = group[:0]
		for k := i; k < j; k++ {
			group = append(group, &es[k])
		}
		groupKeys(group, yield)
		i = j
	}
}

// groupKeys yields the keys of one (direction, peer) group in canonical
// order: the any-protocol entries first, then each protocol's.
func groupKeys(entries []*Entry, yield func(TrieKey, *Entry)) {
	dir, peer := entries[0].Direction, entries[0].Peer
	var wildBest *Entry
	i := 0
	for ; i < len(entries) && entries[i].Proto == 0; i++ {
		if wildBest == nil || entries[i].Beats(wildBest) {
			wildBest = entries[i]
		}
	}
	if wildBest != nil {
		yield(TrieKey{Direction: dir, Peer: peer}, wildBest)
	}
	for i < len(entries) {
		j := i
		for j < len(entries) && entries[j].Proto == entries[i].Proto {
			j++
		}
		proto := entries[i].Proto
		for _, c := range protoCells(entries[i:j], wildBest) {
			for _, b := range portBlocks(uint32(c.lo), uint32(c.hi)) {
				yield(TrieKey{Direction: dir, Peer: peer, Proto: proto, Port: b.base, PortBits: b.bits}, c.best)
			}
		}
		i = j
	}
}

// TrieSize is the number of keys TrieKeys yields: what the endpoint's
// policy costs in one generation of the datapath's policy trie.
func (p *EndpointPolicy) TrieSize() int {
	n := 0
	p.TrieKeys(func(TrieKey, *Entry) { n++ })
	return n
}

// portBlock is the ports whose first bits bits equal base's.
type portBlock struct {
	base uint16
	bits int
}

// portBlocks covers [lo, hi] with the fewest aligned blocks (at most 30).
func portBlocks(lo, hi uint32) []portBlock {
	var out []portBlock
	for lo <= hi {
		n := 0 // host bits of the block
		for n < 16 && lo&(1<<(n+1)-1) == 0 && lo+(1<<(n+1))-1 <= hi {
			n++
		}
		out = append(out, portBlock{uint16(lo), 16 - n})
		lo += 1 << n
	}
	return out
}

type portCell struct {
	lo, hi uint16
	best   *Entry
}

// sameOutcome: two entries that a packet cannot tell apart in the datapath.
func sameOutcome(a, b *Entry) bool {
	return a.Rule == b.Rule && a.Action == b.Action && a.Flags == b.Flags
}

// protoCells splits the port space of one protocol's entries into disjoint
// cells with their winner, merging neighbours with the same outcome. Ports
// no entry of the protocol covers are left to the any-protocol key.
func protoCells(es []*Entry, wildBest *Entry) []portCell {
	points := make([]uint32, 0, 2*len(es))
	for _, e := range es {
		points = append(points, uint32(e.PortLo), uint32(e.PortHi)+1)
	}
	slices.Sort(points)
	points = slices.Compact(points)
	var cells []portCell
	for i := 0; i+1 < len(points); i++ {
		lo, hi := points[i], points[i+1]-1
		var best *Entry
		for _, e := range es {
			if uint32(e.PortLo) <= lo && hi <= uint32(e.PortHi) && (best == nil || e.Beats(best)) {
				best = e
			}
		}
		if best == nil {
			continue
		}
		// Any-protocol entries cover every port; the best of them is the
		// only one that can beat this cell's best.
		if wildBest != nil && wildBest.Beats(best) {
			best = wildBest
		}
		if n := len(cells); n > 0 && sameOutcome(cells[n-1].best, best) && uint32(cells[n-1].hi)+1 == lo {
			cells[n-1].hi = uint16(hi)
			continue
		}
		cells = append(cells, portCell{uint16(lo), uint16(hi), best})
	}
	return cells
}
