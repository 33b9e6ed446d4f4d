// Package adopt finds the sandboxes of pods that were running on this node
// before Bulkhead was chained into its CNI configuration, so the agent can
// enforce on them without restarting them. The store says which pods run
// here and their addresses; the kernel says where those addresses lead: the
// route to a pod address (ptp and similar primaries) or the bridge's
// neighbour and forwarding tables (bridge primaries) name the host-side
// veth, its peer names the pod's network namespace, and libcni's result
// cache, when the runtime keeps one, names the sandbox's container ID and
// network so that the runtime's later DEL and GC find the endpoint.
//
// Nothing here changes the node: it reads routes, links, neighbours and
// files. The agent enforces on what it finds through its ADD path.
package adopt

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/cni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// SyntheticPrefix starts the container ID of an endpoint adopted without a
// CNI cache entry: the runtime's ID is unknown, so the runtime's GC cannot
// list it and its DEL is matched by network namespace instead.
const SyntheticPrefix = "adopted-"

// Synthetic says whether an endpoint's container ID was made up at
// adoption.
func Synthetic(containerID string) bool { return strings.HasPrefix(containerID, SyntheticPrefix) }

// Pod is a running pod of this node as the store has it.
type Pod struct {
	Namespace, Name, UID string
	IPs                  []netip.Addr
}

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// Finder locates pod sandboxes.
type Finder struct {
	// NetnsDirs are where runtimes mount pod network namespaces
	// (containerd and CRI-O: /var/run/netns).
	NetnsDirs []string
	// CNICacheDir is libcni's cache folder (/var/lib/cni): its results/
	// files name each attachment's container ID, network, interface and
	// netns. Empty or missing: adopted endpoints get synthetic keys.
	CNICacheDir string
}

// Found is a pod's sandbox: the ADD request that enforces on it as a CNI
// ADD would have, and how its host veth was found ("route", "neighbour":
// the bridge's neighbour and forwarding tables, "bridge-scan": the
// namespaces behind the bridge's ports).
type Found struct {
	Request api.EndpointAddRequest
	Via     string
}

// Find finds p's sandbox, or says why it cannot be found.
func (f *Finder) Find(p Pod) (Found, error) {
	if len(p.IPs) == 0 {
		return Found{}, errors.New("the store lists no address for it")
	}
	// IPv4 first: every primary routes it; IPv6 only pods are rarer.
	ips := slices.Clone(p.IPs)
	slices.SortStableFunc(ips, func(a, b netip.Addr) int { return cmp.Compare(a.BitLen(), b.BitLen()) })
	var host *netlink.Veth
	var via string
	var errs []error
	for _, ip := range ips {
		v, how, err := f.hostVethFor(ip)
		if err == nil {
			host, via = v, how
			break
		}
		errs = append(errs, err)
	}
	if host == nil {
		return Found{}, errors.Join(errs...)
	}
	netnsPath, err := f.netnsOf(host)
	if err != nil {
		return Found{}, err
	}
	podIf, prefixes, err := podInterface(netnsPath, host.Index, p.IPs)
	if err != nil {
		return Found{}, err
	}
	// The strict two-way check the plugin runs on every ADD: the pod
	// interface's peer is this host veth, and the other way round.
	peer, err := cni.FindVethPeer(netnsPath, podIf)
	if err != nil {
		return Found{}, fmt.Errorf("verify the veth pair: %w", err)
	}
	if peer.HostIfIndex != host.Index {
		return Found{}, fmt.Errorf("the pod interface %s in %s pairs with host link %d, not %s", podIf, netnsPath, peer.HostIfIndex, host.Name)
	}
	req := api.EndpointAddRequest{
		Netns: netnsPath, PodIfIndex: peer.PodIfIndex, HostVeth: peer.HostIfName, HostIfIndex: peer.HostIfIndex,
		IPs: prefixes, Pod: api.PodRef{Namespace: p.Namespace, Name: p.Name, UID: p.UID}, MAC: peer.PodMAC.String(),
	}
	req.IfName = podIf
	entry, err := f.cacheEntry(netnsPath, podIf)
	if err != nil {
		return Found{}, err
	}
	if entry != nil {
		if err := entry.matches(p); err != nil {
			return Found{}, err
		}
		req.ContainerID, req.Network = entry.ContainerID, entry.NetworkName
	} else {
		req.ContainerID = syntheticID(p)
	}
	return Found{Request: req, Via: via}, nil
}

// syntheticID names an endpoint adopted without a runtime container ID:
// stable for the pod, so a restarted agent or a second pass finds the same
// key.
func syntheticID(p Pod) string {
	if p.UID != "" && !strings.ContainsAny(p.UID, "/\\. ") {
		return SyntheticPrefix + p.UID
	}
	sum := sha256.Sum256([]byte(p.Namespace + "/" + p.Name))
	return SyntheticPrefix + hex.EncodeToString(sum[:12])
}

