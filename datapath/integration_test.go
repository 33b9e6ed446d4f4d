package datapath

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// topo is a node: a "host" netns that routes between pod netns, each joined
// by a veth (hostIf on the host side, eth0 in the pod), as the ptp plugin
// does. Addresses stay inside these namespaces.
type topo struct {
	host *netns.NS
	pods []*testPod
}

type testPod struct {
	ns       *netns.NS
	hostIf   string
	ifindex  int
	ip4, ip6 netip.Addr
	mac      net.HardwareAddr
	ep       policy.EndpointID
	id       identity.NumericID
}

func newTopo(t testing.TB, n int) *topo {
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
	for i := 1; i <= n; i++ {
		p := &testPod{
			ns:     netns.New(t),
			hostIf: fmt.Sprintf("bh%d", i),
			ip4:    netip.MustParseAddr(fmt.Sprintf("10.213.%d.2", i)),
			ip6:    netip.MustParseAddr(fmt.Sprintf("fd00:213:%d::2", i)),
			ep:     policy.EndpointID(i),
			id:     identity.NumericID(1000 + i),
		}
		p.ifindex = netns.Veth(t, tp.host, p.hostIf, p.ns, "eth0")
		netns.Addr(t, tp.host, p.hostIf, fmt.Sprintf("10.213.%d.1/24", i), fmt.Sprintf("fd00:213:%d::1/64", i))
		netns.Addr(t, p.ns, "eth0", p.ip4.String()+"/24", p.ip6.String()+"/64")
		// Static neighbours: no ARP/ND timing in the probes' timeouts.
		hostMAC, podMAC := linkMAC(t, tp.host, p.hostIf), linkMAC(t, p.ns, "eth0")
		var err error
		if p.mac, err = net.ParseMAC(podMAC); err != nil {
			t.Fatal(err)
		}
		p.ns.Do(t, func() error {
			for _, gw := range []string{fmt.Sprintf("10.213.%d.1", i), fmt.Sprintf("fd00:213:%d::1", i)} {
				if err := runIP("neigh", "replace", gw, "lladdr", hostMAC, "dev", "eth0", "nud", "permanent"); err != nil {
					return err
				}
				if err := runIP("route", "add", "default", "via", gw); err != nil {
					return err
				}
			}
			return nil
		})
		tp.host.Do(t, func() error {
			for _, a := range []netip.Addr{p.ip4, p.ip6} {
				if err := runIP("neigh", "replace", a.String(), "lladdr", podMAC, "dev", p.hostIf, "nud", "permanent"); err != nil {
					return err
				}
			}
			return nil
		})
		tp.pods = append(tp.pods, p)
	}
	return tp
}

func linkMAC(t testing.TB, n *netns.NS, name string) string {
	t.Helper()
	var mac string
	n.Do(t, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr.String()
		return nil
	})
	return mac
}

// runIP runs ip(8) in the calling thread's netns (it inherits the thread's
// namespace because exec happens on the locked thread).
func runIP(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func (tp *topo) endpoint(p *testPod) Endpoint {
	return Endpoint{ID: p.ep, Ifname: p.hostIf, Netns: tp.host.Path(), MAC: p.mac, Addrs: []netip.Addr{p.ip4, p.ip6}}
}

// state: pod 2 is a server that admits pod 1 on 8080/tcp, 5353/udp and
// ICMP echo; pod 1 has no egress policy. Extra entries are added to pod 2.
func (tp *topo) state(rev uint64, serverEntries ...policy.Entry) *policy.MapState {
	ms := &policy.MapState{
		Revision:         rev,
		AllowHostIngress: true,
		IPCache:          map[netip.Prefix]identity.NumericID{},
		Endpoints:        map[policy.EndpointID]*policy.EndpointPolicy{},
	}
	for _, p := range tp.pods {
		ms.IPCache[netip.PrefixFrom(p.ip4, 32)] = p.id
		ms.IPCache[netip.PrefixFrom(p.ip6, 128)] = p.id
		ms.Endpoints[p.ep] = &policy.EndpointPolicy{
			Identity: p.id,
			Default:  [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultAllow},
		}
	}
	ms.Endpoints[tp.pods[1].ep].Entries = policy.SortEntries(serverEntries)
	return ms
}

func serverRules(client identity.NumericID) []policy.Entry {
	return []policy.Entry{
		allowIn(client, 6, 8080, 8080, 1),
		allowIn(client, 17, 5353, 5353, 2),
		allowIn(client, 1, 0, 65535, 3),
		allowIn(client, 58, 0, 65535, 3),
	}
}

// serve starts TCP (8080, 8081) and UDP (5353, 5354) echo servers in p.
func serve(t testing.TB, p *testPod) {
	t.Helper()
	var lns []net.Listener
	var pcs []net.PacketConn
	p.ns.Do(t, func() error {
		for _, port := range []string{"8080", "8081"} {
			ln, err := net.Listen("tcp", "[::]:"+port)
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		for _, port := range []string{"5353", "5354"} {
			pc, err := net.ListenPacket("udp", "[::]:"+port)
			if err != nil {
				return err
			}
			pcs = append(pcs, pc)
		}
		return nil
	})
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					r := bufio.NewReader(c)
					for {
						line, err := r.ReadString('\n')
						if err != nil {
							return
						}
						if _, err := c.Write([]byte(line)); err != nil {
							return
						}
					}
				}()
			}
		}()
	}
	for _, pc := range pcs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				n, addr, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], addr)
			}
		}()
	}
	t.Cleanup(func() {
		for _, ln := range lns {
			ln.Close()
		}
		for _, pc := range pcs {
			pc.Close()
		}
		wg.Wait()
	})
}

