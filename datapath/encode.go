package datapath

import (
	"cmp"
	"encoding/binary"
	"maps"
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

// encodeEndpoint turns one endpoint's entries into policy map entries (with
// Slot 0). Each value carries two views (struct policy_value): the plain
// one, in which allows with FlagMTLSRequired do not match, and the
// tunnelled one, in which they match TCP (policy.MapState.LookupFlow). The
// keys are policy.EndpointPolicy.TrieKeys of the plain view, the TCP keys
// of the tunnelled view, and, for a (direction, peer) that has an mTLS
// allow, that peer's whole-TCP key: a TCP lookup then never ends at the
// any-protocol key, whose tunnelled view would be wrong for other
// protocols. An endpoint without mTLS allows gets exactly the keys of
// TrieKeys, which is what the compiler budgets. Each view's value at a key
// is that view's longest match of the key, which is what the view's own
// trie would answer for every lookup that ends at the key.
func encodeEndpoint(id policy.EndpointID, p *policy.EndpointPolicy) map[PolicyKey]PolicyValue {
	plain, mtlsGroups := plainView(p)
	plainKeys := map[policy.TrieKey]*policy.Entry{}
	plain.TrieKeys(func(tk policy.TrieKey, e *policy.Entry) { plainKeys[tk] = e })
	keys := maps.Clone(plainKeys)
	tunKeys := plainKeys
	if len(mtlsGroups) > 0 {
		tunKeys = map[policy.TrieKey]*policy.Entry{}
		p.TrieKeys(func(tk policy.TrieKey, e *policy.Entry) {
			tunKeys[tk] = e
			if tk.Proto == protoTCP {
				keys[tk] = e
			}
		})
		for g := range mtlsGroups {
			keys[policy.TrieKey{Direction: g.dir, Peer: g.peer, Proto: protoTCP}] = nil
		}
	}
	out := make(map[PolicyKey]PolicyValue, len(keys))
	for tk := range keys {
		k := PolicyKey{EpId: uint32(id), Peer: uint32(tk.Peer), Dir: uint8(tk.Direction)}
		if tk.Proto == 0 {
			k.Prefixlen = policyFixedBits
		} else {
			k.Proto = tk.Proto
			k.Prefixlen = uint32(policyProtoBits + tk.PortBits)
			k.Dport = htons(tk.Port)
		}
		var v PolicyValue
		if e := longestMatch(plainKeys, tk); e != nil {
			v.RuleId, v.Action, v.Flags = uint32(e.Rule), uint8(e.Action), uint8(e.Flags)
		}
		// Off TCP the tunnelled view is the plain one: an mTLS allow
		// never matches another protocol.
		tv := plainKeys
		if tk.Proto == protoTCP {
			tv = tunKeys
		}
		if e := longestMatch(tv, tk); e != nil {
			v.TunRuleId, v.TunAction, v.TunFlags = uint32(e.Rule), uint8(e.Action), uint8(e.Flags)
		}
		out[k] = v
	}
	return out
}

// PolicyKeys is how many policy trie keys endpoint policy p takes in one
// generation: policy.EndpointPolicy.TrieSize, plus the tunnelled view's
// keys when p has mtls: Required allows (see encodeEndpoint). Budgets
// that count TrieSize undercount such endpoints.
func PolicyKeys(p *policy.EndpointPolicy) int { return len(encodeEndpoint(0, p)) }

type peerGroup struct {
	dir  policy.Direction
	peer identity.NumericID
}

// plainView is p without its mTLS allows (still in canonical order), and
// the (direction, peer) groups that had one.
func plainView(p *policy.EndpointPolicy) (*policy.EndpointPolicy, map[peerGroup]bool) {
	var groups map[peerGroup]bool
	for _, e := range p.Entries {
		if isMTLSAllow(&e) {
			if groups == nil {
				groups = map[peerGroup]bool{}
			}
			groups[peerGroup{e.Direction, e.Peer}] = true
		}
	}
	if groups == nil {
		return p, nil
	}
	q := *p
	q.Entries = slices.DeleteFunc(slices.Clone(p.Entries), func(e policy.Entry) bool { return isMTLSAllow(&e) })
	return &q, groups
}

func isMTLSAllow(e *policy.Entry) bool {
	return e.Action == policy.ActionAllow && e.Flags&policy.FlagMTLSRequired != 0
}

// longestMatch is what an LPM trie holding keys answers for the prefix tk:
// the entry of the longest key that is a prefix of tk, or nil.
func longestMatch(keys map[policy.TrieKey]*policy.Entry, tk policy.TrieKey) *policy.Entry {
	if tk.Proto != 0 {
		for bits := tk.PortBits; bits >= 0; bits-- {
			q := tk
			q.PortBits = bits
			q.Port = tk.Port &^ uint16(0xffff>>bits) // the first bits bits
			if bits == 0 {
				q.Port = 0
			}
			if e, ok := keys[q]; ok && e != nil {
				return e
			}
		}
	}
	e := keys[policy.TrieKey{Direction: tk.Direction, Peer: tk.Peer}]
	return e
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
	if p.Enrolled {
		c.Flags |= epEnrolled
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
	epEnrolled  = 1 << 5 // EP_ENROLLED
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
	return IPCacheKey{Prefixlen: uint32(bits), Addr: addrWords(a)}
}

// addrWords encodes an address in its BPF layout (IPv4 v4-mapped): the
// inverse of addrOf.
func addrWords(a netip.Addr) [4]uint32 {
	b := a.As16()
	var w [4]uint32
	for i := range 4 {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
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
