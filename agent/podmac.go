package agent

import (
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// podMAC reads the MAC of the interface ifName inside the network namespace
// at netnsPath (setns on a locked OS thread). It serves ADDs from plugins
// that send no MAC and records persisted before the MAC was recorded: the
// datapath drops every frame from the pod whose source is not this MAC.
func podMAC(netnsPath, ifName string) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("find %s: %w", ifName, err)
		}
		mac = l.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read MAC of %s in netns %s: %w", ifName, netnsPath, err)
	}
	if len(mac) != 6 {
		return nil, fmt.Errorf("read MAC of %s in netns %s: %q is not an Ethernet address", ifName, netnsPath, mac)
	}
	return mac, nil
}

// ensureMAC fills rec.MAC from the pod's netns when it is empty, and reports
// whether it did.
func (rec *endpointRecord) ensureMAC() (bool, error) {
	if rec.MAC != "" {
		return false, nil
	}
	mac, err := podMAC(rec.Netns, rec.Key.IfName)
	if err != nil {
		return false, err
	}
	rec.MAC = mac.String()
	return true, nil
}