const probeTimeout = 700 * time.Millisecond

// dialTCP connects from p to addr:port.
func dialTCP(p *testPod, addr netip.Addr, port int) (net.Conn, error) {
	var c net.Conn
	err := p.ns.NetNS.Do(func(_ nsHandle) error {
		var err error
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(addr, uint16(port)).String(), probeTimeout)
		return err
	})
	return c, err
}

// echo sends a line on c and waits for it to come back.
func echo(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(probeTimeout))
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != msg+"\n" {
		return fmt.Errorf("echo %q, got %q", msg, line)
	}
	return nil
}

func tcpWorks(p *testPod, addr netip.Addr, port int) error {
	c, err := dialTCP(p, addr, port)
	if err != nil {
		return err
	}
	defer c.Close()
	return echo(c, "hello")
}

func udpWorks(p *testPod, addr netip.Addr, port int) error {
	var c net.Conn
	err := p.ns.NetNS.Do(func(_ nsHandle) error {
		var err error
		c, err = net.Dial("udp", netip.AddrPortFrom(addr, uint16(port)).String())
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeTimeout))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != "ping" {
		return fmt.Errorf("udp echo got %q", buf[:n])
	}
	return nil
}

func pingWorks(p *testPod, addr netip.Addr) error {
	network, laddr, typ, proto := "ip4:icmp", "0.0.0.0", icmp.Type(ipv4.ICMPTypeEcho), 1
	if addr.Is6() {
		network, laddr, typ, proto = "ip6:ipv6-icmp", "::", ipv6.ICMPTypeEchoRequest, 58
	}
	var c *icmp.PacketConn
	err := p.ns.NetNS.Do(func(_ nsHandle) error {
		var err error
		c, err = icmp.ListenPacket(network, laddr)
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("bulkhead")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	if _, err := c.WriteTo(b, &net.IPAddr{IP: addr.AsSlice()}); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(probeTimeout))
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && (m.Type == ipv4.ICMPTypeEchoReply || m.Type == ipv6.ICMPTypeEchoReply) &&
			e.ID == id && from.String() == addr.String() {
			return nil
		}
	}
}

func mustWork(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: want success, got %v", what, err)
	}
}

func mustFail(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want it blocked", what)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: want a timeout (dropped), got %v", what, err)
	}
}

func attach(t *testing.T, d *Datapath, tp *topo) {
	t.Helper()
	for _, p := range tp.pods {
		mode, err := d.Attach(tp.endpoint(p))
		if err != nil {
			t.Fatalf("attach: %v", err)
		}
		if mode != ModeTCX && !d.cfg.ForceClsact {
			t.Fatalf("attached with %s on a TCX kernel", mode)
		}
	}
}

