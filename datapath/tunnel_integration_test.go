package datapath

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// newBridgeTopo is newTopo with the pods' host veths enslaved to one
// bridge (br0, which holds the gateway addresses), as the bridge plugin
// does: pod-to-pod frames are switched at L2.
func newBridgeTopo(t testing.TB, n int) *topo {
	t.Helper()
	privileged.Require(t)
	tp := &topo{host: netns.New(t)}
	tp.host.Do(t, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	var ports []string
	for i := 1; i <= n; i++ {
		p := &testPod{
			ns:     netns.New(t),
			hostIf: fmt.Sprintf("bhb%d", i),
			ip4:    netip.MustParseAddr(fmt.Sprintf("10.214.0.%d", 10+i)),
			ip6:    netip.MustParseAddr(fmt.Sprintf("fd00:214::%d", 10+i)),
			ep:     policy.EndpointID(i),
			id:     identity.NumericID(1000 + i),
		}
		p.ifindex = netns.Veth(t, tp.host, p.hostIf, p.ns, "eth0")
		netns.Addr(t, p.ns, "eth0", p.ip4.String()+"/24", p.ip6.String()+"/64")
		var err error
		if p.mac, err = net.ParseMAC(linkMAC(t, p.ns, "eth0")); err != nil {
			t.Fatal(err)
		}
		ports = append(ports, p.hostIf)
		tp.pods = append(tp.pods, p)
	}
	netns.Bridge(t, tp.host, "br0", ports...)
	netns.Addr(t, tp.host, "br0", "10.214.0.1/24", "fd00:214::1/64")
	brMAC := linkMAC(t, tp.host, "br0")
	for _, p := range tp.pods {
		p.ns.Do(t, func() error {
			for _, gw := range []string{"10.214.0.1", "fd00:214::1"} {
				if err := runIP("neigh", "replace", gw, "lladdr", brMAC, "dev", "eth0", "nud", "permanent"); err != nil {
					return err
				}
				if err := runIP("route", "add", "default", "via", gw); err != nil {
					return err
				}
			}
			// Static neighbours for the other pods too: no ARP/ND
			// timing in the probes.
			for _, q := range tp.pods {
				if q == p {
					continue
				}
				for _, a := range []netip.Addr{q.ip4, q.ip6} {
					if err := runIP("neigh", "replace", a.String(), "lladdr", q.mac.String(), "dev", "eth0", "nud", "permanent"); err != nil {
						return err
					}
				}
			}
			return nil
		})
		tp.host.Do(t, func() error {
			for _, a := range []netip.Addr{p.ip4, p.ip6} {
				if err := runIP("neigh", "replace", a.String(), "lladdr", p.mac.String(), "dev", "br0", "nud", "permanent"); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return tp
}

// testTunnel stands in for the node tunnel: a transparent dual-stack
// listener on [::]:15001 in the node netns, registered with the datapath.
// For each redirected connection it records the addresses the kernel gave
// it and then either refuses it or dials the original destination from the
// node, marking its socket with the source pod's identity, and copies
// bytes both ways.
type testTunnel struct {
	t      *testing.T
	d      *Datapath
	tp     *topo
	ln     net.Listener
	refuse bool

	mu       sync.Mutex
	accepted []acceptedConn
	wg       sync.WaitGroup
}

type acceptedConn struct{ local, remote netip.AddrPort }

func transparentControl(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if e := unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); e != nil {
			serr = e
		}
		if e := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); e != nil {
			serr = e
		}
	})
	return errors.Join(err, serr)
}

func startTunnel(t *testing.T, d *Datapath, tp *topo, refuse bool) *testTunnel {
	t.Helper()
	tt := &testTunnel{t: t, d: d, tp: tp, refuse: refuse}
	tp.host.Do(t, func() error {
		if err := EnsureTunnelRouting(DefaultTunnelMark, DefaultTunnelMask, DefaultTunnelTable, DefaultTunnelPriority); err != nil {
			return err
		}
		// Twice: idempotent.
		if err := EnsureTunnelRouting(DefaultTunnelMark, DefaultTunnelMask, DefaultTunnelTable, DefaultTunnelPriority); err != nil {
			return err
		}
		lc := net.ListenConfig{Control: transparentControl}
		ln, err := lc.Listen(t.Context(), "tcp", "[::]:15001")
		tt.ln = ln
		return err
	})
	if err := d.SetTunnelListener(tt.ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	tt.wg.Add(1)
	go tt.serve()
	t.Cleanup(tt.close)
	return tt
}

func (tt *testTunnel) close() {
	tt.ln.Close()
	tt.wg.Wait()
}

func (tt *testTunnel) conns() []acceptedConn {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	return append([]acceptedConn(nil), tt.accepted...)
}

func (tt *testTunnel) podByIP(a netip.Addr) *testPod {
	for _, p := range tt.tp.pods {
		if p.ip4 == a.Unmap() || p.ip6 == a {
			return p
		}
	}
	return nil
}

func (tt *testTunnel) serve() {
	defer tt.wg.Done()
	for {
		c, err := tt.ln.Accept()
		if err != nil {
			return
		}
		ac := acceptedConn{local: c.LocalAddr().(*net.TCPAddr).AddrPort(), remote: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
		ac.local = netip.AddrPortFrom(ac.local.Addr().Unmap(), ac.local.Port())
		ac.remote = netip.AddrPortFrom(ac.remote.Addr().Unmap(), ac.remote.Port())
		tt.mu.Lock()
		tt.accepted = append(tt.accepted, ac)
		tt.mu.Unlock()
		src := tt.podByIP(ac.remote.Addr())
		if tt.refuse || src == nil {
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			continue
		}
		tt.wg.Add(1)
		go func() {
			defer tt.wg.Done()
			defer c.Close()
			var up net.Conn
			err := tt.tp.host.NetNS.Do(func(nsHandle) error {
				dl := net.Dialer{Timeout: probeTimeout, Control: func(_, _ string, rc syscall.RawConn) error {
					cookie, err := sockCookie(rc)
					if err != nil {
						return err
					}
					return tt.d.MarkTunnelSocket(cookie, src.id)
				}}
				var err error
				up, err = dl.Dial("tcp", ac.local.String())
				return err
			})
			if err != nil {
				return
			}
			defer up.Close()
			rc, _ := up.(*net.TCPConn).SyscallConn()
			if cookie, err := sockCookie(rc); err == nil {
				defer tt.d.ForgetTunnelSocket(cookie)
			}
			go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
			io.Copy(c, up)
		}()
	}
}

// sockCookie reads the socket's SO_COOKIE, the cookie
// bpf_get_socket_cookie reports for its packets and MarkTunnelSocket takes.
func sockCookie(rc syscall.RawConn) (uint64, error) {
	var cookie uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		return 0, err
	}
	return cookie, serr
}

// mtlsState: pods 1 and 2 (and 3 when present), pod 2 serves; enrolled
// says which pods are enrolled. serverEntries are pod 2's ingress.
func mtlsState(tp *topo, rev uint64, enrolled []bool, serverEntries ...policy.Entry) *policy.MapState {
	ms := tp.state(rev, serverEntries...)
	ms.Enrolled = map[identity.NumericID]bool{}
	for i, p := range tp.pods {
		if enrolled[i] {
			ms.Enrolled[p.id] = true
			ms.Endpoints[p.ep].Enrolled = true
		}
	}
	return ms
}

func mtlsAllowIn(peer identity.NumericID, port uint16, rule policy.RuleID) policy.Entry {
	e := allowIn(peer, 6, port, port, rule)
	e.Flags |= policy.FlagMTLSRequired
	return e
}

// serverPeers returns the remote addresses of the connections pod p's echo
// server on port accepted (ss in its netns).
func acceptLog(t *testing.T, p *testPod, port int) (func() []netip.Addr, func()) {
	t.Helper()
	var ln net.Listener
	p.ns.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", port))
		return err
	})
	var mu sync.Mutex
	var peers []netip.Addr
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			peers = append(peers, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			mu.Unlock()
			go func() {
				defer c.Close()
				buf := make([]byte, 512)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					c.Write(buf[:n])
				}
			}()
		}
	}()
	stop := func() { ln.Close(); wg.Wait() }
	t.Cleanup(stop)
	return func() []netip.Addr {
		mu.Lock()
		defer mu.Unlock()
		return append([]netip.Addr(nil), peers...)
	}, stop
}

