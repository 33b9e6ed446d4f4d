package identity

import "net/netip"

// Host returns the single-address prefix of addr (/32 or /128), the ipcache
// key of a pod IP.
func Host(addr netip.Addr) netip.Prefix {
	addr = addr.Unmap()
	return netip.PrefixFrom(addr, addr.BitLen())
}

// LongestMatch resolves addr the way the datapath's LPM ipcache does: the
// identity of the most specific prefix that contains it, or IDWorld.
func LongestMatch(cache map[netip.Prefix]NumericID, addr netip.Addr) NumericID {
	addr = addr.Unmap()
	for bits := addr.BitLen(); bits >= 0; bits-- {
		p, err := addr.Prefix(bits)
		if err != nil {
			continue
		}
		if id, ok := cache[p]; ok {
			return id
		}
	}
	return IDWorld
}

// Contains reports whether outer contains all of inner (same family).
func Contains(outer, inner netip.Prefix) bool {
	return outer.Addr().BitLen() == inner.Addr().BitLen() && outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}
