package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/twonode"
)

// The tests below are issue 12's: the mTLS tunnel between enrolled pods,
// with the two-node topology, each run once with real SPIRE and once with
// the built-in CA (both nodes sharing one). What they rely on, beyond the
// issue's words:
//   - enrollment is the label bulkhead.io/mtls=enabled on the pod or its
//     namespace, in the store;
//   - the tunnel endpoint listens on twonode.TunnelPort (15008) on every
//     node, at the node's transit address, which the peers' store
//     documents give as status.hostIP/hostIPs;
//   - flow records: "mtls":true on flows that travel through the tunnel
//     (at the sending pod and at the receiving one), source.spiffe_id the
//     verified ID at the receiving pod, drop_reason_desc AUTH_REQUIRED for
//     plaintext that only an mtls: Required rule would have allowed; the
//     tunnel's own node-to-node connections are never pod flows;
//   - `bulkhead observe --mtls -o json` prints only mtls flows, one
//     {"flow":{...}} per line.

// mtlsPort is the port every server pod listens on (echo, TCP and UDP).
const mtlsPort = 8080

// mtlsWait is how long the tests wait for SVIDs and for the tunnel to come
// up: SPIRE syncs entries every 5 s, and the machine is slow and shared.
const mtlsWait = 90 * time.Second

// mtlsEnv is a two-node topology with these pods:
//
//	node A: a1, a2 (namespace client, enrolled by their pod label),
//	        a3 (client, not enrolled), a4 (web, enrolled by its namespace)
//	node B: b1, b2 (web, enrolled by the namespace), b3 (plain, not enrolled)
//
// a4, b1, b2 and b3 serve an echo on mtlsPort.
type mtlsEnv struct {
	topo                       *twonode.Topology
	a, b                       *twonode.Node
	a1, a2, a3, a4, b1, b2, b3 *twonode.Pod
}

var enrolled = map[string]string{twonode.MTLSLabel: twonode.MTLSEnabled}

func withLabels(m ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, l := range m {
		for k, v := range l {
			out[k] = v
		}
	}
	return out
}

// forEachSource runs test once with SPIRE and once with the built-in CA.
func forEachSource(t *testing.T, test func(t *testing.T, source string)) {
	for _, source := range []string{"spire", "builtin"} {
		t.Run(source, func(t *testing.T) { test(t, source) })
	}
}

// newMTLSEnv builds the topology (dual-stack, ptp), the namespaces and
// pods, and waits until every enrolled pod holds its SVID and a1's
// connections to b1 and a4 arrive through the tunnel.
func newMTLSEnv(t *testing.T, source string) *mtlsEnv {
	t.Helper()
	return newMTLSEnvPrimary(t, source, "ptp")
}

// newMTLSEnvPrimary is newMTLSEnv with another primary CNI plugin.
func newMTLSEnvPrimary(t *testing.T, source, primary string) *mtlsEnv {
	t.Helper()
	topo := twonode.New(t, twonode.Config{IdentitySource: source, IPv6: true, Primary: primary,
		// Each node has its own loopback: the same metrics port on both.
		ExtraAgentArgs: func(string) []string {
			return []string{"--store-shrink-grace", "1s", "--metrics-addr", spireMetricsAddr}
		}})
	e := &mtlsEnv{topo: topo, a: topo.A(), b: topo.B()}
	topo.WriteNamespaces(map[string]map[string]string{
		"client": {"team": "client"},
		"web":    withLabels(map[string]string{"team": "web"}, enrolled),
		"plain":  {"team": "plain"},
	})
	e.a1 = e.a.AddPod("client", "a1", withLabels(map[string]string{"app": "a1"}, enrolled), "a1")
	e.a2 = e.a.AddPod("client", "a2", withLabels(map[string]string{"app": "a2"}, enrolled), "a2")
	e.a3 = e.a.AddPod("client", "a3", map[string]string{"app": "a3"}, "a3")
	e.a4 = e.a.AddPod("web", "a4", map[string]string{"app": "a4"}, "a4")
	e.b1 = e.b.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	e.b2 = e.b.AddPod("web", "b2", map[string]string{"app": "b2"}, "b2")
	e.b3 = e.b.AddPod("plain", "b3", map[string]string{"app": "b3"}, "b3")
	for _, p := range []*twonode.Pod{e.a4, e.b1, e.b2, e.b3} {
		p.Serve(mtlsPort)
	}
	topo.SyncPeers()
	e.waitSVIDs(t, e.a, e.a1, e.a2, e.a4)
	e.waitSVIDs(t, e.b, e.b1, e.b2)
	e.waitTunnel(t)
	return e
}

// waitTunnel waits until a1's connections to b1 and to a4 arrive through
// the tunnel.
func (e *mtlsEnv) waitTunnel(t *testing.T) {
	t.Helper()
	// Until the agents know who is enrolled, a1's connections may still
	// travel in plaintext: wait until they arrive through the tunnel.
	for _, to := range []*twonode.Pod{e.b1, e.a4} {
		var err error
		if !twonode.Eventually(mtlsWait, func() bool {
			if err = exchange(e.a1, to.IPv4, mtlsPort, mtlsToken(t, "setup"), 2*time.Second); err != nil {
				return false
			}
			return len(flowRecs(t, to.Node, func(f flowRec) bool {
				return f.MTLS && f.TrafficDirection == "INGRESS" && f.Destination.PodName == to.Name && f.Source.SPIFFEID == e.a1.SPIFFEID().String()
			})) > 0
		}) {
			t.Fatalf("a1 (enrolled) does not reach %s (enrolled, no policy) through the tunnel after %v: no mtls flow record on %s (last error %v)",
				to.Name, mtlsWait, to.Node.Name, err)
		}
	}
}

