package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/policy"
)

// Endpoint names a pod's host-side veth to attach to.
type Endpoint struct {
	ID policy.EndpointID
	// Ifname or Ifindex (Ifindex wins when both are set).
	Ifname  string
	Ifindex int
	// Netns is the path of the network namespace the host veth lives in;
	// empty means the caller's.
	Netns string
	// MAC and Addrs are what the pod may send from (its interface's MAC
	// and IP addresses); everything else leaving the pod is dropped.
	// Attach requires both; Detach and Forget do not read them.
	MAC   net.HardwareAddr
	Addrs []netip.Addr
	// LinkLocal are the pod interface's IPv6 link-local addresses: the
	// only link-local sources (and NA targets) its neighbour discovery
	// may use. They are not valid for other traffic. None (IPv6 off in
	// the pod, or unknown) lets it use any.
	LinkLocal []netip.Addr
}

// AttachMode tells how the programs were attached.
type AttachMode string

const (
	ModeTCX    AttachMode = "tcx"
	ModeClsact AttachMode = "clsact"
)

// hook is one attachment point of the host veth.
type hook struct {
	name   string // in pin names
	prog   string
	tcx    ebpf.AttachType
	parent uint32 // clsact parent
}

// hooks: TCX ingress on the host veth sees what leaves the pod (its egress),
// TCX egress sees what enters it (its ingress).
func hooks() []hook {
	return []hook{
		{"from-pod", "bulkhead_from_pod", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS},
		{"to-pod", "bulkhead_to_pod", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS},
	}
}

// bridgeHook is TCX ingress of a bridge with pod ports: it hands
// redirected SYNs to the tunnel (bulkhead_tunnel_bridge).
var bridgeHook = hook{"tunnel-br", "bulkhead_tunnel_bridge", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS}

const clsactFilterName = "bulkhead"

// inNetns runs f in the given network namespace (or the caller's) on a locked
// OS thread.
func inNetns(path string, f func() error) error {
	if path == "" {
		return f()
	}
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return f() })
}

// netnsID identifies the calling thread's network namespace in pin names,
// since ifindexes repeat across namespaces.
func netnsID() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("stat netns: %w", err)
	}
	return st.Ino, nil
}

func resolveLink(ep Endpoint) (netlink.Link, error) {
	if ep.Ifindex > 0 {
		l, err := netlink.LinkByIndex(ep.Ifindex)
		if err != nil {
			return nil, fmt.Errorf("find link %d: %w", ep.Ifindex, err)
		}
		return l, nil
	}
	l, err := netlink.LinkByName(ep.Ifname)
	if err != nil {
		return nil, fmt.Errorf("find link %q: %w", ep.Ifname, err)
	}
	return l, nil
}

func (d *Datapath) linkPin(nsID uint64, ifindex int, h hook) string {
	return filepath.Join(d.linkDir(), fmt.Sprintf("%d_%d_%s", nsID, ifindex, h.name))
}

// Attach makes ep's host veth enforce ep.ID's policy: one map write, then the
// already loaded programs are attached with TCX (pinned links, which outlive
// this process) or, where TCX is missing, with clsact and cls_bpf.
func (d *Datapath) Attach(ep Endpoint) (AttachMode, error) {
	if err := d.epcfg.check(ep.ID); err != nil {
		return "", fmt.Errorf("attach: %w", err)
	}
	srcs, err := encodeAddrs(ep)
	if err != nil {
		return "", fmt.Errorf("attach: %w", err)
	}
	var mode AttachMode
	// enforced: the device already belonged to this endpoint (a re-attach
	// after a restart, a repeated ADD). A failure then must not detach what
	// already enforces: that would leave the pod passing everything.
	enforced := false
	err = inNetns(ep.Netns, func() error {
		l, err := resolveLink(ep)
		if err != nil {
			return err
		}
		ifindex := l.Attrs().Index
		if cur, err := d.endpointOf(ifindex); err == nil && cur == ep.ID {
			enforced = true
		}
		nsID, err := netnsID()
		if err != nil {
			return err
		}
		// A bridge port: tunnelled flows go to the bridge's L3 ingress
		// (see tunnel_forward in bpf/segment.c).
		if err := bridgeOf(l, &srcs); err != nil {
			return err
		}
		// The source addresses go first, then the endpoint entry, so
		// the first packet the programs see is already attributed and
		// validated.
		if err := d.setAddrs(ep.ID, srcs); err != nil {
			return err
		}
		if err := d.setEndpoint(ifindex, ep.ID); err != nil {
			return fmt.Errorf("write endpoint %d: %w", ep.ID, err)
		}
		mode = ModeTCX
		if d.cfg.ForceClsact {
			mode = ModeClsact
		}
		for _, h := range hooks() {
			if mode == ModeTCX {
				err := d.attachTCX(nsID, ifindex, h)
				if errors.Is(err, ebpf.ErrNotSupported) {
					d.log.Warn("tcx not supported, falling back to clsact", "ifindex", ifindex)
					mode = ModeClsact
				} else if err != nil {
					return err
				}
			}
			if mode == ModeClsact {
				if err := d.attachClsact(ifindex, h); err != nil {
					return err
				}
			}
		}
		if srcs.BrIfindex != 0 {
			// The bridge's own hook, shared by its pods (see
			// bulkhead_tunnel_bridge); attaching it again updates it.
			if mode != ModeTCX {
				d.log.Warn("no tcx: tunnelled flows of bridge pods will not reach the tunnel", "bridge", srcs.BrIfindex)
			} else if err := d.attachBridge(nsID, int(srcs.BrIfindex)); err != nil {
				return err
			}
		}
		d.log.Info("endpoint attached", "endpoint", ep.ID, "ifindex", ifindex, "link", l.Attrs().Name, "mode", mode)
		return nil
	})
	if err != nil {
		if enforced {
			return "", fmt.Errorf("attach endpoint %d (its earlier attachment stays): %w", ep.ID, err)
		}
		// Leave nothing half-attached behind.
		if derr := d.Detach(ep); derr != nil {
			d.log.Warn("cleanup after failed attach", "endpoint", ep.ID, "error", derr)
		}
		return "", fmt.Errorf("attach endpoint %d: %w", ep.ID, err)
	}
	return mode, nil
}

