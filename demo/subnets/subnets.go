// Package subnets hands out /24s of 10.213.0.0/16, the range the project's
// demo and tests give their pods, so that a demo and test runs on one host
// never collide. A /24 is held by a lock file carrying the holder's PID; a
// lock whose holder died (SIGKILL) is taken over. A /24 that a host route
// overlaps is never handed out, so nothing else on the machine is touched.
package subnets

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

// lockDir is shared by every user of this package on the host.
func lockDir() string { return filepath.Join(os.TempDir(), "bulkhead-cnichain-subnets") }

// Reserve takes the first free 10.213.<octet>.0/24 among octets, in the
// order given, and returns it with the function that releases it.
func Reserve(octets []int) (netip.Prefix, func() error, error) {
	dir := lockDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return netip.Prefix{}, nil, fmt.Errorf("subnet lock dir: %w", err)
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Prefix{}, nil, fmt.Errorf("list routes: %w", err)
	}
	for _, octet := range octets {
		if octet < 0 || octet > 255 {
			return netip.Prefix{}, nil, fmt.Errorf("octet %d out of range", octet)
		}
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
			// The last holder removes the folder, so that nothing is left
			// in /tmp; it fails while others hold a lock in it, and one
			// that is creating its lock meanwhile makes the folder again.
			_ = os.Remove(dir)
			return nil
		}, nil
	}
	return netip.Prefix{}, nil, fmt.Errorf("no free /24 among 10.213.%v.0 (routes there, or other runs hold them)", octets)
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

// tryLock creates path holding our PID, or takes it over from a dead holder.
func tryLock(path string) bool {
	for range 3 {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if errors.Is(err, os.ErrNotExist) {
			// The last holder removed the folder after our MkdirAll.
			if os.MkdirAll(filepath.Dir(path), 0o700) != nil {
				return false
			}
			continue
		}
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
			return false // held by a live process, or unreadable
		}
		_ = os.Remove(path)
	}
	return false
}