// hostVethFor finds the host-side veth that ip leads to: the device the
// host routes it to when that is a veth (ptp and other routed primaries),
// or the bridge port its neighbour entry's MAC was learnt on (bridge).
func (f *Finder) hostVethFor(ip netip.Addr) (*netlink.Veth, string, error) {
	routes, err := netlink.RouteGet(ip.AsSlice())
	if err != nil {
		return nil, "", fmt.Errorf("route to %s: %w", ip, err)
	}
	if len(routes) == 0 || routes[0].LinkIndex == 0 {
		return nil, "", fmt.Errorf("no route to %s", ip)
	}
	if routes[0].Type == unix.RTN_LOCAL {
		return nil, "", fmt.Errorf("%s is an address of this host, not of a pod", ip)
	}
	l, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, "", fmt.Errorf("link %d that %s is routed to: %w", routes[0].LinkIndex, ip, err)
	}
	switch l := l.(type) {
	case *netlink.Veth:
		return l, "route", nil
	case *netlink.Bridge:
		v, err := bridgePort(l, ip)
		if err == nil {
			return v, "neighbour", nil
		}
		// Nothing on the host has talked to the pod since its neighbour
		// entry expired (or ever): ask each of the bridge's veth ports'
		// namespaces instead.
		v, serr := f.scanBridge(l, ip)
		if serr != nil {
			return nil, "", fmt.Errorf("%w; %w", err, serr)
		}
		return v, "bridge-scan", nil
	}
	return nil, "", fmt.Errorf("%s is routed to %s, a %s: not a pod's veth or a bridge", ip, l.Attrs().Name, l.Type())
}

// bridgePort finds the bridge port behind ip: its neighbour entry on the
// bridge gives the MAC, and the bridge's forwarding table the port that MAC
// was learnt on.
func bridgePort(br *netlink.Bridge, ip netip.Addr) (*netlink.Veth, error) {
	family := netlink.FAMILY_V4
	if ip.Is6() {
		family = netlink.FAMILY_V6
	}
	neighs, err := netlink.NeighList(br.Index, family)
	if err != nil {
		return nil, fmt.Errorf("neighbours of %s: %w", br.Name, err)
	}
	var mac net.HardwareAddr
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip && len(n.HardwareAddr) == 6 &&
			n.State&(unix.NUD_INCOMPLETE|unix.NUD_FAILED) == 0 {
			mac = n.HardwareAddr
			break
		}
	}
	if mac == nil {
		return nil, fmt.Errorf("%s is behind bridge %s, which has no neighbour entry for it (the pod has not talked to the host yet)", ip, br.Name)
	}
	fdb, err := netlink.NeighList(0, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("forwarding table of %s: %w", br.Name, err)
	}
	for _, e := range fdb {
		if e.MasterIndex != br.Index || !slices.Equal(e.HardwareAddr, mac) || e.State&unix.NUD_PERMANENT != 0 {
			continue
		}
		l, err := netlink.LinkByIndex(e.LinkIndex)
		if err != nil {
			return nil, fmt.Errorf("bridge port %d of %s: %w", e.LinkIndex, br.Name, err)
		}
		v, ok := l.(*netlink.Veth)
		if !ok {
			return nil, fmt.Errorf("%s (%s) is learnt on %s, a %s: not a pod's veth", ip, mac, l.Attrs().Name, l.Type())
		}
		return v, nil
	}
	return nil, fmt.Errorf("%s (%s) is behind bridge %s, whose forwarding table has no port for it", ip, mac, br.Name)
}

// scanBridge finds the veth port of br whose peer holds ip, by looking
// into the namespace of every veth port.
func (f *Finder) scanBridge(br *netlink.Bridge, ip netip.Addr) (*netlink.Veth, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	paths, err := f.mountedNetns()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		v, ok := l.(*netlink.Veth)
		if !ok || v.MasterIndex != br.Index || v.NetNsID < 0 {
			continue
		}
		path, ok := paths[v.NetNsID]
		if !ok {
			continue
		}
		if _, _, err := podInterface(path, v.Index, []netip.Addr{ip}); err == nil {
			return v, nil
		}
	}
	return nil, fmt.Errorf("no veth port of bridge %s leads to a namespace holding %s", br.Name, ip)
}

// mountedNetns maps the netns IDs this namespace has for the mounted
// namespaces in NetnsDirs to their paths.
func (f *Finder) mountedNetns() (map[int]string, error) {
	out := map[int]string{}
	for _, dir := range f.NetnsDirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("list %s: %w", dir, err)
		}
		for _, e := range entries {
			path := filepath.Join(dir, e.Name())
			if id, err := nsidOf(path); err == nil && id >= 0 {
				if _, dup := out[id]; !dup {
					out[id] = path
				}
			}
		}
	}
	return out, nil
}