// waitSVIDs waits until each of pods (all of node n) holds an SVID with
// its SPIFFE ID.
func (e *mtlsEnv) waitSVIDs(t *testing.T, n *twonode.Node, pods ...*twonode.Pod) {
	t.Helper()
	want := map[string]string{}
	for _, p := range pods {
		want[p.Namespace+"/"+p.Name] = p.SPIFFEID().String()
	}
	var last []string
	if !twonode.Eventually(mtlsWait, func() bool {
		l, err := n.Client.ListIdentities(context.Background())
		if err != nil {
			return false
		}
		last = last[:0]
		got := map[string]string{}
		for _, s := range l.SVIDs {
			if s.Serial != "" {
				got[s.Pod] = s.SPIFFEID
			}
			last = append(last, fmt.Sprintf("%s=%s", s.Pod, s.SPIFFEID))
		}
		for pod, id := range want {
			if got[pod] != id {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("%s: pods without their SVIDs after %v: want %v, have %v", n.Name, mtlsWait, want, last)
	}
}

// mtlsToken is a payload no other traffic carries.
func mtlsToken(t testing.TB, what string) []byte {
	t.Helper()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("bulkhead-mtls-" + what + "-" + hex.EncodeToString(b))
}

// exchange dials to:port from p, sends payload and waits for the echo.
// Any failure is returned, the dial's included.
func exchange(p *twonode.Pod, to netip.Addr, port int, payload []byte, timeout time.Duration) error {
	c, err := p.Dial("tcp", to, port, timeout)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	return echoOn(c, payload, timeout)
}

// echoOn sends payload on c and waits for it to come back.
func echoOn(c net.Conn, payload []byte, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(payload); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo %q, sent %q", got, payload)
	}
	return nil
}

// isTimeout reports whether err is a timeout: a hang, where the tests want
// a refusal or a reset.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// flowRec is the part of a flow record the tests read.
type flowRec struct {
	Verdict        string `json:"verdict"`
	DropReasonDesc string `json:"drop_reason_desc"`
	IP             struct {
		Source      string `json:"source"`
		Destination string `json:"destination"`
	} `json:"IP"`
	L4 struct {
		TCP *struct {
			SourcePort      uint16 `json:"source_port"`
			DestinationPort uint16 `json:"destination_port"`
		} `json:"TCP"`
	} `json:"l4"`
	Source           flowEndpoint `json:"source"`
	Destination      flowEndpoint `json:"destination"`
	TrafficDirection string       `json:"traffic_direction"`
	IsReply          bool         `json:"is_reply"`
	MTLS             bool         `json:"mtls"`
	IngressAllowedBy []flowPolicy `json:"ingress_allowed_by"`
	raw              string
}

type flowPolicy struct {
	Name string `json:"name"`
}

// allowedBy reports whether the flow was let in by the policy named name.
func (f flowRec) allowedBy(name string) bool {
	return slices.ContainsFunc(f.IngressAllowedBy, func(p flowPolicy) bool { return p.Name == name })
}

type flowEndpoint struct {
	Namespace string `json:"namespace"`
	PodName   string `json:"pod_name"`
	SPIFFEID  string `json:"spiffe_id"`
}

func (f flowRec) ports() (uint16, uint16) {
	if f.L4.TCP == nil {
		return 0, 0
	}
	return f.L4.TCP.SourcePort, f.L4.TCP.DestinationPort
}

// flowRecs are n's flow log records for which keep says true.
func flowRecs(t testing.TB, n *twonode.Node, keep func(flowRec) bool) []flowRec {
	t.Helper()
	return flowRecsSince(t, n, 0, keep)
}

// flowMark is the number of records in n's flow log now.
func flowMark(n *twonode.Node) int { return len(n.FlowLines()) }

// flowRecsSince is flowRecs of the records after the first mark.
func flowRecsSince(t testing.TB, n *twonode.Node, mark int, keep func(flowRec) bool) []flowRec {
	t.Helper()
	var out []flowRec
	lines := n.FlowLines()
	for _, line := range lines[min(mark, len(lines)):] {
		var f flowRec
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			t.Fatalf("%s: flow record %q: %v", n.Name, line, err)
		}
		f.raw = line
		if keep(f) {
			out = append(out, f)
		}
	}
	return out
}

// waitFlow waits until n has a record keep says true for and returns it.
func waitFlow(t testing.TB, n *twonode.Node, what string, keep func(flowRec) bool) flowRec {
	t.Helper()
	var got []flowRec
	if !twonode.Eventually(10*time.Second, func() bool {
		got = flowRecs(t, n, keep)
		return len(got) > 0
	}) {
		t.Fatalf("%s: no flow record %s in:\n%s", n.Name, what, strings.Join(n.FlowLines(), "\n"))
	}
	return got[0]
}

// noTunnelFlows fails t when a node reports a flow on the tunnel port: the
// tunnel's own connections are not pod flows.
func noTunnelFlows(t testing.TB, nodes ...*twonode.Node) {
	t.Helper()
	for _, n := range nodes {
		if fs := flowRecs(t, n, func(f flowRec) bool {
			s, d := f.ports()
			return s == twonode.TunnelPort || d == twonode.TunnelPort
		}); len(fs) > 0 {
			t.Errorf("%s reports the tunnel's own connections as pod flows: %s", n.Name, fs[0].raw)
		}
	}
}

// noPlaintext fails t when the capture holds any of the payloads, or any
// segment from or to one of the pod addresses on port (the pods' own
// connection, which only the tunnel may carry across).
func noPlaintext(t *testing.T, where string, c *netns.Capture, port uint16, to []netip.Addr, payloads ...[]byte) {
	t.Helper()
	for _, p := range payloads {
		if c.Contains(p) {
			t.Errorf("%s: payload %q crossed in plaintext", where, p)
		}
	}
	for _, s := range c.Segments() {
		for _, a := range to {
			if s.Dst == netip.AddrPortFrom(a, port) || s.Src == netip.AddrPortFrom(a, port) {
				t.Errorf("%s: the pods' own connection crossed outside the tunnel: %v -> %v flags %#x, %d bytes", where, s.Src, s.Dst, s.Flags, len(s.Payload))
				return
			}
		}
	}
	if c.Truncated() {
		t.Errorf("%s: the capture was truncated: the check saw a part only", where)
	}
}

// observeMTLS runs `bulkhead observe --mtls -o json --last 0` against n's
// agent and returns the flows it printed.
func observeMTLS(t *testing.T, n *twonode.Node) []flowRec {
	t.Helper()
	out, err := runCLI(t, n.Socket, "observe", "--mtls", "-o", "json", "--last", "0")
	if err != nil {
		t.Fatalf("%s: bulkhead observe --mtls: %v\n%s", n.Name, err, out)
	}
	var fs []flowRec
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var it struct {
			Flow *flowRec `json:"flow"`
		}
		if err := json.Unmarshal(sc.Bytes(), &it); err != nil {
			t.Fatalf("%s: bulkhead observe --mtls -o json printed %q: %v", n.Name, sc.Text(), err)
		}
		if it.Flow != nil {
			it.Flow.raw = sc.Text()
			fs = append(fs, *it.Flow)
		}
	}
	return fs
}

