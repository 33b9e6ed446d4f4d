package datapath

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/identity"
)

// The mTLS tunnel's side of the datapath (issue 12). bulkhead_from_pod
// redirects an enrolled pod's TCP flows into the node's tunnel: it marks
// their packets (a policy route makes marked packets local) and hands each
// SYN to the tunnel's transparent listener with bpf_sk_assign. The tunnel
// registers that listener here. bulkhead_to_pod judges a flow sent by one
// of the tunnel's sockets, which the tunnel registers with the identity it
// verified before it connects, as coming from that identity; any other TCP
// to an enrolled pod from an enrolled identity is plaintext that the
// source failed to tunnel, and is dropped (DropAuthRequired).

// Defaults of Config.TunnelMark and TunnelMask, and of the policy route
// EnsureTunnelRouting installs.
const (
	DefaultTunnelMark     = 0x00000b00
	DefaultTunnelMask     = 0x00000f00
	DefaultTunnelTable    = 2008
	DefaultTunnelPriority = 2008
)

// tunnel_listener slots (bpf/lib/maps.h): IPv4 (or dual-stack), IPv6.
const (
	listenerSlot4 = 0
	listenerSlot6 = 1
)

// SetTunnelListener registers the tunnel's transparent listener: one
// dual-stack TCP socket ([::] with IPV6_V6ONLY off, IP_TRANSPARENT) in the
// node's netns that takes the redirected SYNs of both families. The
// datapath finds it by its port and accepts it by its socket's inode, so
// when it closes (the agent dies) no other socket takes its place, and
// flows that must be tunnelled are dropped until a listener is registered
// again. A restarted agent registers its new listener.
func (d *Datapath) SetTunnelListener(c syscall.Conn) error {
	if err := d.setListener(listenerSlot4, c); err != nil {
		return err
	}
	return d.clearListener(listenerSlot6)
}

// ClearTunnelListener unregisters the listener(s): from then on flows that
// must be tunnelled are dropped (DropTunnelDown).
func (d *Datapath) ClearTunnelListener() error {
	return errors.Join(d.clearListener(listenerSlot4), d.clearListener(listenerSlot6))
}

func (d *Datapath) setListener(slot uint32, c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("tunnel listener: %w", err)
	}
	var port int
	var ino uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var st unix.Stat_t
		if serr = unix.Fstat(int(fd), &st); serr != nil {
			return
		}
		ino = st.Ino
		var sa unix.Sockaddr
		if sa, serr = unix.Getsockname(int(fd)); serr != nil {
			return
		}
		var acc int
		if acc, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); serr == nil && acc == 0 {
			serr = errors.New("not listening")
		}
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			port = a.Port
		case *unix.SockaddrInet6:
			port = a.Port
		default:
			serr = fmt.Errorf("address %T: not TCP/IP", sa)
		}
	}); err != nil {
		return fmt.Errorf("tunnel listener: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("tunnel listener: %w", serr)
	}
	v := segmentTunnelLsn{Ino: ino, Port: uint16(port)}
	if err := d.objs.TunnelListener.Update(slot, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("register tunnel listener: %w", err)
	}
	return nil
}

func (d *Datapath) clearListener(slot uint32) error {
	if err := d.objs.TunnelListener.Update(slot, segmentTunnelLsn{}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("clear tunnel listener: %w", err)
	}
	return nil
}

// MarkTunnelSocket registers one of the tunnel's sockets, by its cookie
// (SO_COOKIE), as carrying traffic from the verified identity peer. Call
// it before the socket connects: the flow towards the pod is judged at its
// first packet.
func (d *Datapath) MarkTunnelSocket(cookie uint64, peer identity.NumericID) error {
	if cookie == 0 || peer == identity.IDNone {
		return fmt.Errorf("mark tunnel socket: cookie %d, identity %d: want both non-zero", cookie, peer)
	}
	if err := d.objs.TunnelSocks.Update(cookie, uint32(peer), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("mark tunnel socket: %w", err)
	}
	return nil
}