// sweepBridges detaches the shared hook of every bridge (of netns nsID)
// none of whose ports is an attached endpoint any more, leaving aside the
// port being detached (leaving). It runs after every detach: the pod's
// veth may already be gone, and with it the knowledge of its bridge.
func (d *Datapath) sweepBridges(nsID uint64, leaving int) error {
	d.bridgeMu.Lock()
	defer d.bridgeMu.Unlock()
	suffix := "_" + bridgeHook.name
	prefix := fmt.Sprintf("%d_", nsID)
	entries, err := os.ReadDir(d.linkDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("list links: %w", err)
	}
	var bridges []int
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !strings.HasSuffix(name, suffix) {
			continue
		}
		if br, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(name, prefix), suffix)); err == nil {
			bridges = append(bridges, br)
		}
	}
	if len(bridges) == 0 {
		return nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	used := map[int]bool{}
	for _, l := range links {
		a := l.Attrs()
		if a.MasterIndex == 0 || a.Index == leaving {
			continue
		}
		if _, err := os.Stat(d.linkPin(nsID, a.Index, hooks()[0])); err == nil {
			used[a.MasterIndex] = true
		}
	}
	var errs []error
	for _, br := range bridges {
		if !used[br] {
			errs = append(errs, d.detachTCX(d.linkPin(nsID, br, bridgeHook)))
		}
	}
	return errors.Join(errs...)
}

// attachBridge attaches (or updates) the bridge's shared hook.
func (d *Datapath) attachBridge(nsID uint64, ifindex int) error {
	d.bridgeMu.Lock()
	defer d.bridgeMu.Unlock()
	return d.attachTCX(nsID, ifindex, bridgeHook)
}

func (d *Datapath) attachTCX(nsID uint64, ifindex int, h hook) error {
	pin := d.linkPin(nsID, ifindex, h)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		// Already attached (by us or an earlier process): point it at
		// the current program. A link whose device is gone fails here.
		err = l.Update(d.prog(h.prog))
		l.Close()
		if err == nil {
			return nil
		}
		if err := os.Remove(pin); err != nil {
			return fmt.Errorf("remove stale link pin: %w", err)
		}
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.prog(h.prog), Attach: h.tcx})
	if err != nil {
		return fmt.Errorf("attach tcx %s to %d: %w", h.name, ifindex, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		l.Detach()
		return fmt.Errorf("pin tcx link: %w", err)
	}
	return nil
}

func (d *Datapath) attachClsact(ifindex int, h hook) error {
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(q); err != nil {
		return fmt.Errorf("add clsact to %d: %w", ifindex, err)
	}
	f := clsactFilter(ifindex, h)
	f.Fd = d.prog(h.prog).FD()
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("add cls_bpf %s to %d: %w", h.name, ifindex, err)
	}
	return nil
}

func clsactFilter(ifindex int, h hook) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: h.parent, Handle: 1,
			Protocol: unix.ETH_P_ALL, Priority: 1,
		},
		Name:         clsactFilterName,
		DirectAction: true,
	}
}