// TestMTLSEnrolledToEnrolled: two enrolled pods talk through the tunnel,
// across nodes and on one node, over IPv4 and IPv6. Between the nodes the
// wire carries TLS on the tunnel port and never the payload nor the pods'
// own connection; on one node, the tunnel's connection to itself (over the
// node's loopback) is TLS as well. The receiving node's flow records say
// mtls with the source's verified SPIFFE ID, the sending node's say mtls
// too, `bulkhead observe --mtls` lists exactly such flows, and no node
// reports the tunnel's own connections as pod flows.
//
// The bridge variant (built-in CA) checks the redirection with a bridge
// primary, where the bridge would switch a same-node frame at L2.
func TestMTLSEnrolledToEnrolled(t *testing.T) {
	for _, v := range []struct{ name, source, primary string }{
		{"spire", "spire", "ptp"}, {"builtin", "builtin", "ptp"}, {"builtin-bridge", "builtin", "bridge"},
	} {
		t.Run(v.name, func(t *testing.T) { testMTLSEnrolledToEnrolled(t, v.source, v.primary) })
	}
}

func testMTLSEnrolledToEnrolled(t *testing.T, source, primary string) {
	e := newMTLSEnvPrimary(t, source, primary)
	// A plaintext flow first (neither a3 nor b3 is enrolled): it must
	// not show in observe --mtls.
	mark := flowMark(e.b)
	if err := exchange(e.a3, e.b3.IPv4, mtlsPort, mtlsToken(t, "plain"), 5*time.Second); err != nil {
		t.Fatalf("a3 -> b3 (not enrolled): %v", err)
	}
	transit := netns.StartCapture(t, e.a.NS, twonode.TransitLink)
	loop := netns.StartCapture(t, e.a.NS, "lo")
	var cross, same [][]byte
	for _, fam := range []struct {
		name   string
		b1, a4 netip.Addr
	}{{"IPv4", e.b1.IPv4, e.a4.IPv4}, {"IPv6", e.b1.IPv6, e.a4.IPv6}} {
		p := mtlsToken(t, "cross-"+fam.name)
		if err := exchange(e.a1, fam.b1, mtlsPort, p, 10*time.Second); err != nil {
			t.Fatalf("a1 -> b1 over %s: %v", fam.name, err)
		}
		cross = append(cross, p)
		p = mtlsToken(t, "same-"+fam.name)
		if err := exchange(e.a1, fam.a4, mtlsPort, p, 10*time.Second); err != nil {
			t.Fatalf("a1 -> a4 over %s: %v", fam.name, err)
		}
		same = append(same, p)
	}
	transit.Stop()
	loop.Stop()

	if !transit.LooksLikeTLS(twonode.TunnelPort) {
		t.Errorf("no TLS on port %d between the nodes; TCP ports seen %v", twonode.TunnelPort, transit.TCPPorts())
	}
	noPlaintext(t, "transit link", transit, mtlsPort, []netip.Addr{e.b1.IPv4, e.b1.IPv6}, cross...)
	if !loop.LooksLikeTLS(twonode.TunnelPort) {
		t.Errorf("no TLS on port %d over node A's loopback (the same-node tunnel); TCP ports seen %v", twonode.TunnelPort, loop.TCPPorts())
	}
	noPlaintext(t, "node A's loopback", loop, mtlsPort, nil, same...)

	a1ID := e.a1.SPIFFEID().String()
	for _, dst := range []struct {
		n   *twonode.Node
		pod *twonode.Pod
	}{{e.b, e.b1}, {e.a, e.a4}} {
		for _, ip := range dst.pod.IPs() {
			f := waitFlow(t, dst.n, fmt.Sprintf("of a1's tunnelled flow to %s at %s", dst.pod.Name, ip), func(f flowRec) bool {
				return f.TrafficDirection == "INGRESS" && f.Verdict == "FORWARDED" && !f.IsReply && f.MTLS &&
					f.Destination.PodName == dst.pod.Name && f.IP.Destination == ip.String()
			})
			if f.Source.SPIFFEID != a1ID {
				t.Errorf("%s: the tunnelled flow to %s names source.spiffe_id %q, want the verified %s: %s", dst.n.Name, dst.pod.Name, f.Source.SPIFFEID, a1ID, f.raw)
			}
		}
	}
	waitFlow(t, e.a, "of a1's egress into the tunnel (mtls)", func(f flowRec) bool {
		return f.TrafficDirection == "EGRESS" && f.MTLS && f.Source.PodName == "a1" && f.Destination.PodName == "b1"
	})
	// A record without mtls of a flow to b1 (made by this test: a1's)
	// would be plaintext.
	if fs := flowRecsSince(t, e.b, mark, func(f flowRec) bool {
		_, dport := f.ports()
		return f.TrafficDirection == "INGRESS" && !f.MTLS && f.Destination.PodName == "b1" && f.Verdict == "FORWARDED" && !f.IsReply &&
			dport == mtlsPort
	}); len(fs) > 0 {
		t.Errorf("node B forwarded a flow to b1 that did not come through the tunnel: %s", fs[0].raw)
	}

	for _, n := range []*twonode.Node{e.a, e.b} {
		obs := observeMTLS(t, n)
		if len(obs) == 0 {
			t.Errorf("%s: bulkhead observe --mtls lists nothing", n.Name)
		}
		for _, f := range obs {
			if !f.MTLS {
				t.Errorf("%s: bulkhead observe --mtls lists a flow without mtls: %s", n.Name, f.raw)
			}
		}
	}
	if obs := observeMTLS(t, e.b); !slices.ContainsFunc(obs, func(f flowRec) bool {
		return f.Destination.PodName == "b1" && f.Source.SPIFFEID == a1ID
	}) {
		t.Errorf("node B: bulkhead observe --mtls lacks a1's flow to b1")
	}
	if obs := observeMTLS(t, e.b); slices.ContainsFunc(obs, func(f flowRec) bool { return f.Destination.PodName == "b3" }) {
		t.Errorf("node B: bulkhead observe --mtls lists a3's plaintext flow to b3")
	}
	noTunnelFlows(t, e.a, e.b)
}

