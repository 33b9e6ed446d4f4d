package e2e

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The reproduction: x/b admits UDP 82 only from x/a; y/c forges.
const spoofStore = `
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 82, protocol: UDP}]
`

// TestForgedSourcesGainNothing: through the real chain (ptp and bridge
// primaries, dual-stack), a pod with raw sockets forges other pods', the
// gateway's, the node's and an unassigned source address, and a gratuitous
// ARP for another pod's address. No forged datagram arrives, no neighbour
// entry is poisoned, and every forgery is in the flow log and the metrics.
func TestForgedSourcesGainNothing(t *testing.T) {
	forEachChain(t, func(t *testing.T, primary string) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		metricsAddr := ln.Addr().String()
		ln.Close()

		e := newEnvConfig(t, primary, true)
		e.extraArgs = []string{"--metrics-addr", metricsAddr}
		e.writeStore("spoof.yaml", spoofStore)
		e.startAgent()
		a, b, c := e.addPod("x", "a"), e.addPod("x", "b"), e.addPod("y", "c")
		if !a.IPv6.IsValid() || !b.IPv6.IsValid() || !c.IPv6.IsValid() {
			t.Fatal("pods lack IPv6 addresses on a dual-stack chain")
		}
		inB, inA := listenUDP(t, b, 82), listenUDP(t, a, 82)
		gw4, gw6 := e.chain.Subnet4.Addr().Next(), e.chain.Subnet6.Addr().Next()
		node4 := nodeAddr(t, e)
		// Far past what host-local gave three pods.
		u4, u6 := e.chain.Subnet4.Addr().As4(), e.chain.Subnet6.Addr().As16()
		u4[3], u6[14], u6[15] = 250, 0xbe, 0xef
		unassigned4, unassigned6 := netip.AddrFrom4(u4), netip.AddrFrom16(u6)
		cMAC := podLinkMAC(t, c)

		// The policy works, and a real datagram from a to b arrives (and
		// leaves neighbour entries for the ARP test below).
		for _, dst := range []netip.Addr{b.IPv4, b.IPv6} {
			if !eventually(3*time.Second, func() bool {
				tok := token()
				sendUDP(t, a, dst, 82, tok)
				return inB.got(tok, 300*time.Millisecond)
			}) {
				t.Fatalf("a → b %v UDP 82 does not arrive: the test cannot tell a drop from a broken path", dst)
			}
		}
		tok := token()
		sendUDP(t, c, b.IPv4, 82, tok)
		if inB.got(tok, 300*time.Millisecond) {
			t.Fatal("c reaches b with its own address: the policy is not enforced")
		}

		forged := []struct {
			name     string
			src, dst netip.Addr
			in       *udpSink
		}{
			{"another pod's IPv4 (the issue's reproduction)", a.IPv4, b.IPv4, inB},
			{"another pod's IPv6", a.IPv6, b.IPv6, inB},
			{"the gateway's IPv4", gw4, b.IPv4, inB},
			{"the gateway's IPv6", gw6, b.IPv6, inB},
			{"the node's IPv4", node4, b.IPv4, inB},
			{"an unassigned IPv4", unassigned4, a.IPv4, inA},
			{"an unassigned IPv6", unassigned6, a.IPv6, inA},
		}
		for i, f := range forged {
			tok := token()
			// A few tries, so that a lost packet cannot pass for a drop.
			for range 3 {
				rawUDP(t, c, f.src, f.dst, uint16(40000+i), 82, tok)
			}
			if f.in.got(tok, 500*time.Millisecond) {
				t.Errorf("forged source %v (%s) → %v: the datagram ARRIVED", f.src, f.name, f.dst)
			}
		}

		// Gratuitous ARP claiming a's address and the gateway's, with c's
		// MAC. Entries older than the neighbour lock time would be taken
		// over.
		time.Sleep(1100 * time.Millisecond)
		for _, claimed := range []netip.Addr{a.IPv4, gw4} {
			for _, op := range []uint16{1, 2} { // request and reply forms
				gratuitousARP(t, c, cMAC, claimed, op)
			}
		}
		time.Sleep(300 * time.Millisecond)
		for _, claimed := range []netip.Addr{a.IPv4, gw4} {
			if where := neighbourWith(t, []*pod{a, b}, claimed, cMAC); where != "" {
				t.Errorf("gratuitous ARP from c poisoned %s: %v is at c's MAC %s", where, claimed, cMAC)
			}
		}
		// The same over IPv6: an unsolicited, overriding neighbour
		// advertisement for a's address with c's MAC.
		unsolicitedNA(t, c, cMAC, a.IPv6)
		time.Sleep(300 * time.Millisecond)
		if where := neighbourWith(t, []*pod{a, b}, a.IPv6, cMAC); where != "" {
			t.Errorf("neighbour advertisement from c poisoned %s: %v is at c's MAC %s", where, a.IPv6, cMAC)
		}
		if len(e.flowLines(`"drop_reason_desc":"INVALID_SOURCE_IP"`, `"destination":"ff02::1"`, `"pod_name":"c"`)) == 0 {
			t.Errorf("no flow record for c's neighbour advertisement for %v", a.IPv6)
		}
		if primary == "bridge" {
			naForLinkLocal(t, metricsAddr, a, b, c, cMAC)
		}
		tok = token()
		sendUDP(t, b, a.IPv4, 82, tok)
		if !inA.got(tok, time.Second) {
			t.Errorf("b no longer reaches a after c's gratuitous ARP")
		}
		tok = token()
		sendUDP(t, b, a.IPv6, 82, tok)
		if !inA.got(tok, time.Second) {
			t.Errorf("b no longer reaches a over IPv6 after c's neighbour advertisement")
		}

		// Every forgery is on record with its reason and the real sender.
		for _, f := range forged {
			want := []string{`"drop_reason_desc":"INVALID_SOURCE_IP"`, `"source":"` + f.src.String() + `"`, `"pod_name":"c"`}
			if !eventually(3*time.Second, func() bool { return len(e.flowLines(want...)) > 0 }) {
				t.Errorf("no flow record for the forged source %v (%s): want %v", f.src, f.name, want)
			}
		}
		for _, claimed := range []netip.Addr{a.IPv4, gw4} {
			if len(e.flowLines(`"drop_reason_desc":"INVALID_SOURCE_IP"`, `"source":"`+claimed.String()+`"`, `"destination":"`+claimed.String()+`"`)) == 0 {
				t.Errorf("no flow record for c's gratuitous ARP for %v", claimed)
			}
		}
		if n := scrapeCounter(t, metricsAddr, `bulkhead_drops_total{reason="INVALID_SOURCE_IP"}`); n < float64(len(forged)+2) {
			t.Errorf("bulkhead_drops_total{reason=\"INVALID_SOURCE_IP\"} = %v, want at least %d", n, len(forged)+2)
		}
	})
}

