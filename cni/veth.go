package cni

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// Errors FindVethPeer returns, for callers that branch on them.
var (
	// ErrNetnsGone means the pod's network namespace no longer exists.
	ErrNetnsGone = errors.New("network namespace not found")
	// ErrLinkNotFound means the pod interface is not in the namespace.
	ErrLinkNotFound = errors.New("interface not found")
	// ErrNotVeth means the pod interface, or what its peer index points
	// at, is not a veth (for example macvlan or ipvlan): there is no
	// host-side device to attach to.
	ErrNotVeth = errors.New("not a veth")
	// ErrPeerMismatch means the peer index does not lead back to the pod
	// interface: the host-side veth is gone or its index was reused.
	ErrPeerMismatch = errors.New("veth peer does not match")
)

// Peer is a pod interface and its host-side veth.
type Peer struct {
	PodIfName   string
	PodIfIndex  int
	HostIfName  string
	HostIfIndex int
	// PodMAC is the pod interface's MAC, read inside the pod's netns.
	PodMAC net.HardwareAddr
}

// FindVethPeer finds the host-side peer of the veth ifName inside the netns
// at netnsPath. The peer must live in the caller's current netns (the host).
//
// Names are not trusted: primary plugins name host veths differently (ptp
// and bridge use random names, others use hashes). The peer is found by the
// veth's IFLA_LINK index and then verified from the other side: the host
// link must be a veth whose own IFLA_LINK points back at the pod interface,
// and the link-netnsid on each side must name the other namespace, because
// ifindexes are only unique within one namespace.
func FindVethPeer(netnsPath, ifName string) (Peer, error) {
	podNS, err := ns.GetNS(netnsPath)
	if err != nil {
		var notExist ns.NSPathNotExistErr
		if errors.As(err, &notExist) {
			return Peer{}, fmt.Errorf("open netns %s: %w", netnsPath, ErrNetnsGone)
		}
		return Peer{}, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer podNS.Close()
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return Peer{}, fmt.Errorf("open host netns: %w", err)
	}
	defer hostNS.Close()

	p := Peer{PodIfName: ifName}
	var podLinkNsid, hostNsidInPod int
	err = podNS.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName(ifName)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return fmt.Errorf("%s in netns %s: %w", ifName, netnsPath, ErrLinkNotFound)
			}
			return fmt.Errorf("look up %s in netns %s: %w", ifName, netnsPath, err)
		}
		veth, ok := link.(*netlink.Veth)
		if !ok {
			return fmt.Errorf("%s in netns %s is a %s: %w", ifName, netnsPath, link.Type(), ErrNotVeth)
		}
		p.PodIfIndex = veth.Index
		p.PodMAC = veth.HardwareAddr
		p.HostIfIndex = veth.ParentIndex
		if p.HostIfIndex == 0 {
			// Old kernels may omit IFLA_LINK; ethtool's peer_ifindex is
			// the same number.
			if p.HostIfIndex, err = netlink.VethPeerIndex(veth); err != nil {
				return fmt.Errorf("peer index of %s in netns %s: %w", ifName, netnsPath, err)
			}
		}
		podLinkNsid = veth.NetNsID
		if hostNsidInPod, err = netlink.GetNetNsIdByFd(int(hostNS.Fd())); err != nil {
			return fmt.Errorf("nsid of host netns inside %s: %w", netnsPath, err)
		}
		return nil
	})
	if err != nil {
		return Peer{}, err
	}
	// A veth whose peer is in the host has a link-netnsid, and the host
	// then has that nsid inside the pod's netns. Anything else means the
	// peer is elsewhere and its index would point at an unrelated link.
	if podLinkNsid < 0 || podLinkNsid != hostNsidInPod {
		return Peer{}, fmt.Errorf("peer of %s in netns %s is not in the host netns: %w", ifName, netnsPath, ErrPeerMismatch)
	}

	host, err := netlink.LinkByIndex(p.HostIfIndex)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return Peer{}, fmt.Errorf("host link %d, peer of %s in netns %s: %w", p.HostIfIndex, ifName, netnsPath, ErrPeerMismatch)
		}
		return Peer{}, fmt.Errorf("look up host link %d: %w", p.HostIfIndex, err)
	}
	hostVeth, ok := host.(*netlink.Veth)
	if !ok {
		return Peer{}, fmt.Errorf("host link %s (index %d) is a %s: %w", host.Attrs().Name, p.HostIfIndex, host.Type(), ErrNotVeth)
	}
	if hostVeth.ParentIndex != p.PodIfIndex {
		return Peer{}, fmt.Errorf("host veth %s points at index %d, not %s (%d): %w",
			hostVeth.Name, hostVeth.ParentIndex, ifName, p.PodIfIndex, ErrPeerMismatch)
	}
	podNsid, err := netlink.GetNetNsIdByFd(int(podNS.Fd()))
	if err != nil {
		return Peer{}, fmt.Errorf("nsid of netns %s: %w", netnsPath, err)
	}
	if hostVeth.NetNsID < 0 || hostVeth.NetNsID != podNsid {
		return Peer{}, fmt.Errorf("host veth %s has its peer in another netns than %s: %w", hostVeth.Name, netnsPath, ErrPeerMismatch)
	}
	p.HostIfName = hostVeth.Name
	return p, nil
}