// b1MTLSOnly admits, to b1, TCP 8080 from any pod, and only through the
// tunnel.
const b1MTLSOnly = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: b1-mtls-only, namespace: web}
spec:
  selector: {podSelector: {matchLabels: {app: b1}}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 8080, protocol: TCP}]
    mtls: Required
`

// TestMTLSPlaintextToEnrolledDropped: b1's only rule needs mTLS. a3 and b3
// (not enrolled: their connections travel in plaintext), from the other
// node and from b1's own, are dropped in the kernel with AUTH_REQUIRED, in
// the flow records and the drop counter; a1 (enrolled) gets in through
// the tunnel.
func TestMTLSPlaintextToEnrolledDropped(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		// Before the policy, plaintext reaches the enrolled b1: the drop
		// below is the rule's doing.
		for _, p := range []*twonode.Pod{e.a3, e.b3} {
			if !twonode.Eventually(10*time.Second, func() bool { return p.TCPWorks(e.b1.IPv4, mtlsPort) }) {
				t.Fatalf("%s cannot reach b1 with no policy", p.Name)
			}
		}
		e.b.WriteStore("policy.yaml", b1MTLSOnly)
		for _, p := range []*twonode.Pod{e.a3, e.b3} {
			if !twonode.Eventually(10*time.Second, func() bool { return !p.TCPWorks(e.b1.IPv4, mtlsPort) }) {
				t.Fatalf("%s (not enrolled) still reaches b1, whose only rule needs mTLS", p.Name)
			}
		}
		if err := exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1"), 10*time.Second); err != nil {
			t.Fatalf("a1 (enrolled) cannot reach b1 through the tunnel: %v", err)
		}
		for _, p := range []*twonode.Pod{e.a3, e.b3} {
			if p.TCPWorks(e.b1.IPv4, mtlsPort) {
				t.Fatalf("%s reaches b1 again", p.Name)
			}
			waitFlow(t, e.b, "of "+p.Name+"'s plaintext dropped with AUTH_REQUIRED", func(f flowRec) bool {
				return f.Verdict == "DROPPED" && f.DropReasonDesc == "AUTH_REQUIRED" && f.Source.PodName == p.Name &&
					f.Destination.PodName == "b1" && !f.MTLS
			})
		}
		waitFlow(t, e.b, "of a1's tunnelled flow, allowed", func(f flowRec) bool {
			return f.Verdict == "FORWARDED" && f.MTLS && f.Destination.PodName == "b1" && f.Source.SPIFFEID == e.a1.SPIFFEID().String()
		})
		// ... and counted.
		const drops = `bulkhead_drops_total{reason="AUTH_REQUIRED"}`
		if !twonode.Eventually(10*time.Second, func() bool { v, ok := metric(t, e.b, drops); return ok && v >= 2 }) {
			v, ok := metric(t, e.b, drops)
			t.Errorf("node B: %s = %v (present %v), want at least 2 (a3's and b3's)", drops, v, ok)
		}
	})
}

// dialSpoofed connects from inside n with source address from:port (an
// address n need not hold: IP_TRANSPARENT) to to:mtlsPort and writes payload
// if it connects. It returns the dial's error.
func dialSpoofed(n ns.NetNS, from netip.AddrPort, to netip.Addr, payload []byte) error {
	d := net.Dialer{
		Timeout:   2 * time.Second,
		LocalAddr: net.TCPAddrFromAddrPort(from),
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				// IP_TRANSPARENT, not IP_FREEBIND: FREEBIND lets a socket
				// bind an address its host does not hold, but only a
				// transparent socket may also send from it (the route
				// lookup otherwise fails with ENETUNREACH).
				level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
				if from.Addr().Is6() {
					level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
				}
				serr = unix.SetsockoptInt(int(fd), level, opt, 1)
			})
			return errors.Join(err, serr)
		},
	}
	return n.Do(func(ns.NetNS) error {
		c, err := d.Dial("tcp", netip.AddrPortFrom(to, mtlsPort).String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Write(payload)
		return err
	})
}

// synAckFrom reports whether the capture saw dst answer a SYN from src.
func synAckFrom(c *netns.Capture, dst, src netip.AddrPort) bool {
	return slices.ContainsFunc(c.Segments(), func(s netns.Segment) bool {
		return s.Src == dst && s.Dst == src && s.Has(netns.TCPSyn|netns.TCPAck)
	})
}

// spoofPort is a source port for spoofed connections, distinct per call.
var spoofPort = struct {
	sync.Mutex
	next uint16
}{next: 41000}

func nextSpoofPort() uint16 {
	spoofPort.Lock()
	defer spoofPort.Unlock()
	spoofPort.next++
	return spoofPort.next
}

// TestMTLSIPTakeover: plaintext sent with the address of a1, a pod that b1
// admits through the tunnel, is dropped: from node A's own namespace
// (IP_TRANSPARENT: the address a1 holds, on a host that routes it) it
// crosses to node B, which takes it for a1 by its address and still drops
// it, with AUTH_REQUIRED; from a3's namespace, re-addressed as a1, it does
// not get an answer either. The control: a spoofed SYN with the address of
// a3, which is not enrolled, is answered while no policy is in force, so
// the spoofing reaches b1 and the check can see a leak. (a1's address is
// enrolled: plaintext from it is refused even before the policy, since
// enrolled pods never talk plaintext TCP.)
func TestMTLSIPTakeover(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		dst := netip.AddrPortFrom(e.b1.IPv4, mtlsPort)
		capt := netns.StartCapture(t, e.a.NS, twonode.TransitLink)

		// Control: no policy, so b1 answers a SYN that claims to be a3.
		ctl := netip.AddrPortFrom(e.a3.IPv4, nextSpoofPort())
		_ = dialSpoofed(e.a.NS, ctl, e.b1.IPv4, mtlsToken(t, "control"))
		if !twonode.Eventually(5*time.Second, func() bool { return synAckFrom(capt, dst, ctl) }) {
			t.Fatalf("control: b1 did not answer a spoofed SYN from %v with no policy in force: the check below could not fail", ctl)
		}

		e.b.WriteStore("policy.yaml", b1MTLSOnly)
		if !twonode.Eventually(10*time.Second, func() bool { return !e.a3.TCPWorks(e.b1.IPv4, mtlsPort) }) {
			t.Fatal("the policy is not in force: a3 still reaches b1")
		}
		if err := exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1"), 10*time.Second); err != nil {
			t.Fatalf("a1 cannot reach b1 through the tunnel: %v", err)
		}

		// From node A's namespace, as a1.
		spoofed := netip.AddrPortFrom(e.a1.IPv4, nextSpoofPort())
		payload := mtlsToken(t, "takeover-node")
		if err := dialSpoofed(e.a.NS, spoofed, e.b1.IPv4, payload); err == nil {
			t.Fatalf("a connection from node A's namespace as a1 (%v) reached b1 in plaintext", spoofed)
		}
		seenSYN := slices.ContainsFunc(capt.Segments(), func(s netns.Segment) bool { return s.Src == spoofed && s.Has(netns.TCPSyn) })
		if !seenSYN {
			t.Fatalf("the spoofed SYN from %v never left node A: the test proves nothing", spoofed)
		}
		if synAckFrom(capt, dst, spoofed) {
			t.Fatalf("b1 answered the spoofed SYN from %v: plaintext as a1 was admitted", spoofed)
		}
		f := waitFlow(t, e.b, "of the spoofed plaintext dropped with AUTH_REQUIRED", func(f flowRec) bool {
			sp, _ := f.ports()
			return f.Verdict == "DROPPED" && sp == spoofed.Port() && f.IP.Source == spoofed.Addr().String()
		})
		if f.DropReasonDesc != "AUTH_REQUIRED" || f.Source.PodName != "a1" {
			t.Errorf("node B dropped the spoofed plaintext with reason %q, source %q; want AUTH_REQUIRED and a1 (its address's owner): %s",
				f.DropReasonDesc, f.Source.PodName, f.raw)
		}

		// From a3's namespace, as a1: a3 takes a1's address (adds it to
		// its interface, as a pod that re-addresses itself would).
		err := e.a3.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: e.a1.IPv4.AsSlice(), Mask: net.CIDRMask(32, 32)}})
		})
		if err != nil {
			t.Fatalf("give a3 a1's address: %v", err)
		}
		spoofed = netip.AddrPortFrom(e.a1.IPv4, nextSpoofPort())
		payload2 := mtlsToken(t, "takeover-pod")
		if err := dialSpoofed(e.a3.NS, spoofed, e.b1.IPv4, payload2); err == nil {
			t.Fatalf("a3, as a1 (%v), reached b1 in plaintext", spoofed)
		}
		time.Sleep(time.Second)
		if synAckFrom(capt, dst, spoofed) {
			t.Fatalf("b1 answered a3's SYN as a1 (%v)", spoofed)
		}
		for _, p := range [][]byte{payload, payload2} {
			if capt.Contains(p) {
				t.Errorf("payload %q crossed the transit link", p)
			}
		}
	})
}

// b1FromA1 admits, to b1, only the verified SPIFFE ID of a1 (placeholder
// A1ID), through the tunnel.
const b1FromA1 = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: b1-from-a1, namespace: web}
spec:
  selector: {podSelector: {matchLabels: {app: b1}}}
  ingress:
  - from: [{spiffeID: "A1ID"}]
    ports: [{port: 8080, protocol: TCP}]
    mtls: Required
`