func hostAddrs(tp *topo) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	tp.host.NetNS.Do(func(nsHandle) error {
		as, _ := net.InterfaceAddrs()
		for _, a := range as {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				out[p.Addr()] = true
			}
		}
		return nil
	})
	return out
}

// TestTunnelRedirect: an enrolled pair's TCP goes into the tunnel (the
// accepted socket names the original destination and the pod), for ptp
// and bridge pods, IPv4 and IPv6; the server sees the node, never the pod;
// a pair that is not enrolled is untouched.
func TestTunnelRedirect(t *testing.T) {
	for _, kind := range []string{"ptp", "bridge"} {
		t.Run(kind, func(t *testing.T) {
			var tp *topo
			if kind == "ptp" {
				tp = newTopo(t, 2)
			} else {
				tp = newBridgeTopo(t, 2)
			}
			d := newTestDatapath(t, Config{})
			attach(t, d, tp)
			client, server := tp.pods[0], tp.pods[1]
			peers, _ := acceptLog(t, server, 8080)
			ms := mtlsState(tp, 1, []bool{true, true}, allowIn(client.id, 6, 8080, 8080, 1))
			if _, err := d.Apply(ms); err != nil {
				t.Fatal(err)
			}
			tt := startTunnel(t, d, tp, false)
			r := openEvents(t, d)
			node := hostAddrs(tp)
			for _, dst := range []netip.Addr{server.ip6, server.ip4} {
				before := len(tt.conns())
				if err := tcpWorks(client, dst, 8080); err != nil {
					c, _ := d.Counters()
					t.Logf("counters %+v", c)
					for _, ev := range drainEvents(t, r) {
						t.Logf("event %+v", ev)
					}
					t.Logf("accepted %v", tt.conns())
					t.Fatalf("enrolled %s: %v", dst, err)
				}
				cs := tt.conns()
				if len(cs) != before+1 {
					t.Fatalf("%s: tunnel accepted %d connections, want 1", dst, len(cs)-before)
				}
				c := cs[len(cs)-1]
				src := client.ip4
				if dst.Is6() {
					src = client.ip6
				}
				if c.local != netip.AddrPortFrom(dst, 8080) || c.remote.Addr() != src {
					t.Fatalf("accepted local %v remote %v, want %v:8080 from %v", c.local, c.remote, dst, src)
				}
			}
			var redirected, delivered int
			cts, err := d.Conntrack()
			if err != nil {
				t.Fatal(err)
			}
			for _, ct := range cts {
				if ct.Tunnelled() && ct.Key.EpId == uint32(client.ep) {
					redirected++
				}
				if ct.MTLS() && ct.Key.EpId == uint32(server.ep) && ct.Entry.PeerId == uint32(client.id) {
					delivered++
				}
			}
			if redirected != 2 || delivered != 2 {
				t.Fatalf("conntrack: %d redirected flows at the source, %d tunnel-delivered at the destination; want 2 and 2",
					redirected, delivered)
			}
			for _, a := range peers() {
				if !node[a] {
					t.Fatalf("server saw a connection from %v, not from the node: the pod reached it past the tunnel", a)
				}
			}
			var tunnelled, mtls bool
			for _, ev := range drainEvents(t, r) {
				if ev.Type == EventFlowNew && ev.Endpoint == client.ep && ev.Tunnelled && ev.DstPort == 8080 {
					tunnelled = true
				}
				if ev.Type == EventFlowNew && ev.Endpoint == server.ep && ev.MTLS && ev.SrcIdentity == client.id {
					mtls = true
				}
			}
			if !tunnelled || !mtls {
				t.Fatalf("events: tunnelled at the source %v, mtls at the destination %v; want both", tunnelled, mtls)
			}

			// Not enrolled: untouched, straight to the server.
			ms = mtlsState(tp, 2, []bool{false, true}, allowIn(client.id, 6, 8080, 8080, 1))
			if _, err := d.Apply(ms); err != nil {
				t.Fatal(err)
			}
			before := len(tt.conns())
			for _, dst := range []netip.Addr{server.ip4, server.ip6} {
				mustWork(t, "not enrolled "+dst.String(), tcpWorks(client, dst, 8080))
			}
			if n := len(tt.conns()) - before; n != 0 {
				t.Fatalf("tunnel accepted %d connections of a pair that is not enrolled", n)
			}
			ps := peers()
			if last := ps[len(ps)-1]; last != client.ip6 {
				t.Fatalf("server's last peer %v, want the pod %v", last, client.ip6)
			}
		})
	}
}