func token() string { return "bulkhead-spoof-" + strconv.FormatInt(time.Now().UnixNano(), 36) }

// udpSink records the payloads a pod receives on a UDP port (IPv4 and
// IPv6). It never answers: a forged source must get nothing back either.
type udpSink struct {
	mu   sync.Mutex
	seen map[string]bool
}

func listenUDP(t *testing.T, p *pod, port int) *udpSink {
	t.Helper()
	s := &udpSink{seen: map[string]bool{}}
	for _, network := range []string{"udp4", "udp6"} {
		var pc net.PacketConn
		err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
			var err error
			pc, err = net.ListenPacket(network, fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatalf("listen %s in %s: %v", network, p.Name, err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 1500)
			for {
				n, _, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				s.mu.Lock()
				s.seen[string(buf[:n])] = true
				s.mu.Unlock()
			}
		}()
	}
	return s
}

func (s *udpSink) got(tok string, wait time.Duration) bool {
	return eventually(wait, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.seen[tok]
	})
}

// sendUDP sends one ordinary datagram from p.
func sendUDP(t *testing.T, p *pod, to netip.Addr, port int, payload string) {
	t.Helper()
	c, err := p.dial("udp", to, port, time.Second)
	if err != nil {
		t.Fatalf("dial from %s: %v", p.Name, err)
	}
	defer c.Close()
	_, _ = c.Write([]byte(payload))
}