// b1FromA2Address adds a rule (no mTLS) for whatever holds a2's address
// (placeholder A2CIDR).
const b1FromA2Address = `
  - from: [{cidr: "A2CIDR"}]
    ports: [{port: 8080, protocol: TCP}]
`

// TestMTLSVerifiedIDDecides: b1 admits a1's SPIFFE ID through the tunnel.
// a1 gets in; a2, enrolled too, does not: the tunnel presents a2's SVID.
//
// Then the verified ID must win over the address. Node B's store is made
// wrong the way it is after an address was reassigned and the store has
// not caught up: it lists a2's address as a3's, a pod that is not enrolled
// (and a2 with none), and the policy gains a rule that allows whatever
// holds a2's address, in plaintext (a CIDR rule: Kubernetes' ipBlock
// covers the pods whose address is in it, and a3 now "is" there).
// Anything that trusts the address would let a2 in: a spoofed plaintext
// SYN from a2's address is indeed answered (the precondition). But a2's own connection travels
// through the tunnel with a2's SVID, and no rule admits a2's verified ID:
// it must stay out, while a1 still gets in. (Why not a CIDR rule with the
// store right: then the CIDR covers a2's own identity, and letting a2 in is
// what the policy says. And mtls: Required on a CIDR peer is invalid: an
// address cannot be verified.)
func TestMTLSVerifiedIDDecides(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		policy := strings.ReplaceAll(b1FromA1, "A1ID", e.a1.SPIFFEID().String())
		e.b.WriteStore("policy.yaml", policy)
		if !twonode.Eventually(10*time.Second, func() bool { return !e.a2.TCPWorks(e.b1.IPv4, mtlsPort) }) {
			t.Fatal("a2 still reaches b1, whose policy admits a1's SPIFFE ID only")
		}
		// a2's attempts before the policy was in force went through
		// (allowed by no-policy-selects), and flow records are written
		// a little after the fact: what counts is a flow of a2 that the
		// policy let in.
		if err := exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1"), 10*time.Second); err != nil {
			t.Fatalf("a1 cannot reach b1, whose policy admits its SPIFFE ID: %v", err)
		}
		if err := exchange(e.a2, e.b1.IPv4, mtlsPort, mtlsToken(t, "a2"), 10*time.Second); err == nil {
			t.Fatal("a2 reaches b1")
		}
		if fs := flowRecs(t, e.b, func(f flowRec) bool {
			return f.Verdict == "FORWARDED" && f.Destination.PodName == "b1" && f.Source.SPIFFEID == e.a2.SPIFFEID().String() &&
				f.allowedBy("b1-from-a1")
		}); len(fs) > 0 {
			t.Fatalf("node B forwarded a flow from a2 to b1: %s", fs[0].raw)
		}

		// Node B's wrong view: a2's address is a3's.
		e.topo.WritePeersOf(e.b, map[*twonode.Pod][]netip.Addr{
			e.a3: {e.a3.IPv4, e.a2.IPv4, e.a3.IPv6},
			e.a2: nil,
		})
		e.b.WriteStore("policy.yaml", policy+strings.ReplaceAll(b1FromA2Address, "A2CIDR", netip.PrefixFrom(e.a2.IPv4, 32).String()))
		capt := netns.StartCapture(t, e.a.NS, twonode.TransitLink)
		dst := netip.AddrPortFrom(e.b1.IPv4, mtlsPort)
		if !twonode.Eventually(15*time.Second, func() bool {
			from := netip.AddrPortFrom(e.a2.IPv4, nextSpoofPort())
			_ = dialSpoofed(e.a.NS, from, e.b1.IPv4, mtlsToken(t, "precondition"))
			return synAckFrom(capt, dst, from)
		}) {
			t.Fatal("precondition: node B does not admit plaintext from a2's address after its store gave it to a3 and a rule allowed it")
		}
		for range 3 {
			if err := exchange(e.a2, e.b1.IPv4, mtlsPort, mtlsToken(t, "a2-stale"), 10*time.Second); err == nil {
				t.Fatal("a2 reaches b1 through the tunnel: its address, not its verified ID, decided")
			}
			if err := exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1-stale"), 10*time.Second); err != nil {
				t.Fatalf("a1 cannot reach b1 with node B's view stale: %v", err)
			}
		}
		if fs := flowRecs(t, e.b, func(f flowRec) bool {
			return f.Verdict == "FORWARDED" && f.MTLS && f.Destination.PodName == "b1" && f.Source.SPIFFEID != e.a1.SPIFFEID().String() &&
				f.allowedBy("b1-from-a1")
		}); len(fs) > 0 {
			t.Fatalf("node B forwarded a tunnelled flow to b1 from another ID than a1's: %s", fs[0].raw)
		}
	})
}

