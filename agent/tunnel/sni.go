package tunnel

import (
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
)

// sniSuffix ends every server name the tunnel sends: .invalid can never be
// a real name, so the SNI only ever means "the pod with this IP".
const sniSuffix = ".pod.bulkhead.invalid"

// serverName is the SNI for destination pod ip: its 16-byte form (IPv4
// v4-mapped) in hex, so that the server picks that pod's SVID.
func serverName(ip netip.Addr) string {
	b := ip.As16()
	return hex.EncodeToString(b[:]) + sniSuffix
}

// parseServerName is the inverse of serverName.
func parseServerName(name string) (netip.Addr, error) {
	h, ok := strings.CutSuffix(strings.ToLower(name), sniSuffix)
	if !ok || len(h) != 32 {
		return netip.Addr{}, fmt.Errorf("server name %q is not a pod name", name)
	}
	var b [16]byte
	if _, err := hex.Decode(b[:], []byte(h)); err != nil {
		return netip.Addr{}, fmt.Errorf("server name %q: %w", name, err)
	}
	return netip.AddrFrom16(b).Unmap(), nil
}