// rawUDP sends a UDP datagram with a forged source address from a raw
// socket (IPPROTO_RAW: the header is ours) inside p's netns.
func rawUDP(t *testing.T, p *pod, src, dst netip.Addr, sport, dport uint16, payload string) {
	t.Helper()
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...)
	var pkt []byte
	var sa unix.Sockaddr
	family := unix.AF_INET
	if dst.Is4() {
		ip := make([]byte, 20)
		ip[0], ip[8], ip[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
		s, d := src.As4(), dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		// The kernel fills the IP checksum; a UDP checksum of 0 is "none".
		pkt = append(ip, udp...)
		sa = &unix.SockaddrInet4{Addr: d}
	} else {
		family = unix.AF_INET6
		s, d := src.As16(), dst.As16()
		binary.BigEndian.PutUint16(udp[6:], udpChecksum6(s, d, udp))
		ip := make([]byte, 40)
		ip[0], ip[6], ip[7] = 0x60, 17, 64
		binary.BigEndian.PutUint16(ip[4:], uint16(len(udp)))
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		pkt = append(ip, udp...)
		sa = &unix.SockaddrInet6{Addr: d}
	}
	err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
		fd, err := unix.Socket(family, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, sa)
	})
	if err != nil {
		t.Fatalf("raw send %v → %v from %s: %v", src, dst, p.Name, err)
	}
}

func udpChecksum6(src, dst [16]byte, udp []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src[:])
	add(dst[:])
	var pseudo [8]byte
	binary.BigEndian.PutUint32(pseudo[0:], uint32(len(udp)))
	pseudo[7] = 17
	add(pseudo[:])
	add(udp)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	if c := ^uint16(sum); c != 0 {
		return c
	}
	return 0xffff
}

// gratuitousARP broadcasts an ARP packet from p's eth0 (AF_PACKET) that
// claims addr for mac.
func gratuitousARP(t *testing.T, p *pod, mac net.HardwareAddr, addr netip.Addr, op uint16) {
	t.Helper()
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], unix.ETH_P_ARP)
	binary.BigEndian.PutUint16(f[14:], 1)
	binary.BigEndian.PutUint16(f[16:], unix.ETH_P_IP)
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], op)
	a4 := addr.As4()
	copy(f[22:28], mac)
	copy(f[28:32], a4[:])
	copy(f[32:38], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[38:42], a4[:])
	err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: l.Attrs().Index, Protocol: htons(unix.ETH_P_ARP), Halen: 6}
		copy(sa.Addr[:], f[0:6])
		return unix.Sendto(fd, f, 0, sa)
	})
	if err != nil {
		t.Fatalf("send ARP from %s: %v", p.Name, err)
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// unsolicitedNA sends a neighbour advertisement (override flag, target
// link-layer option) from p to all nodes, claiming target for mac. The
// kernel picks the source (p's link-local address) and the checksum.
func unsolicitedNA(t *testing.T, p *pod, mac net.HardwareAddr, target netip.Addr) {
	t.Helper()
	msg := make([]byte, 32)
	msg[0] = 136
	msg[4] = 0x20 // override
	tg := target.As16()
	copy(msg[8:24], tg[:])
	msg[24], msg[25] = 2, 1
	copy(msg[26:32], mac)
	err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_ICMPV6)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, 255); err != nil {
			return err
		}
		sa := &unix.SockaddrInet6{Addr: netip.MustParseAddr("ff02::1").As16(), ZoneId: uint32(l.Attrs().Index)}
		return unix.Sendto(fd, msg, 0, sa)
	})
	if err != nil {
		t.Fatalf("send NA from %s: %v", p.Name, err)
	}
}

