package demo

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
)

// Demo subnets: /24s at the top of 10.213.0.0/16, the range the project's
// tests use, so nothing else on a developer machine is touched.
const (
	firstOctet = 250
	lastOctet  = 254
)

// subnetLockDir is shared with the test harness (tests/cnichain), which
// takes /24s of 10.213.0.0/16 the same way: a file per /24 holding the
// owner's PID. So a demo and a test run at the same time never collide.
func subnetLockDir() string { return filepath.Join(os.TempDir(), "bulkhead-cnichain-subnets") }

// reserveSubnet picks a free /24 for the demo's pods: one no route
// overlaps and no other live process holds.
func reserveSubnet() (netip.Prefix, func() error, error) {
	dir := subnetLockDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return netip.Prefix{}, nil, fmt.Errorf("subnet lock dir: %w", err)
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Prefix{}, nil, fmt.Errorf("list routes: %w", err)
	}
	for octet := firstOctet; octet <= lastOctet; octet++ {
		pfx := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 213, byte(octet), 0}), 24)
		if routeOverlaps(routes, pfx) {
			continue
		}
		lock := filepath.Join(dir, strconv.Itoa(octet))
		if !tryLock(lock) {
			continue
		}
		return pfx, func() error {
			if err := os.Remove(lock); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("release subnet lock: %w", err)
			}
			return nil
		}, nil
	}
	return netip.Prefix{}, nil, fmt.Errorf("no free /24 in 10.213.%d.0-10.213.%d.0 (routes there, or other runs hold them)", firstOctet, lastOctet)
}

func routeOverlaps(routes []netlink.Route, pfx netip.Prefix) bool {
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		if ones == 0 {
			continue // the default route overlaps everything
		}
		if netip.PrefixFrom(a.Unmap(), ones).Overlaps(pfx) {
			return true
		}
	}
	return false
}

// tryLock creates path holding our PID; a lock whose holder is dead is
// taken over, so a demo killed with SIGKILL does not block the next one.
func tryLock(path string) bool {
	for range 2 {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err == nil {
			_, _ = f.WriteString(strconv.Itoa(os.Getpid()))
			_ = f.Close()
			return true
		}
		if !errors.Is(err, os.ErrExist) {
			return false
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			return false
		}
		_ = os.Remove(path)
	}
	return false
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
