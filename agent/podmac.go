package agent

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// podLink reads the MAC and the IPv6 link-local addresses of the interface
// ifName inside the network namespace at netnsPath (setns on a locked OS
// thread). The datapath drops every frame from the pod whose source is not
// this MAC, and neighbour discovery from (or for) any other link-local
// address. Tentative addresses count: the pod defends them by DAD and
// uses them as soon as DAD ends. A pod with IPv6 off has none.
func podLink(netnsPath, ifName string) (net.HardwareAddr, []netip.Addr, error) {
	var mac net.HardwareAddr
	ll := []netip.Addr{}
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("find %s: %w", ifName, err)
		}
		mac = l.Attrs().HardwareAddr
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return fmt.Errorf("list IPv6 addresses of %s: %w", ifName, err)
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if ok && ip.Is6() && !ip.Is4In6() && ip.IsLinkLocalUnicast() {
				ll = append(ll, ip)
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read link of %s in netns %s: %w", ifName, netnsPath, err)
	}
	if len(mac) != 6 {
		return nil, nil, fmt.Errorf("read MAC of %s in netns %s: %q is not an Ethernet address", ifName, netnsPath, mac)
	}
	return mac, ll, nil
}

// ensureLink fills rec.MAC and rec.LinkLocal from the pod's netns when
// either is unknown (a plugin that sends no MAC; records persisted before
// they were kept), and reports whether it did. An empty, non-nil LinkLocal
// is a pod without link-local addresses, which is not read again.
func (rec *endpointRecord) ensureLink() (bool, error) {
	if rec.MAC != "" && rec.LinkLocal != nil {
		return false, nil
	}
	mac, ll, err := podLink(rec.Netns, rec.Key.IfName)
	if err != nil {
		return false, err
	}
	if rec.MAC == "" {
		rec.MAC = mac.String()
	}
	if rec.LinkLocal == nil {
		rec.LinkLocal = ll
	}
	return true, nil
}