func TestIntegrationTraffic(t *testing.T) {
	for _, clsact := range []bool{false, true} {
		name := "tcx"
		if clsact {
			name = "clsact"
		}
		t.Run(name, func(t *testing.T) {
			tp := newTopo(t, 3)
			client, server, other := tp.pods[0], tp.pods[1], tp.pods[2]
			serve(t, server)
			d := newTestDatapath(t, Config{ForceClsact: clsact})
			if _, err := d.Apply(tp.state(1, serverRules(client.id)...)); err != nil {
				t.Fatal(err)
			}
			// Before attach nothing is enforced.
			mustWork(t, "tcp 8081 before attach", tcpWorks(client, server.ip4, 8081))
			attach(t, d, tp)
			attach(t, d, tp) // idempotent
			ev := openEvents(t, d)

			for _, addr := range []netip.Addr{server.ip4, server.ip6} {
				mustWork(t, "tcp 8080 "+addr.String(), tcpWorks(client, addr, 8080))
				mustFail(t, "tcp 8081 "+addr.String(), tcpWorks(client, addr, 8081))
				mustWork(t, "udp 5353 "+addr.String(), udpWorks(client, addr, 5353))
				mustFail(t, "udp 5354 "+addr.String(), udpWorks(client, addr, 5354))
				mustWork(t, "ping "+addr.String(), pingWorks(client, addr))
				mustFail(t, "tcp 8080 from other pod "+addr.String(), tcpWorks(other, addr, 8080))
				mustFail(t, "ping from other pod "+addr.String(), pingWorks(other, addr))
			}
			// Replies to the server's own flows: client pod is default-deny
			// ingress, yet its connections get answers (above). The
			// server's egress is open; the client's ingress is closed for
			// new flows.
			serve(t, client)
			mustFail(t, "server to client 8080", tcpWorks(server, client.ip4, 8080))

			evs := drainEvents(t, ev)
			var news, drops int
			for _, e := range evs {
				switch e.Type {
				case EventFlowNew:
					news++
				case EventDrop:
					drops++
				}
			}
			if news == 0 || drops == 0 {
				t.Fatalf("events: %d new, %d drops, want both", news, drops)
			}

			// A policy change applies to new flows at once.
			if _, err := d.Apply(tp.state(2, allowIn(client.id, 6, 8081, 8081, 9))); err != nil {
				t.Fatal(err)
			}
			mustWork(t, "tcp 8081 after opening", tcpWorks(client, server.ip4, 8081))
			mustFail(t, "tcp 8080 after closing", tcpWorks(client, server.ip6, 8080))

			// Detach restores traffic.
			for _, p := range tp.pods {
				if err := d.Detach(tp.endpoint(p)); err != nil {
					t.Fatal(err)
				}
			}
			mustWork(t, "tcp 8080 after detach", tcpWorks(client, server.ip6, 8080))
			mustWork(t, "tcp 8080 from other after detach", tcpWorks(other, server.ip4, 8080))
		})
	}
}

// TestDetachFlushesEndpointFlows: detaching an endpoint deletes its
// conntrack entries, and only its own. Kept, an established entry would
// outlive the endpoint ID's retirement and let the old peer's packets of
// that 5-tuple into the next pod with the ID and the address.
func TestDetachFlushesEndpointFlows(t *testing.T) {
	tp, d := servedPair(t)
	client, server := tp.pods[0], tp.pods[1]
	for _, addr := range []netip.Addr{server.ip4, server.ip6} {
		keep, err := dialTCP(client, addr, 8080)
		mustWork(t, "dial", err)
		defer keep.Close()
		mustWork(t, "echo", echo(keep, "one"))
	}
	count := func() map[uint32]int {
		t.Helper()
		entries, err := d.Conntrack()
		if err != nil {
			t.Fatal(err)
		}
		n := map[uint32]int{}
		for _, e := range entries {
			n[e.Key.EpId]++
		}
		return n
	}
	before := count()
	if before[uint32(server.ep)] < 2 || before[uint32(client.ep)] < 2 {
		t.Fatalf("conntrack entries by endpoint before: %v, want the client's and the server's TCP flows in both families", before)
	}
	if err := d.Detach(tp.endpoint(server)); err != nil {
		t.Fatal(err)
	}
	after := count()
	if after[uint32(server.ep)] != 0 {
		t.Errorf("%d conntrack entries of the detached endpoint %d left", after[uint32(server.ep)], server.ep)
	}
	if after[uint32(client.ep)] < before[uint32(client.ep)] {
		t.Errorf("the client's entries went from %d to %d when the server was detached", before[uint32(client.ep)], after[uint32(client.ep)])
	}
}