// dialMarked connects from the node netns to dst:port with its socket
// registered as the tunnel's, carrying identity id.
func dialMarked(t *testing.T, d *Datapath, tp *topo, dst netip.Addr, port int, id identity.NumericID) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	var cookie uint64
	err := tp.host.NetNS.Do(func(nsHandle) error {
		dl := net.Dialer{Timeout: probeTimeout, Control: func(_, _ string, rc syscall.RawConn) error {
			var err error
			if cookie, err = sockCookie(rc); err != nil {
				return err
			}
			return d.MarkTunnelSocket(cookie, id)
		}}
		var err error
		c, err = dl.Dial("tcp", netip.AddrPortFrom(dst, uint16(port)).String())
		return err
	})
	t.Cleanup(func() { d.ForgetTunnelSocket(cookie) })
	return c, err
}

// TestTunnelAuthRequired: pod 2 admits pod 1 on 8080 only with mTLS. A
// connection the tunnel delivers as pod 1 passes and is reported as mTLS;
// one it delivers as another identity does not; pod 1's own plaintext is
// dropped with AUTH_REQUIRED (event and counter).
func TestTunnelAuthRequired(t *testing.T) {
	tp := newTopo(t, 2)
	d := newTestDatapath(t, Config{})
	attach(t, d, tp)
	client, server := tp.pods[0], tp.pods[1]
	serve(t, server)
	ms := mtlsState(tp, 1, []bool{false, true}, mtlsAllowIn(client.id, 8080, 7))
	// The node's own plaintext is not let in: a re-judge that took the
	// node address for the peer would drop tunnel-delivered flows.
	ms.AllowHostIngress = false
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	r := openEvents(t, d)

	// A policy revision re-judges a tunnel-delivered flow with the
	// identity the tunnel verified: it survives an unrelated change and
	// ends when its rule goes.
	long, err := dialMarked(t, d, tp, server.ip4, 8080, client.id)
	mustWork(t, "long-lived tunnel-delivered connection", err)
	defer long.Close()
	mustWork(t, "echo", echo(long, "before"))
	ms2 := mtlsState(tp, 2, []bool{false, true}, mtlsAllowIn(client.id, 8080, 7), allowIn(4343, 6, 9, 9, 8))
	ms2.AllowHostIngress = false
	if _, err := d.Apply(ms2); err != nil {
		t.Fatal(err)
	}
	mustWork(t, "echo after an unrelated policy change", echo(long, "after"))
	ms3 := mtlsState(tp, 3, []bool{false, true}, allowIn(4343, 6, 9, 9, 8))
	ms3.AllowHostIngress = false
	if _, err := d.Apply(ms3); err != nil {
		t.Fatal(err)
	}
	if err := echo(long, "revoked"); err == nil {
		t.Fatal("a tunnel-delivered flow outlived the removal of its rule")
	}
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	drainEvents(t, r)

	for _, dst := range []netip.Addr{server.ip4, server.ip6} {
		c, err := dialMarked(t, d, tp, dst, 8080, client.id)
		mustWork(t, "tunnel-delivered as the client "+dst.String(), err)
		mustWork(t, "echo", echo(c, "via tunnel"))
		c.Close()
		_, err = dialMarked(t, d, tp, dst, 8080, 4242)
		mustFail(t, "tunnel-delivered as another identity "+dst.String(), err)
		before := dropCount(t, d, DropAuthRequired)
		mustFail(t, "plaintext from the client "+dst.String(), tcpWorks(client, dst, 8080))
		if dropCount(t, d, DropAuthRequired) == before {
			t.Fatalf("%s: no AUTH_REQUIRED drop counted", dst)
		}
	}
	var mtls, authDrop, otherDrop int
	for _, ev := range drainEvents(t, r) {
		if ev.Endpoint != server.ep {
			continue
		}
		switch {
		case ev.Type == EventFlowNew && ev.MTLS && ev.SrcIdentity == client.id && ev.Rule == 7:
			mtls++
		case ev.Type == EventDrop && ev.DropReason == DropAuthRequired && ev.Rule == 7 && !ev.MTLS:
			authDrop++
		case ev.Type == EventDrop && ev.DropReason == DropPolicy && ev.MTLS && ev.SrcIdentity == 4242:
			otherDrop++
		}
	}
	if mtls != 2 || authDrop < 2 || otherDrop < 2 {
		t.Fatalf("events: %d mtls flows, %d AUTH_REQUIRED drops, %d drops of another verified identity; want 2, >=2, >=2",
			mtls, authDrop, otherDrop)
	}
}

