package policy

import (
	"net/netip"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Matches reports whether the entry applies to a packet, with the matching
// rule of Lookup (peer equal or wildcard, protocol equal or wildcard, port in
// range). The explain engine lists every matching rule with it; Lookup stays
// the one place that picks the winner.
func (e *Entry) Matches(dir Direction, peer identity.NumericID, proto uint8, port uint16) bool {
	return e.Direction == dir && (e.Peer == identity.IDNone || e.Peer == peer) &&
		(e.Proto == 0 || e.Proto == proto) && port >= e.PortLo && port <= e.PortHi
}

// ResolveIP returns the identity the datapath gives addr: the ipcache's
// longest-prefix match, or IDWorld.
func (m *MapState) ResolveIP(addr netip.Addr) identity.NumericID {
	return identity.LongestMatch(m.IPCache, addr)
}