// servedPair is a client and a server pod, the server serving, both
// attached under serverRules (revision 1).
func servedPair(t *testing.T) (*topo, *Datapath) {
	t.Helper()
	tp := newTopo(t, 2)
	serve(t, tp.pods[1])
	d := newTestDatapath(t, Config{})
	if _, err := d.Apply(tp.state(1, serverRules(tp.pods[0].id)...)); err != nil {
		t.Fatal(err)
	}
	attach(t, d, tp)
	return tp, d
}

func TestIntegrationTighteningEstablished(t *testing.T) {
	tp, d := servedPair(t)
	client, server := tp.pods[0], tp.pods[1]
	for _, addr := range []netip.Addr{server.ip4, server.ip6} {
		keep, err := dialTCP(client, addr, 8080)
		mustWork(t, "dial", err)
		defer keep.Close()
		mustWork(t, "echo before", echo(keep, "one"))
		// Loosening elsewhere keeps the connection.
		rules := append(serverRules(client.id), allowIn(client.id, 6, 9000, 9000, 8))
		if _, err := d.Apply(tp.state(2, rules...)); err != nil {
			t.Fatal(err)
		}
		mustWork(t, "echo after unrelated change", echo(keep, "two"))
		// Tightening kills it at its next packet.
		if _, err := d.Apply(tp.state(3, allowIn(client.id, 17, 5353, 5353, 2))); err != nil {
			t.Fatal(err)
		}
		mustFail(t, "echo after tightening", echo(keep, "three"))
		// Restore for the next address family.
		if _, err := d.Apply(tp.state(4, serverRules(client.id)...)); err != nil {
			t.Fatal(err)
		}
	}
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.ByDrop[DropPolicyRevised].Packets == 0 {
		t.Fatalf("no DROP_POLICY_REVISED counted: %+v", c)
	}
}

// The child loader: a separate process that loads, applies, attaches and
// exits without cleaning up.
const childEnv = "BULKHEAD_DATAPATH_TEST_CHILD"

type childSpec struct {
	BPFFS     string
	State     *policy.MapState
	Endpoints []Endpoint
}

func runChildLoader() error {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		return err
	}
	d, err := New(Config{BPFFS: spec.BPFFS})
	if err != nil {
		return err
	}
	if _, err := d.Apply(spec.State); err != nil {
		return err
	}
	for _, ep := range spec.Endpoints {
		if _, err := d.Attach(ep); err != nil {
			return err
		}
	}
	return d.Close()
}

