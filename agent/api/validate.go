package api

import (
	"errors"
	"fmt"
	"net/netip"
)

// ErrNoPodIP is wrapped by CheckPodIPs for a result without any address.
var ErrNoPodIP = errors.New("no pod IP")

// CheckPodIPs rejects addresses that cannot be a pod's own: an endpoint's
// addresses become host entries of the node's ipcache, so 0.0.0.0/0 (read
// as the address 0.0.0.0), a loopback, multicast or broadcast address, a
// subnet's network or broadcast address, or an address with a /0 mask
// would give the pod's identity to traffic that is not the pod's. At least
// one address is required: an endpoint without one enforces nothing on
// the traffic addressed to it.
func CheckPodIPs(ips []netip.Prefix) error {
	if len(ips) == 0 {
		return fmt.Errorf("%w: the previous plugin's result assigns no address to the pod's interface", ErrNoPodIP)
	}
	for _, p := range ips {
		if err := checkPodIP(p); err != nil {
			return fmt.Errorf("pod address %s: %w", p, err)
		}
	}
	return nil
}

func checkPodIP(p netip.Prefix) error {
	a := p.Addr()
	switch {
	case !p.IsValid():
		return errors.New("not a valid address")
	case a.Is4In6():
		return errors.New("a v4-mapped IPv6 address")
	case p.Bits() == 0:
		return errors.New("a /0 prefix is a route to everything, not a pod's address")
	case a.IsUnspecified():
		return errors.New("the unspecified address")
	case a.IsLoopback(), a.IsMulticast(), a.IsLinkLocalUnicast(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return errors.New("not a unicast address a pod can own")
	}
	if a.Is4() && p.Bits() <= 30 {
		// In a subnet of more than two addresses the first and the last
		// are the network and its broadcast address.
		if a == p.Masked().Addr() {
			return errors.New("the network address of its subnet")
		}
		if a == lastAddr(p) {
			return errors.New("the broadcast address of its subnet")
		}
	}
	if a.Is6() && p.Bits() <= 126 && a == p.Masked().Addr() {
		return errors.New("the subnet-router anycast address of its subnet")
	}
	return nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := 32 - p.Bits()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= (1 << host) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
