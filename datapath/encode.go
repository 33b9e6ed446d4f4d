package datapath

import (
	"cmp"
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Bit lengths of the policy key's prefix (see bpf/include/bulkhead.h).
const (
	policyFixedBits = 88 // ep_id, peer, slot, dir, pad
	policyProtoBits = 96 // + proto
)

// htons converts a port to the big-endian layout the BPF key holds, as a
// native-endian uint16 field.
func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func valueOf(e *policy.Entry) PolicyValue {
	return PolicyValue{RuleId: uint32(e.Rule), Action: uint8(e.Action), Flags: uint8(e.Flags)}
}

// portPrefix is a port block: the ports whose first bits bits equal base's.
type portPrefix struct {
	base uint16
	bits int
}

// rangePrefixes covers [lo, hi] with the fewest aligned blocks (at most 30).
func rangePrefixes(lo, hi uint32) []portPrefix {
	var out []portPrefix
	for lo <= hi {
		n := 0 // host bits of the block
		for n < 16 && lo&(1<<(n+1)-1) == 0 && lo+(1<<(n+1))-1 <= hi {
			n++
		}
		out = append(out, portPrefix{uint16(lo), 16 - n})
		lo += 1 << n
	}
	return out
}

// encodeEndpoint turns one endpoint's entries into policy map entries (with
// Slot 0), resolved per (direction, peer) into disjoint cells so that the
// longest prefix holds the winner by Lookup's order.
func encodeEndpoint(id policy.EndpointID, p *policy.EndpointPolicy) map[PolicyKey]PolicyValue {
	type group struct {
		dir  policy.Direction
		peer identity.NumericID
	}
	groups := map[group][]*policy.Entry{}
	for i := range p.Entries {
		e := &p.Entries[i]
		g := group{e.Direction, e.Peer}
		groups[g] = append(groups[g], e)
	}
	out := map[PolicyKey]PolicyValue{}
	for g, entries := range groups {
		base := PolicyKey{EpId: uint32(id), Peer: uint32(g.peer), Dir: uint8(g.dir)}
		var wild []*policy.Entry
		byProto := map[uint8][]*policy.Entry{}
		for _, e := range entries {
			if e.Proto == 0 {
				wild = append(wild, e)
			} else {
				byProto[e.Proto] = append(byProto[e.Proto], e)
			}
		}
		var wildBest *policy.Entry
		for _, e := range wild {
			if wildBest == nil || e.Beats(wildBest) {
				wildBest = e
			}
		}
		if wildBest != nil {
			k := base
			k.Prefixlen = policyFixedBits
			out[k] = valueOf(wildBest)
		}
		for proto, es := range byProto {
			for _, c := range protoCells(es, wildBest) {
				for _, pp := range rangePrefixes(uint32(c.lo), uint32(c.hi)) {
					k := base
					k.Proto = proto
					k.Prefixlen = uint32(policyProtoBits + pp.bits)
					k.Dport = htons(pp.base)
					out[k] = c.val
				}
			}
		}
	}
	return out
}

type cell struct {
	lo, hi uint16
	val    PolicyValue
}

// protoCells splits the port space of one protocol's entries into disjoint
// cells with their winner, merging neighbours with the same outcome. Ports
// no entry of the protocol covers are left to the any-protocol prefix.
func protoCells(es []*policy.Entry, wildBest *policy.Entry) []cell {
	points := make([]uint32, 0, 2*len(es))
	for _, e := range es {
		points = append(points, uint32(e.PortLo), uint32(e.PortHi)+1)
	}
	slices.Sort(points)
	points = slices.Compact(points)
	var cells []cell
	for i := 0; i+1 < len(points); i++ {
		lo, hi := points[i], points[i+1]-1
		var best *policy.Entry
		for _, e := range es {
			if uint32(e.PortLo) <= lo && hi <= uint32(e.PortHi) && (best == nil || e.Beats(best)) {
				best = e
			}
		}
		if best == nil {
			continue
		}
		// Any-protocol entries cover every port; the best of them is the
		// only one that can beat this cell's best. Entry.Beats is Lookup's
		// own order.
		if wildBest != nil && wildBest.Beats(best) {
			best = wildBest
		}
		v := valueOf(best)
		if n := len(cells); n > 0 && cells[n-1].val == v && uint32(cells[n-1].hi)+1 == lo {
			cells[n-1].hi = uint16(hi)
			continue
		}
		cells = append(cells, cell{uint16(lo), uint16(hi), v})
	}
	return cells
}

// epConfigOf is the endpoint's ep_configs value, without the slot.
func epConfigOf(p *policy.EndpointPolicy) EPConfig {
	c := EPConfig{
		Identity:   uint32(p.Identity),
		DefIngress: uint8(p.Default[policy.Ingress]),
		DefEgress:  uint8(p.Default[policy.Egress]),
	}
	if p.Audit {
		c.Flags |= epAudit
	}
	// BPF skips the policy lookups these rule out (EP_EXACT_PEER,
	// EP_WILD_PEER): a lookup that cannot match costs as much as one that
	// does.
	for _, e := range p.Entries {
		if e.Peer == identity.IDNone {
			c.Flags |= epWildPeer << e.Direction
		} else {
			c.Flags |= epExactPeer << e.Direction
		}
	}
	return c
}

const (
	epAudit     = 1      // EP_AUDIT
	epExactPeer = 1 << 1 // EP_EXACT_PEER, shifted by the direction
	epWildPeer  = 1 << 3 // EP_WILD_PEER, shifted by the direction
)

// ipcacheGenBits is IPCACHE_GEN_BITS: the generation word in front of the
// address, always matched.
const ipcacheGenBits = 32

// ipcacheKeyOf stores IPv4 prefixes v4-mapped, in generation 0.
func ipcacheKeyOf(p netip.Prefix) IPCacheKey {
	p = p.Masked()
	a := p.Addr()
	bits := ipcacheGenBits + p.Bits()
	if a.Is4() {
		bits += 96
	}
	b := a.As16()
	var k IPCacheKey
	k.Prefixlen = uint32(bits)
	for i := range 4 {
		k.Addr[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return k
}

// addrOf decodes a v4-mapped or IPv6 address from its BPF layout.
func addrOf(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range 4 {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

// sortedKeys gives deterministic write order (for logs and tests).
func sortedKeys(m map[PolicyKey]PolicyValue) []PolicyKey {
	keys := make([]PolicyKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b PolicyKey) int {
		return cmp.Or(cmp.Compare(a.Dir, b.Dir), cmp.Compare(a.Peer, b.Peer),
			cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Prefixlen, b.Prefixlen), cmp.Compare(a.Dport, b.Dport))
	})
	return keys
}