// TestTunnelDown: with the tunnel's listener gone (the agent died),
// flows that must be tunnelled are dropped with TUNNEL_DOWN and nothing
// reaches the destination; a new listener (the agent back) resumes them.
func TestTunnelDown(t *testing.T) {
	tp := newTopo(t, 2)
	d := newTestDatapath(t, Config{})
	attach(t, d, tp)
	client, server := tp.pods[0], tp.pods[1]
	peers, _ := acceptLog(t, server, 8080)
	ms := mtlsState(tp, 1, []bool{true, true}, allowIn(client.id, 6, 8080, 8080, 1))
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	tt := startTunnel(t, d, tp, false)
	tt.close() // the listener closes, its registration stays
	r := openEvents(t, d)
	for _, dst := range []netip.Addr{server.ip4, server.ip6} {
		before := dropCount(t, d, DropTunnelDown)
		mustFail(t, "tunnel down "+dst.String(), tcpWorks(client, dst, 8080))
		if dropCount(t, d, DropTunnelDown) == before {
			t.Fatalf("%s: no TUNNEL_DOWN drop counted", dst)
		}
	}
	if ps := peers(); len(ps) != 0 {
		t.Fatalf("the server accepted %v while the tunnel was down", ps)
	}
	var down int
	for _, ev := range drainEvents(t, r) {
		if ev.Type == EventDrop && ev.DropReason == DropTunnelDown && ev.Tunnelled && ev.Endpoint == client.ep {
			down++
		}
	}
	if down < 2 {
		t.Fatalf("%d TUNNEL_DOWN events, want one per family", down)
	}
	// Another process binding the port does not get the pods' traffic.
	var rogue net.Listener
	tp.host.Do(t, func() error {
		lc := net.ListenConfig{Control: transparentControl}
		var err error
		rogue, err = lc.Listen(t.Context(), "tcp", "[::]:15001")
		return err
	})
	go func() {
		for {
			c, err := rogue.Accept()
			if err != nil {
				return
			}
			t.Errorf("a listener that was not registered accepted %v", c.RemoteAddr())
			c.Close()
		}
	}()
	mustFail(t, "unregistered listener", tcpWorks(client, server.ip4, 8080))
	rogue.Close()
	// The agent is back: a new process re-opens the pinned datapath and
	// registers its listener.
	d2, err := New(d.cfg)
	if err != nil {
		t.Fatalf("re-open: %v", err)
	}
	t.Cleanup(func() { d2.Close() })
	startTunnel(t, d2, tp, false)
	mustWork(t, "tunnel back", tcpWorks(client, server.ip4, 8080))
	mustWork(t, "tunnel back", tcpWorks(client, server.ip6, 8080))
}

