// Package netns is a test helper: it creates network namespaces, veth pairs,
// bridges and addresses for kernel tests, runs code inside a namespace on a
// locked OS thread (setns, never `ip netns exec`, which remounts /sys and
// hides bpffs), and registers every cleanup with t.Cleanup so that nothing
// outlives a failed test. Only tests import it.
package netns

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NS is a network namespace owned by a test.
type NS struct {
	ns.NetNS
	// Name is the name under /run/netns for named namespaces (usable with
	// `ip netns exec` for tools that need no bpffs), empty otherwise.
	Name string
}

// New creates a named namespace with a unique name (tests run
// concurrently). It is deleted when t ends.
func New(t testing.TB) *NS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("remove netns %s: %v", n.Path(), err)
		}
	})
	return &NS{NetNS: n, Name: filepath.Base(n.Path())}
}

// NewUnnamed creates a namespace that only this process holds; it goes away
// when t ends and its handle is closed.
func NewUnnamed(t testing.TB) *NS {
	t.Helper()
	n, err := ns.TempNetNS()
	if err != nil {
		t.Fatalf("create unnamed netns: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	return &NS{NetNS: n}
}

// Do runs f inside n on a locked OS thread and fails t on error.
func (n *NS) Do(t testing.TB, f func() error) {
	t.Helper()
	if err := n.NetNS.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatalf("in netns %s: %v", n.Path(), err)
	}
}

// Veth creates a veth pair with one end (hostName) in host and the other
// (peerName) in peer, both up, and returns the host end's ifindex. Deleting
// the namespaces removes it.
func Veth(t testing.TB, host *NS, hostName string, peer *NS, peerName string) int {
	t.Helper()
	var ifindex int
	host.Do(t, func() error {
		v := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: hostName},
			PeerName:      peerName,
			PeerNamespace: netlink.NsFd(int(peer.Fd())),
		}
		if err := netlink.LinkAdd(v); err != nil {
			return err
		}
		l, err := netlink.LinkByName(hostName)
		if err != nil {
			return err
		}
		ifindex = l.Attrs().Index
		return netlink.LinkSetUp(l)
	})
	peer.Do(t, func() error {
		l, err := netlink.LinkByName(peerName)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	return ifindex
}

// Bridge creates an up bridge named name in n and enslaves the given links.
func Bridge(t testing.TB, n *NS, name string, ports ...string) {
	t.Helper()
	n.Do(t, func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil {
			return err
		}
		for _, p := range ports {
			l, err := netlink.LinkByName(p)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetMaster(l, br); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(br)
	})
}

// Addr adds addresses (CIDR notation) to ifname in n and brings lo up. IPv6
// addresses skip duplicate address detection, so they work at once.
func Addr(t testing.TB, n *NS, ifname string, cidrs ...string) {
	t.Helper()
	n.Do(t, func() error {
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		for _, c := range cidrs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return err
			}
			a, err := netlink.ParseAddr(c)
			if err != nil {
				return err
			}
			if p.Addr().Is6() {
				a.Flags |= unix.IFA_F_NODAD
			}
			if err := netlink.AddrAdd(l, a); err != nil {
				return err
			}
		}
		return nil
	})
}