// a1EgressMTLSToPlain lets a1 reach the namespace plain (not enrolled),
// only through the tunnel.
const a1EgressMTLSToPlain = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: a1-egress-mtls, namespace: client}
spec:
  selector: {podSelector: {matchLabels: {app: a1}}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: plain}}}]
    ports: [{port: 8080, protocol: TCP}]
    mtls: Required
`

// TestMTLSEgressRequiredToNonEnrolled: a1's egress rule to b3 needs mTLS
// and b3 is not enrolled, so the connection is refused at once (an error,
// not a hang), and nothing of it crosses to node B. Before the rule, the
// same connection travels in plaintext and the capture sees its payload:
// the check can fail.
func TestMTLSEgressRequiredToNonEnrolled(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		capt := netns.StartCapture(t, e.a.NS, twonode.TransitLink)
		base := mtlsToken(t, "baseline")
		if err := exchange(e.a1, e.b3.IPv4, mtlsPort, base, 10*time.Second); err != nil {
			t.Fatalf("a1 -> b3 with no policy: %v", err)
		}
		if !twonode.Eventually(5*time.Second, func() bool { return capt.Contains(base) }) {
			t.Fatal("control: the capture does not show a1's plaintext to b3 (not enrolled): the check below could not fail")
		}

		e.a.WriteStore("policy.yaml", a1EgressMTLSToPlain)
		// The policy is in force once a1 can no longer reach b1 (not
		// allowed by its egress rule any more).
		if !twonode.Eventually(10*time.Second, func() bool { return !e.a1.TCPWorks(e.b1.IPv4, mtlsPort) }) {
			t.Fatal("the egress policy is not in force: a1 still reaches b1")
		}
		capt.Reset()
		var sent [][]byte
		for i := range 3 {
			p := mtlsToken(t, fmt.Sprintf("egress-%d", i))
			sent = append(sent, p)
			err := exchange(e.a1, e.b3.IPv4, mtlsPort, p, 10*time.Second)
			if err == nil {
				t.Fatal("a1 reaches b3 (not enrolled) although its egress rule needs mTLS")
			}
			if isTimeout(err) {
				t.Fatalf("a1 -> b3 hung instead of being refused: %v", err)
			}
			t.Logf("a1 -> b3: %v", err)
		}
		time.Sleep(time.Second)
		capt.Stop()
		noPlaintext(t, "transit link", capt, mtlsPort, []netip.Addr{e.b3.IPv4}, sent...)
	})
}

// TestMTLSRevocationClosesPooled: a1 and a2 each hold an open connection
// to b1 through the tunnel. a1's SVID is withdrawn (SPIRE: its entry is
// deleted; built-in CA: its service account changes, so the SVID of its
// old ID is withdrawn and one for a new ID issued): a1's connection
// breaks, a2's keeps working.
func TestMTLSRevocationClosesPooled(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		oldID := e.a1.SPIFFEID().String()
		open := func(p *twonode.Pod) net.Conn {
			c, err := p.Dial("tcp", e.b1.IPv4, mtlsPort, 10*time.Second)
			if err != nil {
				t.Fatalf("%s -> b1: %v", p.Name, err)
			}
			t.Cleanup(func() { c.Close() })
			if err := echoOn(c, mtlsToken(t, p.Name), 10*time.Second); err != nil {
				t.Fatalf("%s -> b1: %v", p.Name, err)
			}
			return c
		}
		c1, c2 := open(e.a1), open(e.a2)
		waitFlow(t, e.b, "of a1's tunnelled connection", func(f flowRec) bool {
			return f.MTLS && f.Destination.PodName == "b1" && f.Source.SPIFFEID == oldID
		})

		switch source {
		case "spire":
			e.topo.SPIRE.DeleteEntry(t, e.a1.SPIREEntry)
		case "builtin":
			e.a1.SetServiceAccount("a1-renamed")
			e.topo.SyncPeers()
		}
		if !twonode.Eventually(mtlsWait, func() bool {
			l, err := e.a.Client.ListIdentities(context.Background())
			if err != nil {
				return false
			}
			for _, s := range l.SVIDs {
				if s.Pod == "client/a1" && s.SPIFFEID == oldID {
					return false
				}
			}
			return true
		}) {
			t.Fatalf("node A still holds a1's SVID for %s after %v", oldID, mtlsWait)
		}
		var last error
		if !twonode.Eventually(30*time.Second, func() bool {
			last = echoOn(c1, mtlsToken(t, "a1-after"), 2*time.Second)
			return last != nil && !isTimeout(last)
		}) {
			t.Fatalf("a1's open connection, authenticated with its withdrawn SVID, still works (last: %v)", last)
		}
		t.Logf("a1's connection after the revocation: %v", last)
		if err := echoOn(c2, mtlsToken(t, "a2-after"), 10*time.Second); err != nil {
			t.Fatalf("a2's connection broke with a1's revocation: %v", err)
		}
		if source == "builtin" {
			// a1 has an SVID for its new ID: a new connection carries it.
			e.waitSVIDs(t, e.a, e.a1)
			newID := e.a1.SPIFFEID().String()
			if !twonode.Eventually(mtlsWait, func() bool { return exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1-new"), 5*time.Second) == nil }) {
				t.Fatal("a1 cannot reach b1 with its new SVID")
			}
			waitFlow(t, e.b, "of a1 with its new ID", func(f flowRec) bool {
				return f.MTLS && f.Destination.PodName == "b1" && f.Source.SPIFFEID == newID
			})
		} else {
			// a1 has no SVID: its new connections cannot be tunnelled.
			if err := exchange(e.a1, e.b1.IPv4, mtlsPort, mtlsToken(t, "a1-none"), 10*time.Second); err == nil {
				t.Fatal("a1 reaches b1 with no SVID")
			}
		}
	})
}

// TestMTLSDestinationAgentKilled: with node B's agent (its tunnel
// endpoint) killed, a1's connection to b1 fails at once (refused or
// reset: not a hang) and nothing crosses in plaintext; once the agent is
// back, a1 reaches b1 again.
func TestMTLSDestinationAgentKilled(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		capt := netns.StartCapture(t, e.a.NS, twonode.TransitLink)
		e.b.KillAgent()
		var sent [][]byte
		for i := range 3 {
			p := mtlsToken(t, fmt.Sprintf("dst-down-%d", i))
			sent = append(sent, p)
			err := exchange(e.a1, e.b1.IPv4, mtlsPort, p, 10*time.Second)
			if err == nil {
				t.Fatal("a1 reaches b1 with node B's tunnel endpoint down")
			}
			if isTimeout(err) {
				t.Fatalf("a1 -> b1 hung with node B's tunnel endpoint down, instead of failing at once: %v", err)
			}
			t.Logf("a1 -> b1, node B's agent down: %v", err)
		}
		e.b.StartAgent()
		back := mtlsToken(t, "dst-back")
		if !twonode.Eventually(mtlsWait, func() bool { return exchange(e.a1, e.b1.IPv4, mtlsPort, back, 5*time.Second) == nil }) {
			t.Fatal("a1 cannot reach b1 after node B's agent restarted")
		}
		capt.Stop()
		noPlaintext(t, "transit link", capt, mtlsPort, []netip.Addr{e.b1.IPv4}, append(sent, back)...)
		if !capt.LooksLikeTLS(twonode.TunnelPort) {
			t.Errorf("no TLS on the transit link after recovery; TCP ports %v", capt.TCPPorts())
		}
	})
}

// TestMTLSSourceAgentKill9: node A's agent is killed (SIGKILL) while a1
// holds a tunnelled connection to b1 and keeps trying new ones. While the
// agent is down and while it comes back, nothing of a1's traffic crosses
// in plaintext (the kernel keeps dropping); after the restart, new
// connections work again.
func TestMTLSSourceAgentKill9(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		capt := netns.StartCapture(t, e.a.NS, twonode.TransitLink)
		c, err := e.a1.Dial("tcp", e.b1.IPv4, mtlsPort, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := echoOn(c, mtlsToken(t, "before"), 10*time.Second); err != nil {
			t.Fatalf("a1 -> b1 before the kill: %v", err)
		}

		// A prober sends a fresh payload on a new connection, again and
		// again, until told to stop.
		var mu sync.Mutex
		var probes [][]byte
		okAfter := 0
		restarted := make(chan struct{})
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				p := mtlsToken(t, fmt.Sprintf("probe-%d", i))
				err := exchange(e.a1, e.b1.IPv4, mtlsPort, p, time.Second)
				mu.Lock()
				probes = append(probes, p)
				select {
				case <-restarted:
					if err == nil {
						okAfter++
					}
				default:
				}
				mu.Unlock()
				time.Sleep(100 * time.Millisecond)
			}
		}()

		e.a.KillAgent()
		held := mtlsToken(t, "held-conn")
		werr := echoOn(c, held, 5*time.Second)
		t.Logf("a1's open connection after the kill: %v", werr)
		if werr == nil {
			t.Error("a1's tunnelled connection still echoes with its node's agent killed: who carries it?")
		}
		time.Sleep(3 * time.Second) // probes while the agent is down
		e.a.StartAgent()
		close(restarted)
		if !twonode.Eventually(mtlsWait, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return okAfter >= 3
		}) {
			t.Fatal("a1's new connections to b1 do not work after its node's agent restarted")
		}
		close(stop)
		<-done
		capt.Stop()
		mu.Lock()
		defer mu.Unlock()
		noPlaintext(t, "transit link", capt, mtlsPort, []netip.Addr{e.b1.IPv4}, append(probes, held)...)
		if !capt.LooksLikeTLS(twonode.TunnelPort) {
			t.Errorf("no TLS on the transit link; TCP ports %v", capt.TCPPorts())
		}
		t.Logf("%d probes, %d worked after the restart", len(probes), okAfter)
	})
}

// guardPolicies: b1 (enrolled) and b3 (not enrolled) both admit any pod on
// port 9000, through the tunnel only.
const guardPolicies = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: b1-guard, namespace: web}
spec:
  selector: {podSelector: {matchLabels: {app: b1}}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 9000, protocol: TCP}]
    mtls: Required
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: b3-guard, namespace: plain}
spec:
  selector: {podSelector: {matchLabels: {app: b3}}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 9000, protocol: TCP}]
    mtls: Required
`