// netnsOf finds the mounted network namespace that holds host's peer, by
// the netns ID the host knows it by.
func (f *Finder) netnsOf(host *netlink.Veth) (string, error) {
	if host.NetNsID < 0 {
		return "", fmt.Errorf("host veth %s has its peer in the host's own namespace", host.Name)
	}
	paths, err := f.mountedNetns()
	if err != nil {
		return "", err
	}
	if path, ok := paths[host.NetNsID]; ok {
		return path, nil
	}
	return "", fmt.Errorf("the network namespace of host veth %s (netns id %d) is not mounted in %s",
		host.Name, host.NetNsID, strings.Join(f.NetnsDirs, ", "))
}

// nsidOf is the ID this (the host's) namespace has for the namespace
// mounted at path, or -1 when it has none.
func nsidOf(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(fd)
	return netlink.GetNetNsIdByFd(fd)
}

// podInterface finds, inside netnsPath, the veth whose peer is the host
// link hostIndex, and checks that it holds every address the store gives
// the pod: a stale store (an address handed to another pod since) must not
// adopt the wrong sandbox. It returns the interface and the addresses with
// their prefix lengths.
func podInterface(netnsPath string, hostIndex int, want []netip.Addr) (string, []netip.Prefix, error) {
	var name string
	var prefixes []netip.Prefix
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		var link netlink.Link
		for _, l := range links {
			if v, ok := l.(*netlink.Veth); ok && v.ParentIndex == hostIndex {
				link = l
				break
			}
		}
		if link == nil {
			return fmt.Errorf("no veth pairs with host link %d", hostIndex)
		}
		name = link.Attrs().Name
		addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", name, err)
		}
		have := map[netip.Addr]netip.Prefix{}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ones, _ := a.Mask.Size()
			have[ip.Unmap()] = netip.PrefixFrom(ip.Unmap(), ones)
		}
		for _, ip := range want {
			p, ok := have[ip]
			if !ok {
				return fmt.Errorf("%s does not hold %s, which the store gives the pod", name, ip)
			}
			prefixes = append(prefixes, p)
		}
		return nil
	})
	if err != nil {
		return "", nil, fmt.Errorf("pod interface in %s: %w", netnsPath, err)
	}
	return name, prefixes, nil
}

// cacheInfo is the part of a libcni result cache file that adoption reads.
type cacheInfo struct {
	Kind        string      `json:"kind"`
	ContainerID string      `json:"containerId"`
	IfName      string      `json:"ifName"`
	NetworkName string      `json:"networkName"`
	NetNS       string      `json:"netns"`
	CNIArgs     [][2]string `json:"cniArgs"`
}

// matches refuses an entry whose Kubernetes arguments name another pod.
func (c *cacheInfo) matches(p Pod) error {
	args := map[string]string{}
	for _, kv := range c.CNIArgs {
		args[kv[0]] = kv[1]
	}
	podNS, name, uid := args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"], args["K8S_POD_UID"]
	if (podNS != "" && podNS != p.Namespace) || (name != "" && name != p.Name) || (uid != "" && p.UID != "" && uid != p.UID) {
		return fmt.Errorf("the CNI cache says sandbox %s belongs to pod %s/%s (uid %s), not %s", c.ContainerID, podNS, name, uid, p)
	}
	return nil
}

// cacheEntry finds libcni's record of the attachment of ifName in the
// namespace at netnsPath. Nil: there is none (no cache, or the runtime keeps
// none).
func (f *Finder) cacheEntry(netnsPath, ifName string) (*cacheInfo, error) {
	if f.CNICacheDir == "" {
		return nil, nil
	}
	dir := filepath.Join(f.CNICacheDir, "results")
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read the CNI cache %s: %w", dir, err)
	}
	target, err := os.Stat(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", netnsPath, err)
	}
	var found []*cacheInfo
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var c cacheInfo
		if json.Unmarshal(b, &c) != nil || c.Kind != "cniCacheV1" || c.IfName != ifName || c.NetNS == "" || c.ContainerID == "" {
			continue
		}
		if c.NetNS != netnsPath {
			st, err := os.Stat(c.NetNS)
			if err != nil || !os.SameFile(st, target) {
				continue
			}
		}
		found = append(found, &c)
	}
	switch len(found) {
	case 0:
		return nil, nil
	case 1:
		return found[0], nil
	}
	slices.SortFunc(found, func(a, b *cacheInfo) int { return cmp.Compare(a.NetworkName, b.NetworkName) })
	return nil, fmt.Errorf("the CNI cache has %d attachments of %s in %s (networks %s and %s): cannot tell which one to adopt",
		len(found), ifName, netnsPath, found[0].NetworkName, found[1].NetworkName)
}