// Detach removes the programs from ep's host veth (both TCX and clsact, so it
// also cleans up after a fallback) and forgets the endpoint's ifindex. When
// the veth is already gone (a CNI DEL after the runtime deleted the netns),
// the kernel has detached the programs; Detach then removes the pins of
// every link whose device is gone and the ifindex entries still naming ep.
func (d *Datapath) Detach(ep Endpoint) error {
	err := inNetns(ep.Netns, func() error {
		l, err := resolveLink(ep)
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return d.pruneGone(ep.ID)
		}
		if err != nil {
			return err
		}
		ifindex := l.Attrs().Index
		nsID, err := netnsID()
		if err != nil {
			return err
		}
		return errors.Join(d.detachIfindex(nsID, ifindex, true), d.sweepBridges(nsID, ifindex))
	})
	if err == nil {
		err = d.clearAddrs(ep.ID)
	}
	if err == nil {
		err = d.flushEndpointFlows(ep.ID)
	}
	if err == nil {
		err = d.clearQuarantine(ep.ID)
	}
	if err != nil {
		return fmt.Errorf("detach endpoint %d: %w", ep.ID, err)
	}
	return nil
}

// detachIfindex removes both hooks' TCX links (by their pins) and, when
// clsact is set, our cls_bpf filters from ifindex in the current netns, and
// forgets the endpoint the ifindex named.
func (d *Datapath) detachIfindex(nsID uint64, ifindex int, clsact bool) error {
	var errs []error
	for _, h := range hooks() {
		errs = append(errs, d.detachTCX(d.linkPin(nsID, ifindex, h)))
		if !clsact {
			continue
		}
		if err := netlink.FilterDel(clsactFilter(ifindex, h)); err != nil &&
			!errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.EINVAL) {
			errs = append(errs, fmt.Errorf("delete cls_bpf %s: %w", h.name, err))
		}
	}
	if err := d.setEndpoint(ifindex, 0); err != nil {
		errs = append(errs, fmt.Errorf("forget endpoint: %w", err))
	}
	return errors.Join(errs...)
}

func (d *Datapath) detachTCX(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open link pin %s: %w", pin, err)
	}
	defer l.Close()
	// A link whose device is gone is already detached.
	if err := l.Detach(); err != nil && !errors.Is(err, syscall.ENOLINK) && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

// pruneGone unpins TCX links whose device no longer exists and clears the
// endpoint entries of their ifindexes that still name id.
func (d *Datapath) pruneGone(id policy.EndpointID) error {
	entries, err := os.ReadDir(d.linkDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		pin := filepath.Join(d.linkDir(), e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("open link pin %s: %w", pin, err))
			continue
		}
		info, err := l.Info()
		if err != nil || info.TCX() == nil || info.TCX().Ifindex != 0 {
			l.Close()
			continue // alive (or not ours to judge)
		}
		errs = append(errs, l.Unpin())
		l.Close()
		parts := strings.Split(e.Name(), "_")
		if len(parts) != 3 {
			continue
		}
		ifindex, err := strconv.Atoi(parts[1])
		if err != nil {
			continue
		}
		var cur uint32
		if ifindex < endpointsArraySize {
			err = d.objs.EndpointsArray.Lookup(uint32(ifindex), &cur)
		} else {
			err = d.objs.Endpoints.Lookup(uint32(ifindex), &cur)
		}
		if err == nil && cur == uint32(id) {
			errs = append(errs, d.setEndpoint(ifindex, 0))
		}
	}
	return errors.Join(errs...)
}

// detachAll detaches every TCX link pinned under BPFFS.
func (d *Datapath) detachAll() error {
	entries, err := os.ReadDir(d.linkDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, d.detachTCX(filepath.Join(d.linkDir(), e.Name())))
		if parts := strings.Split(e.Name(), "_"); len(parts) == 3 {
			if ifindex, err := strconv.Atoi(parts[1]); err == nil {
				d.setEndpoint(ifindex, 0)
			}
		}
	}
	return errors.Join(errs...)
}

// bridgeOf records in v the bridge l is a port of (its ifindex and MAC),
// or none.
func bridgeOf(l netlink.Link, v *EPAddrs) error {
	v.BrIfindex, v.BrMac = 0, [6]uint8{}
	master := l.Attrs().MasterIndex
	if master == 0 {
		return nil
	}
	m, err := netlink.LinkByIndex(master)
	if err != nil {
		return fmt.Errorf("find master %d of %s: %w", master, l.Attrs().Name, err)
	}
	if m.Type() != "bridge" || len(m.Attrs().HardwareAddr) != 6 {
		return nil
	}
	v.BrIfindex = uint32(master)
	copy(v.BrMac[:], m.Attrs().HardwareAddr)
	return nil
}