func TestIntegrationPinnedSurvivesLoader(t *testing.T) {
	tp := newTopo(t, 2)
	client, server := tp.pods[0], tp.pods[1]
	serve(t, server)
	dir := testBPFFS(t)
	spec := childSpec{BPFFS: dir, State: tp.state(1, serverRules(client.id)...)}
	for _, p := range tp.pods {
		spec.Endpoints = append(spec.Endpoints, tp.endpoint(p))
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	if out, err := cmd.CombinedOutput(); err != nil {
		// The child may have pinned things before failing.
		if d, err2 := New(Config{BPFFS: dir}); err2 == nil {
			d.Remove()
		}
		t.Fatalf("child loader: %v\n%s", err, out)
	}
	// The loader is gone; enforcement is not.
	d := newTestDatapath(t, Config{BPFFS: dir}) // re-opens from pins
	// The source addresses the loader registered live on in the pins.
	for _, p := range tp.pods {
		mac, addrs, err := d.EndpointAddrs(p.ep)
		if err != nil || mac.String() != p.mac.String() || !slices.Equal(addrs, []netip.Addr{p.ip4, p.ip6}) {
			t.Fatalf("re-opened source addresses of %d: %v %v %v, want %v %v %v", p.ep, mac, addrs, err, p.mac, p.ip4, p.ip6)
		}
	}
	mustWork(t, "allowed after loader exit", tcpWorks(client, server.ip4, 8080))
	mustFail(t, "denied after loader exit", tcpWorks(client, server.ip4, 8081))
	// The re-opened datapath knows the live state: the same MapState is a
	// no-op, and a change applies without re-attaching.
	st, err := d.Apply(spec.State)
	if err != nil {
		t.Fatal(err)
	}
	if st.PolicyWrites+st.PolicyDeletes+st.IPCacheWrites+st.IPCacheDeletes+st.Flipped != 0 {
		t.Fatalf("re-applying the live state wrote %+v", st)
	}
	if _, err := d.Apply(tp.state(2, allowIn(client.id, 6, 8081, 8081, 9))); err != nil {
		t.Fatal(err)
	}
	mustWork(t, "8081 after re-opened apply", tcpWorks(client, server.ip6, 8081))
	mustFail(t, "8080 after re-opened apply", tcpWorks(client, server.ip6, 8080))
	for _, p := range tp.pods {
		if err := d.Detach(tp.endpoint(p)); err != nil {
			t.Fatal(err)
		}
	}
	mustWork(t, "8080 after detach", tcpWorks(client, server.ip6, 8080))
	for _, p := range tp.pods {
		if mac, addrs, err := d.EndpointAddrs(p.ep); err != nil || mac != nil || len(addrs) != 0 {
			t.Fatalf("source addresses of %d after detach: %v %v %v", p.ep, mac, addrs, err)
		}
	}

	// Detach after the veth is gone (CNI DEL after the netns went away)
	// cleans up the pins and the ifindex entry.
	if _, err := d.Attach(tp.endpoint(server)); err != nil {
		t.Fatal(err)
	}
	tp.host.Do(t, func() error { return runIP("link", "del", server.hostIf) })
	if err := d.Detach(tp.endpoint(server)); err != nil {
		t.Fatalf("detach of a deleted veth: %v", err)
	}
	if pins, err := os.ReadDir(d.linkDir()); err != nil || len(pins) != 0 {
		t.Fatalf("link pins left after detaching a deleted veth: %v %v", pins, err)
	}
	var cur uint32
	if err := d.objs.EndpointsArray.Lookup(uint32(server.ifindex), &cur); err != nil || cur != 0 {
		t.Fatalf("endpoint entry of the deleted veth: %d %v", cur, err)
	}
}

// TestAttachNeedsSourceAddrs: an endpoint without a MAC or addresses is
// refused before anything is attached: its programs would drop everything
// the pod sends.
func TestAttachNeedsSourceAddrs(t *testing.T) {
	tp := newTopo(t, 1)
	d := newTestDatapath(t, Config{})
	for name, mut := range map[string]func(*Endpoint){
		"no MAC":       func(ep *Endpoint) { ep.MAC = nil },
		"no addresses": func(ep *Endpoint) { ep.Addrs = nil },
	} {
		ep := tp.endpoint(tp.pods[0])
		mut(&ep)
		if _, err := d.Attach(ep); !errors.Is(err, ErrNoSourceAddrs) {
			t.Fatalf("%s: attach error %v, want ErrNoSourceAddrs", name, err)
		}
		if ok, err := d.Attached(tp.endpoint(tp.pods[0])); err != nil || ok {
			t.Fatalf("%s: attached %v %v after a refused attach", name, ok, err)
		}
	}
}

// TestFailedReattachKeepsEnforcement: a re-attach of an endpoint that is
// already enforced (an agent restart, a repeated ADD) that fails part-way
// leaves the earlier attachment in place. Cleaning up "what this call
// attached" by detaching the whole endpoint would leave its pod passing
// everything.
func TestFailedReattachKeepsEnforcement(t *testing.T) {
	tp := newTopo(t, 1)
	d := newTestDatapath(t, Config{})
	pod := tp.pods[0]
	ep := tp.endpoint(pod)
	if _, err := d.Attach(ep); err != nil {
		t.Fatal(err)
	}
	pins, err := os.ReadDir(d.linkDir())
	if err != nil || len(pins) != 2 {
		t.Fatalf("link pins after attach: %v %v", pins, err)
	}
	// Block one hook's pin with another object: the re-attach makes a new
	// link for that hook and cannot pin it.
	blocked := d.linkDir() + "/" + pins[0].Name()
	kept := d.linkDir() + "/" + pins[1].Name()
	if err := os.Remove(blocked); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(blocked); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(blocked) })
	if _, err := d.Attach(ep); err == nil {
		t.Fatal("re-attach succeeded with a blocked link pin")
	}
	if id, err := d.endpointOf(pod.ifindex); err != nil || id != ep.ID {
		t.Fatalf("after a failed re-attach the veth belongs to endpoint %d (%v), want %d", id, err, ep.ID)
	}
	if live, err := tcxLive(kept, pod.ifindex); err != nil || !live {
		t.Fatalf("after a failed re-attach the other hook's link is live=%v (%v)", live, err)
	}
}