// TestTunnelEgressMTLSRequired: an egress allow with mtls: Required to a
// peer that is not enrolled (nor is the pod) sends the connection into the
// tunnel, which refuses it; it never reaches the peer in plaintext.
func TestTunnelEgressMTLSRequired(t *testing.T) {
	tp := newTopo(t, 2)
	d := newTestDatapath(t, Config{})
	attach(t, d, tp)
	client, server := tp.pods[0], tp.pods[1]
	peers, _ := acceptLog(t, server, 8080)
	ms := mtlsState(tp, 1, []bool{false, false}, allowIn(client.id, 6, 8080, 8080, 1))
	ms.Endpoints[client.ep].Entries = []policy.Entry{{Direction: policy.Egress, Peer: server.id, Proto: 6, PortLo: 8080,
		PortHi: 8080, Action: policy.ActionAllow, Flags: policy.FlagMTLSRequired, Rule: 9}}
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	tt := startTunnel(t, d, tp, true)
	for _, dst := range []netip.Addr{server.ip4, server.ip6} {
		err := tcpWorks(client, dst, 8080)
		if err == nil {
			t.Fatalf("%s: connection worked, want it refused", dst)
		}
	}
	if ps := peers(); len(ps) != 0 {
		t.Fatalf("the peer accepted %v: mtls: Required egress left in plaintext", ps)
	}
	if n := len(tt.conns()); n < 2 {
		t.Fatalf("the tunnel saw %d connections, want the two redirected ones", n)
	}
	// Without the rule: plaintext as before. (A new policy object: Apply
	// takes the same pointer for an unchanged endpoint.)
	cp := *ms.Endpoints[client.ep]
	cp.Entries = nil
	ms.Endpoints[client.ep] = &cp
	ms.Revision = 2
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	mustWork(t, "plain egress without the rule", tcpWorks(client, server.ip4, 8080))
}