// naForLinkLocal: on a bridge the pods share a link, and c claims a's
// link-local address with its own MAC in an unsolicited, overriding NA
// (sent from c's own link-local address). b, which has just resolved a's
// link-local address, keeps a's MAC, and the drop is counted.
func naForLinkLocal(t *testing.T, metricsAddr string, a, b, c *pod, cMAC net.HardwareAddr) {
	t.Helper()
	aLL, aMAC := podLinkLocal(t, a), podLinkMAC(t, a)
	// b resolves aLL: its datagram is dropped (ordinary traffic from a
	// link-local source), but the NS and a's NA before it pass.
	err := ns.WithNetNSPath(b.NS.Path(), func(ns.NetNS) error {
		conn, err := net.DialUDP("udp6", nil, &net.UDPAddr{IP: aLL.AsSlice(), Zone: b.IfName, Port: 82})
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write([]byte(token()))
		return err
	})
	if err != nil {
		t.Fatalf("send from b to %v: %v", aLL, err)
	}
	if !eventually(3*time.Second, func() bool { return neighbourWith(t, []*pod{b}, aLL, aMAC) != "" }) {
		t.Fatalf("b did not resolve a's link-local address %v: the test cannot tell a drop from a missing entry", aLL)
	}
	before := scrapeCounter(t, metricsAddr, `bulkhead_drops_total{reason="INVALID_SOURCE_IP"}`)
	time.Sleep(1100 * time.Millisecond)
	unsolicitedNA(t, c, cMAC, aLL)
	time.Sleep(300 * time.Millisecond)
	if where := neighbourWith(t, []*pod{a, b}, aLL, cMAC); where != "" {
		t.Errorf("neighbour advertisement from c poisoned %s: a's link-local %v is at c's MAC %s", where, aLL, cMAC)
	}
	if !eventually(3*time.Second, func() bool {
		return scrapeCounter(t, metricsAddr, `bulkhead_drops_total{reason="INVALID_SOURCE_IP"}`) > before
	}) {
		t.Errorf("c's neighbour advertisement for a's link-local %v is not counted as INVALID_SOURCE_IP", aLL)
	}
}

// podLinkLocal is the (first) IPv6 link-local address of p's interface.
func podLinkLocal(t *testing.T, p *pod) netip.Addr {
	t.Helper()
	var ll netip.Addr
	err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
				ll = ip
				return nil
			}
		}
		return fmt.Errorf("%s has no IPv6 link-local address", p.IfName)
	})
	if err != nil {
		t.Fatal(err)
	}
	return ll
}

func podLinkMAC(t *testing.T, p *pod) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

