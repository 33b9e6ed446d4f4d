package demo

import (
	"fmt"
	"net/netip"
	"os"
	"strings"

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
