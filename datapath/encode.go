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

// encodeEndpoint turns one endpoint's entries into policy map entries (with
// Slot 0): exactly the keys policy.EndpointPolicy.TrieKeys yields, which is
// also what the compiler budgets.
func encodeEndpoint(id policy.EndpointID, p *policy.EndpointPolicy) map[PolicyKey]PolicyValue {
	out := map[PolicyKey]PolicyValue{}
	p.TrieKeys(func(tk policy.TrieKey, e *policy.Entry) {
		k := PolicyKey{EpId: uint32(id), Peer: uint32(tk.Peer), Dir: uint8(tk.Direction)}
		if tk.Proto == 0 {
			k.Prefixlen = policyFixedBits
		} else {
			k.Proto = tk.Proto
			k.Prefixlen = uint32(policyProtoBits + tk.PortBits)
			k.Dport = htons(tk.Port)
		}
		out[k] = valueOf(e)
	})
	return out
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