// sink records every byte that reaches it on port inside a pod.
type sink struct {
	mu   sync.Mutex
	data []byte
}

func (s *sink) has(p []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Contains(s.data, p)
}

func startSink(t *testing.T, p *twonode.Pod, port int) *sink {
	t.Helper()
	s := &sink{}
	for _, fam := range []string{"tcp4", "tcp6"} {
		var ln net.Listener
		err := p.NS.Do(func(ns.NetNS) error {
			var err error
			ln, err = net.Listen(fam, fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatalf("sink in %s: %v", p.Name, err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					buf := make([]byte, 4096)
					for {
						k, err := c.Read(buf)
						s.mu.Lock()
						s.data = append(s.data, buf[:k]...)
						s.mu.Unlock()
						if err != nil {
							return
						}
					}
				}()
			}
		}()
	}
	return s
}

// sendTo connects from p to to:port and writes payload (errors ignored:
// the sink decides what arrived).
func sendTo(p *twonode.Pod, to netip.Addr, port int, payload []byte) {
	c, err := p.Dial("tcp", to, port, 2*time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	_, _ = c.Write(payload)
	// Give the bytes time to arrive before the close.
	_, _ = c.Read(make([]byte, 1))
}

// TestMTLSRequiredNeverIgnored is the guard against mtls: Required being
// accepted and then ignored: every plaintext path into a pod whose only
// rule needs mTLS (enrolled b1 and not enrolled b3; from the other node
// and from the same node; from a pod that is not enrolled, from an
// enrolled pod to a pod that is not, and spoofed from node A) must deliver
// nothing: the test fails if one payload reaches a server. The enrolled
// a1's payload to b1 must arrive (through the tunnel): the servers do
// receive what is allowed.
func TestMTLSRequiredNeverIgnored(t *testing.T) {
	forEachSource(t, func(t *testing.T, source string) {
		e := newMTLSEnv(t, source)
		const port = 9000
		sinks := map[*twonode.Pod]*sink{e.b1: startSink(t, e.b1, port), e.b3: startSink(t, e.b3, port)}
		// Before the policies, plaintext arrives: the sinks work.
		pre := mtlsToken(t, "pre")
		sendTo(e.a3, e.b1.IPv4, port, pre)
		if !twonode.Eventually(5*time.Second, func() bool { return sinks[e.b1].has(pre) }) {
			t.Fatal("control: b1's server did not receive a3's plaintext with no policy")
		}
		e.b.WriteStore("policy.yaml", guardPolicies)
		if !twonode.Eventually(10*time.Second, func() bool {
			p := mtlsToken(t, "wait")
			sendTo(e.a3, e.b1.IPv4, port, p)
			time.Sleep(200 * time.Millisecond)
			return !sinks[e.b1].has(p)
		}) {
			t.Fatal("the guard policies are not in force: a3's plaintext still reaches b1")
		}

		type path struct {
			name string
			send func(p []byte)
			to   *twonode.Pod
		}
		paths := []path{
			{"a3 -> b1 (not enrolled, other node)", func(p []byte) { sendTo(e.a3, e.b1.IPv4, port, p) }, e.b1},
			{"a3 -> b1 over IPv6", func(p []byte) { sendTo(e.a3, e.b1.IPv6, port, p) }, e.b1},
			{"b3 -> b1 (not enrolled, same node)", func(p []byte) { sendTo(e.b3, e.b1.IPv4, port, p) }, e.b1},
			{"a3 -> b3 (neither enrolled)", func(p []byte) { sendTo(e.a3, e.b3.IPv4, port, p) }, e.b3},
			{"a1 -> b3 (enrolled to not enrolled)", func(p []byte) { sendTo(e.a1, e.b3.IPv4, port, p) }, e.b3},
			{"b2 -> b3 (enrolled, same node)", func(p []byte) { sendTo(e.b2, e.b3.IPv4, port, p) }, e.b3},
			{"node A as a1 -> b1 (spoofed)", func(p []byte) {
				_ = dialSpoofed(e.a.NS, netip.AddrPortFrom(e.a1.IPv4, nextSpoofPort()), e.b1.IPv4, p)
			}, e.b1},
		}
		sent := map[string][]byte{}
		for _, pt := range paths {
			p := mtlsToken(t, "guard")
			sent[pt.name] = p
			pt.send(p)
		}
		allowed := mtlsToken(t, "allowed")
		if !twonode.Eventually(mtlsWait, func() bool {
			sendTo(e.a1, e.b1.IPv4, port, allowed)
			return sinks[e.b1].has(allowed)
		}) {
			t.Fatal("a1's payload to b1 (both enrolled, through the tunnel) never arrived: the guard proves nothing")
		}
		time.Sleep(time.Second)
		for _, pt := range paths {
			if sinks[pt.to].has(sent[pt.name]) {
				t.Errorf("mtls: Required was ignored: plaintext %s reached %s", pt.name, pt.to.Name)
			}
		}
		// Plaintext blocked by an mTLS rule is AUTH_REQUIRED, not a plain
		// denial.
		waitFlow(t, e.b, "of a plaintext drop at b3 with AUTH_REQUIRED", func(f flowRec) bool {
			return f.Verdict == "DROPPED" && f.DropReasonDesc == "AUTH_REQUIRED" && f.Destination.PodName == "b3"
		})
		if os.Getenv("BULKHEAD_E2E_LOGS") == "1" {
			t.Logf("node B flows:\n%s", strings.Join(e.b.FlowLines(), "\n"))
		}
	})
}
