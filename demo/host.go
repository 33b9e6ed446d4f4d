package demo

import (
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/demo/subnets"
)

// Demo subnets: /24s at the top of 10.213.0.0/16, the range the project's
// tests use, so nothing else on a developer machine is touched.
const (
	firstOctet = 250
	lastOctet  = 254
)

// reserveSubnet picks a free /24 for the demo's pods.
func reserveSubnet() (netip.Prefix, func() error, error) {
	octets := make([]int, 0, lastOctet-firstOctet+1)
	for o := firstOctet; o <= lastOctet; o++ {
		octets = append(octets, o)
	}
	return subnets.Reserve(octets)
}

const ipForward = "/proc/sys/net/ipv4/ip_forward"

// ensureForwarding turns on IPv4 forwarding, which pod-to-pod traffic over
// ptp needs (it is routed by the host), and returns a function that puts
// the old value back.
func ensureForwarding() (func() error, error) {
	b, err := os.ReadFile(ipForward)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", ipForward, err)
	}
	if strings.TrimSpace(string(b)) == "1" {
		return func() error { return nil }, nil
	}
	if err := os.WriteFile(ipForward, []byte("1"), 0o644); err != nil {
		return nil, fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return func() error { return os.WriteFile(ipForward, b, 0o644) }, nil
}

// tunnelRoutingCleanup returns what removes the mTLS tunnel's policy
// routing that the demo's agent installs in this namespace, once the agent
// has stopped: nothing when the routing was there before the demo (a
// node's own agent installed it and relies on it).
func tunnelRoutingCleanup() (remove func() error, owned bool, err error) {
	mark, mask, table, prio := uint32(datapath.DefaultTunnelMark), uint32(datapath.DefaultTunnelMask), datapath.DefaultTunnelTable, datapath.DefaultTunnelPriority
	had, err := datapath.HasTunnelRouting(mark, mask, table, prio)
	if err != nil {
		return nil, false, fmt.Errorf("look for the tunnel's routing: %w", err)
	}
	if had {
		return func() error { return nil }, false, nil
	}
	return func() error { return datapath.RemoveTunnelRouting(mark, mask, table, prio) }, true, nil
}

// tunnelRoutingScript is the shell that removes the tunnel's policy
// routing, for the --keep cleanup script.
func tunnelRoutingScript() string {
	var b strings.Builder
	for _, ip := range []string{"ip", "ip -6"} {
		fmt.Fprintf(&b, "%s rule del priority %d fwmark %#x/%#x lookup %d 2>/dev/null\n", ip,
			datapath.DefaultTunnelPriority, datapath.DefaultTunnelMark, datapath.DefaultTunnelMask, datapath.DefaultTunnelTable)
		fmt.Fprintf(&b, "%s route flush table %d 2>/dev/null\n", ip, datapath.DefaultTunnelTable)
	}
	return b.String()
}