// neighbourWith names the first place (the node, or one of pods) whose
// neighbour table maps addr to mac, or "".
func neighbourWith(t *testing.T, pods []*pod, addr netip.Addr, mac net.HardwareAddr) string {
	t.Helper()
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	match := func() (bool, error) {
		ns, err := netlink.NeighList(0, family)
		if err != nil {
			return false, err
		}
		for _, n := range ns {
			if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == addr && bytes.Equal(n.HardwareAddr, mac) {
				return true, nil
			}
		}
		return false, nil
	}
	if hit, err := match(); err != nil {
		t.Fatal(err)
	} else if hit {
		return "the node"
	}
	for _, p := range pods {
		var hit bool
		err := ns.WithNetNSPath(p.NS.Path(), func(ns.NetNS) error {
			var err error
			hit, err = match()
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if hit {
			return "pod " + p.Namespace + "/" + p.Name
		}
	}
	return ""
}

// nodeAddr is an IPv4 address of the node outside the chain's subnet: the
// host identity, which the pods' default policy admits.
func nodeAddr(t *testing.T, e *env) netip.Addr {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		pfx, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := pfx.Addr()
		if ip.Is4() && !ip.IsLoopback() && !e.chain.Subnet4.Contains(ip) {
			return ip
		}
	}
	t.Fatal("the node has no IPv4 address outside the pod subnet")
	return netip.Addr{}
}

// scrapeCounter reads one sample from the agent's metrics (0 if absent).
func scrapeCounter(t *testing.T, addr, series string) float64 {
	t.Helper()
	var v float64
	eventually(3*time.Second, func() bool {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(b)
		if m == nil {
			return false
		}
		v, _ = strconv.ParseFloat(string(m[1]), 64)
		return true
	})
	return v
}

// TestRestoredRecordWithoutMAC: endpoint records written before the agent
// kept the pod's MAC, with source-address slots that hold nothing (as maps
// from before source validation), are completed from the pod's netns when
// the agent restarts: the pods send again, and forgeries are still dropped.
func TestRestoredRecordWithoutMAC(t *testing.T) {
	e := newEnvConfig(t, "ptp", false)
	e.writeStore("spoof.yaml", spoofStore)
	e.startAgent()
	a, b, c := e.addPod("x", "a"), e.addPod("x", "b"), e.addPod("y", "c")
	inB := listenUDP(t, b, 82)
	e.stopAgent(syscall.SIGTERM)

	records, err := filepath.Glob(filepath.Join(e.stateDir, "endpoints", "*.json"))
	if err != nil || len(records) != 3 {
		t.Fatalf("endpoint records: %v %v", records, err)
	}
	var ids []uint32
	for _, path := range records {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var rec map[string]any
		if err := json.Unmarshal(raw, &rec); err != nil {
			t.Fatal(err)
		}
		if rec["mac"] == nil {
			t.Fatalf("record %s has no MAC: %s", path, raw)
		}
		if ll, _ := rec["linkLocal"].([]any); len(ll) == 0 {
			t.Fatalf("record %s has no link-local address: %s", path, raw)
		}
		id, _ := rec["id"].(float64)
		ids = append(ids, uint32(id))
		delete(rec, "mac")
		delete(rec, "linkLocal")
		if raw, err = json.Marshal(rec); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.bpffs, "maps", "endpoint_addrs"), nil)
	if err != nil {
		t.Fatal(err)
	}
	empty := make([]byte, m.ValueSize())
	for id := uint32(1); id < 16; id++ {
		if err := m.Update(id, empty, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
	m.Close()
	// With empty slots, the attached programs drop everything the pods send.
	tok := token()
	sendUDP(t, a, b.IPv4, 82, tok)
	if inB.got(tok, 500*time.Millisecond) {
		t.Fatal("a pod with no registered addresses could send")
	}

	e.startAgent()
	if !eventually(3*time.Second, func() bool {
		tok := token()
		sendUDP(t, a, b.IPv4, 82, tok)
		return inB.got(tok, 300*time.Millisecond)
	}) {
		t.Fatalf("a cannot reach b after the restart: its MAC was not restored\n%s", e.agentLogs())
	}
	tok = token()
	rawUDP(t, c, a.IPv4, b.IPv4, 40000, 82, tok)
	if inB.got(tok, 500*time.Millisecond) {
		t.Fatal("c's forged datagram arrived after the restart")
	}
	for _, path := range records {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(raw, []byte(`"mac":"`)) {
			t.Errorf("record %s was not completed with the MAC: %s", path, raw)
		}
		if !bytes.Contains(raw, []byte(`"linkLocal":["fe80:`)) {
			t.Errorf("record %s was not completed with the link-local address: %s", path, raw)
		}
	}
	// And the re-attach registered them: nll (after mac, n4, n6, v4[4],
	// v6[4][4]) is set in every pod's slot.
	m, err = ebpf.LoadPinnedMap(filepath.Join(e.bpffs, "maps", "endpoint_addrs"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, id := range ids {
		v, err := m.LookupBytes(id)
		if err != nil || len(v) < 92 {
			t.Fatalf("slot of endpoint %d: %v", id, err)
		}
		if binary.NativeEndian.Uint32(v[88:92]) == 0 {
			t.Errorf("slot of endpoint %d holds no link-local address after the restart", id)
		}
	}
}