// TestTunnelRouting: EnsureTunnelRouting installs one rule per family and
// the table's local default routes, idempotently; RemoveTunnelRouting
// takes them away, also idempotently.
func TestTunnelRouting(t *testing.T) {
	privileged.Require(t)
	n := netns.New(t)
	const mark, mask, table, prio = 0x300, 0xf00, 2099, 2099
	n.Do(t, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	count := func() (rules, routes int) {
		n.Do(t, func() error {
			for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
				rs, err := netlink.RuleList(fam)
				if err != nil {
					return err
				}
				for _, r := range rs {
					if r.Table == table && r.Mark == mark && r.Priority == prio && r.Mask != nil && *r.Mask == mask {
						rules++
					}
				}
				rt, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
				if err != nil {
					return err
				}
				for _, r := range rt {
					if r.Type == unix.RTN_LOCAL {
						routes++
					}
				}
			}
			return nil
		})
		return rules, routes
	}
	for range 2 {
		n.Do(t, func() error { return EnsureTunnelRouting(mark, mask, table, prio) })
		if rules, routes := count(); rules != 2 || routes != 2 {
			t.Fatalf("after ensure: %d rules, %d local routes; want 2 and 2", rules, routes)
		}
	}
	for range 2 {
		n.Do(t, func() error { return RemoveTunnelRouting(mark, mask, table, prio) })
		if rules, routes := count(); rules != 0 || routes != 0 {
			t.Fatalf("after remove: %d rules, %d local routes; want none", rules, routes)
		}
	}
}

// TestTunnelEnrolledPlaintextRefused: the destination refuses plaintext
// TCP between an enrolled pair even where the source did not tunnel it
// (here the client's own endpoint is not marked enrolled, as on a node
// whose view lags): a new connection is dropped with AUTH_REQUIRED though
// policy allows it, one the tunnel delivers passes, and a plaintext
// connection opened before the pair was enrolled ends at the revision
// that enrolls it.
func TestTunnelEnrolledPlaintextRefused(t *testing.T) {
	tp := newTopo(t, 2)
	d := newTestDatapath(t, Config{})
	attach(t, d, tp)
	client, server := tp.pods[0], tp.pods[1]
	serve(t, server)
	ms := mtlsState(tp, 1, []bool{false, false}, allowIn(client.id, 6, 8080, 8080, 1))
	if _, err := d.Apply(ms); err != nil {
		t.Fatal(err)
	}
	old, err := dialTCP(client, server.ip4, 8080)
	mustWork(t, "plaintext before enrollment", err)
	defer old.Close()
	mustWork(t, "echo before enrollment", echo(old, "before"))

	ms2 := mtlsState(tp, 2, []bool{true, true}, allowIn(client.id, 6, 8080, 8080, 1))
	ms2.Endpoints[client.ep].Enrolled = false // the source does not tunnel
	if _, err := d.Apply(ms2); err != nil {
		t.Fatal(err)
	}
	r := openEvents(t, d)
	if err := echo(old, "after"); err == nil {
		t.Fatal("a plaintext connection outlived the enrollment of its pair")
	}
	for _, dst := range []netip.Addr{server.ip4, server.ip6} {
		before := dropCount(t, d, DropAuthRequired)
		mustFail(t, "plaintext between an enrolled pair "+dst.String(), tcpWorks(client, dst, 8080))
		if dropCount(t, d, DropAuthRequired) == before {
			t.Fatalf("%s: no AUTH_REQUIRED drop counted", dst)
		}
		c, err := dialMarked(t, d, tp, dst, 8080, client.id)
		mustWork(t, "tunnel-delivered "+dst.String(), err)
		mustWork(t, "echo via the tunnel", echo(c, "tunnel"))
		c.Close()
	}
	var revised, auth int
	for _, ev := range drainEvents(t, r) {
		if ev.Endpoint != server.ep || ev.Type != EventDrop {
			continue
		}
		switch {
		case ev.DropReason == DropPolicyRevised:
			revised++
		case ev.DropReason == DropAuthRequired && ev.Rule == 0 && ev.SrcIdentity == client.id && !ev.MTLS:
			auth++
		}
	}
	if revised == 0 || auth < 2 {
		t.Fatalf("events at the server: %d POLICY_REVISED, %d AUTH_REQUIRED drops; want >=1 and >=2", revised, auth)
	}
}