// ForgetTunnelSocket removes a socket MarkTunnelSocket registered (when it
// closes). Forgetting one that is not there is not an error.
func (d *Datapath) ForgetTunnelSocket(cookie uint64) error {
	err := d.objs.TunnelSocks.Delete(cookie)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget tunnel socket: %w", err)
	}
	return nil
}

// ClearTunnelSockets forgets every socket MarkTunnelSocket registered.
// tunnel_socks is pinned, so the registrations of an agent that died
// without forgetting its sockets outlive it and would fill the map; the
// agent calls this before its tunnel starts, when none of its own
// connections exist yet.
func (d *Datapath) ClearTunnelSockets() error {
	var keys []uint64
	var k uint64
	var v uint32
	it := d.objs.TunnelSocks.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("clear tunnel sockets: %w", err)
	}
	for _, k := range keys {
		if err := d.objs.TunnelSocks.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clear tunnel sockets: %w", err)
		}
	}
	return nil
}

// tunnelRules are the policy rules of EnsureTunnelRouting, one per family.
func tunnelRules(mark, mask uint32, table, priority int) []*netlink.Rule {
	var out []*netlink.Rule
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		r := netlink.NewRule()
		r.Family = fam
		r.Mark = mark
		m := mask
		r.Mask = &m
		r.Table = table
		r.Priority = priority
		out = append(out, r)
	}
	return out
}

// tunnelRoutes are the `local default dev lo` routes of the table.
func tunnelRoutes(table int) ([]*netlink.Route, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("find lo: %w", err)
	}
	var out []*netlink.Route
	for _, dst := range []string{"0.0.0.0/0", "::/0"} {
		_, n, _ := net.ParseCIDR(dst)
		out = append(out, &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: n, Table: table,
			Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST})
	}
	return out, nil
}

func ruleEqual(a, b *netlink.Rule) bool {
	return a.Family == b.Family && a.Mark == b.Mark && a.Mask != nil && b.Mask != nil && *a.Mask == *b.Mask &&
		a.Table == b.Table && a.Priority == b.Priority
}

func hasRule(r *netlink.Rule) (bool, error) {
	rules, err := netlink.RuleList(r.Family)
	if err != nil {
		return false, fmt.Errorf("list rules: %w", err)
	}
	for i := range rules {
		if ruleEqual(&rules[i], r) {
			return true, nil
		}
	}
	return false, nil
}

// EnsureTunnelRouting installs, in the caller's network namespace, what
// makes the tunnel's marked packets local, for IPv4 and IPv6: the rule
// `fwmark mark/mask lookup table` at priority and the table's `local
// default dev lo` route. It is idempotent. Without it a marked SYN is
// dropped (the kernel does not forward a packet that has a socket), but a
// flow's later packets would be routed as usual.
func EnsureTunnelRouting(mark, mask uint32, table, priority int) error {
	routes, err := tunnelRoutes(table)
	if err != nil {
		return err
	}
	for _, r := range routes {
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("tunnel route %s table %d: %w", r.Dst, table, err)
		}
	}
	for _, r := range tunnelRules(mark, mask, table, priority) {
		ok, err := hasRule(r)
		if err != nil {
			return err
		}
		if ok {
			continue
		}
		if err := netlink.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("tunnel rule (family %d): %w", r.Family, err)
		}
	}
	return nil
}

// RemoveTunnelRouting removes what EnsureTunnelRouting installed; what is
// already gone is not an error.
func RemoveTunnelRouting(mark, mask uint32, table, priority int) error {
	var errs []error
	for _, r := range tunnelRules(mark, mask, table, priority) {
		for {
			ok, err := hasRule(r)
			if err != nil {
				errs = append(errs, err)
				break
			}
			if !ok {
				break
			}
			if err := netlink.RuleDel(r); err != nil {
				errs = append(errs, fmt.Errorf("delete tunnel rule (family %d): %w", r.Family, err))
				break
			}
		}
	}
	routes, err := tunnelRoutes(table)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, r := range routes {
		if err := netlink.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete tunnel route %s: %w", r.Dst, err))
		}
	}
	return errors.Join(errs...)
}
