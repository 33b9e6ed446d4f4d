//lint:file-ignore SA1019 x/net/http2's per-connection API (ClientConn over a TLS connection we dial, verify and batch ourselves; ServeConn with a per-connection context) has no net/http equivalent that takes an existing connection: net/http's Transport.NewClientConn dials on its own.

package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func srcA(port uint16) netip.AddrPort { return netip.AddrPortFrom(podA, port) }

// echoOnce sends payload, half-closes, and reads the echo to the end.
func echoOnce(t testing.TB, c net.Conn, payload []byte) []byte {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	return got
}

func TestEndToEndEcho(t *testing.T) {
	w := newWorld(t)
	w.b.dir.admit = func(dst Pod, id spiffeid.ID, src, _ netip.Addr, port uint16) (identity.NumericID, policy.Decision) {
		return idA, policy.Decision{Verdict: policy.VerdictAllow, Rule: 7}
	}
	w.start(t)

	payload := make([]byte, 3<<20+17)
	_, _ = rand.Read(payload)
	pod, done := podConn(t, w.a.tun, srcA(40000), w.echo)
	got := echoOnce(t, pod, payload)
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo: got %d bytes, want the %d sent", len(got), len(payload))
	}
	<-done

	calls := w.b.dir.calls()
	if len(calls) != 1 {
		t.Fatalf("admit calls: %+v, want one", calls)
	}
	want := admitCall{dst: keyB, id: w.svidA.ID, src: podA, from: nodeA, port: w.echo.Port()}
	if calls[0] != want {
		t.Errorf("admit: got %+v, want %+v", calls[0], want)
	}
	// The socket to the pod was marked with the admitted identity and
	// forgotten when the stream ended.
	waitFor(t, "forget", func() bool {
		w.b.dp.mu.Lock()
		defer w.b.dp.mu.Unlock()
		return len(w.b.dp.forgotten) == 1
	})
	w.b.dp.mu.Lock()
	if len(w.b.dp.marked) != 1 || w.b.dp.forgotten[0] != w.b.dp.marked[0] || len(w.b.dp.marks) != 0 {
		t.Errorf("datapath: marked %v forgotten %v left %v", w.b.dp.marked, w.b.dp.forgotten, w.b.dp.marks)
	}
	w.b.dp.mu.Unlock()

	waitFor(t, "closed events", func() bool {
		return len(w.a.ev.find(EventClosed)) == 1 && len(w.b.ev.find(EventClosed)) == 1
	})
	ca, cb := w.a.ev.find(EventClosed)[0], w.b.ev.find(EventClosed)[0]
	if ca.SrcID != w.svidA.ID || ca.DstID != w.svidB.ID || ca.Sent != uint64(len(payload)) || ca.Received != uint64(len(payload)) {
		t.Errorf("source closed event: %+v", ca)
	}
	if cb.SrcID != w.svidA.ID || cb.DstID != w.svidB.ID || cb.Identity != idA || cb.Decision.Rule != 7 ||
		cb.Sent != uint64(len(payload)) || cb.Received != uint64(len(payload)) {
		t.Errorf("destination closed event: %+v", cb)
	}
	if st := w.a.tun.Stats(); st.PoolDials != 1 || st.Refused != 0 {
		t.Errorf("source stats: %+v", st)
	}
}

func TestEndToEndIPv6(t *testing.T) {
	// Pod B on ::1, node B's tunnel on ::1 too: a same-node pair, dialed
	// through the node's own listener.
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln.Close()
	w := newWorld(t)
	v6 := netip.IPv6Loopback()
	echo := serveEcho(t, v6)
	pb := w.podB
	pb.IPs, pb.Endpoint = []netip.Addr{v6}, 2
	w.b.dir.set(pb)
	srcPod := w.podA
	srcPod.Endpoint = 1
	w.b.dir.set(srcPod)
	w.b.ids.set(keyA, w.svidA)
	w.b.addr = v6
	w.b.run(t, freePort(t))

	pod, done := podConn(t, w.b.tun, srcA(40001), echo)
	if got := echoOnce(t, pod, []byte("hello over v6")); string(got) != "hello over v6" {
		t.Fatalf("echo: %q", got)
	}
	<-done
	if c := w.b.dir.calls(); len(c) != 1 || c[0].id != w.svidA.ID {
		t.Errorf("admit calls: %+v", c)
	}
}

func TestPoolReuse(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	for i := range 3 {
		pod, done := podConn(t, w.a.tun, srcA(uint16(40010+i)), w.echo)
		if got := echoOnce(t, pod, []byte("ping")); string(got) != "ping" {
			t.Fatalf("echo %d: %q", i, got)
		}
		<-done
	}
	if st := w.a.tun.Stats(); st.PoolDials != 1 || st.PoolReuses != 2 || st.PoolConns != 1 {
		t.Errorf("source stats: dials %d reuses %d conns %d, want 1, 2, 1", st.PoolDials, st.PoolReuses, st.PoolConns)
	}
	if st := w.b.tun.Stats(); st.InboundAccepted != 1 {
		t.Errorf("destination handshakes: %d, want 1", st.InboundAccepted)
	}
	opened := w.a.ev.find(EventOpened)
	if len(opened) != 3 || opened[0].Reused || !opened[1].Reused || !opened[2].Reused {
		t.Errorf("opened events: %+v", opened)
	}
}

func TestConcurrentForwards(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			payload := make([]byte, 64<<10+i)
			_, _ = rand.Read(payload)
			pod, done := podConn(t, w.a.tun, srcA(uint16(41000+i)), w.echo)
			got := echoOnce(t, pod, payload)
			<-done
			if !bytes.Equal(got, payload) {
				errs <- errors.New("echo mismatch")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := w.a.tun.Stats(); st.PoolDials != 1 || st.PoolReuses != n-1 {
		t.Errorf("a burst to one peer should share one handshake: dials %d reuses %d", st.PoolDials, st.PoolReuses)
	}
	waitFor(t, "streams to end", func() bool {
		return w.a.tun.Stats().ActiveOutbound == 0 && w.b.tun.Stats().ActiveInbound == 0
	})
}

func TestRefusedAtSource(t *testing.T) {
	w := newWorld(t)
	plain := w.podB
	plain.Key, plain.IPs, plain.Enrolled = "shop/plain", []netip.Addr{netip.MustParseAddr("127.0.1.3")}, false
	w.a.dir.set(plain)
	noSVID := w.podA
	noSVID.Key, noSVID.IPs, noSVID.Endpoint = "shop/nosvid", []netip.Addr{netip.MustParseAddr("127.0.1.4")}, 3
	w.a.dir.set(noSVID)
	w.start(t)

	cases := []struct {
		name     string
		src, dst netip.AddrPort
		reason   string
		cause    Cause
	}{
		{"destination not enrolled", srcA(1), netip.AddrPortFrom(plain.IPs[0], 80), "destination pod is not enrolled", CauseNotTunnelable},
		{"destination unknown", srcA(2), netip.MustParseAddrPort("127.0.9.9:80"), "destination is not a known pod", CauseNotTunnelable},
		{"source without svid", netip.AddrPortFrom(noSVID.IPs[0], 3), w.echo, "source pod has no svid", CauseTunnelDown},
		{"source not local", netip.AddrPortFrom(podB, 4), w.echo, "source is not a local pod", CauseNotTunnelable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(w.a.ev.find(EventRefused))
			pod, done := podConn(t, w.a.tun, tc.src, tc.dst)
			if err := readErr(t, pod); !isReset(err) {
				t.Errorf("pod conn ended with %v, want a reset", err)
			}
			<-done
			ev := w.a.ev.find(EventRefused)
			if len(ev) != before+1 || ev[before].Reason != tc.reason || ev[before].Cause != tc.cause {
				t.Errorf("refused events: %+v, want reason %q cause %s", ev[before:], tc.reason, tc.cause)
			}
		})
	}
	if st := w.a.tun.Stats(); st.PoolDials != 0 {
		t.Errorf("refused connections dialed the peer: %+v", st)
	}
}

func TestAdmitDenyResetsSource(t *testing.T) {
	w := newWorld(t)
	w.b.dir.admit = func(Pod, spiffeid.ID, netip.Addr, netip.Addr, uint16) (identity.NumericID, policy.Decision) {
		return idA, policy.Decision{Verdict: policy.VerdictDeny, Rule: 3}
	}
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(40100), w.echo)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
	ev := w.a.ev.find(EventRefused)
	if len(ev) != 1 || ev[0].Status != http.StatusForbidden || ev[0].Cause != CausePolicy {
		t.Errorf("source refused events: %+v", ev)
	}
	if d := w.b.ev.find(EventRefused); len(d) != 1 || d[0].SrcID != w.svidA.ID || d[0].Decision.Rule != 3 || d[0].Cause != CausePolicy {
		t.Errorf("destination refused events: %+v", d)
	}
	w.b.dp.mu.Lock()
	defer w.b.dp.mu.Unlock()
	if len(w.b.dp.marked) != 0 {
		t.Errorf("a denied connection marked sockets: %v", w.b.dp.marked)
	}
}

func TestDestinationPodRefusesResetsSource(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	// Nothing listens on this port of pod B: the tunnel's dial is
	// refused, and the pod must see a reset.
	closed := netip.AddrPortFrom(podB, freePort(t))
	pod, done := podConn(t, w.a.tun, srcA(40200), closed)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
	if ev := w.a.ev.find(EventRefused); len(ev) != 1 || ev[0].Status != http.StatusBadGateway || ev[0].Cause != CauseTunnelDown {
		t.Errorf("source refused events: %+v", ev)
	}
	if ev := w.b.ev.find(EventRefused); len(ev) != 1 || ev[0].Reason != "connect to destination pod" || ev[0].Cause != CauseTunnelDown {
		t.Errorf("destination refused events: %+v", ev)
	}
	// The mark made before connect is forgotten.
	waitFor(t, "forget", func() bool {
		w.b.dp.mu.Lock()
		defer w.b.dp.mu.Unlock()
		return len(w.b.dp.marked) == 1 && len(w.b.dp.forgotten) == 1 && len(w.b.dp.marks) == 0
	})
}

func TestDestinationNodeDownResetsAtOnce(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	// Pod B moves to a node whose tunnel endpoint is down.
	moved := w.podB
	moved.Node = netip.MustParseAddr("127.0.0.3")
	w.a.dir.set(moved)
	pod, done := podConn(t, w.a.tun, srcA(40300), w.echo)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
	ev := w.a.ev.find(EventRefused)
	if len(ev) != 1 || !errors.Is(ev[0].Err, syscall.ECONNREFUSED) || ev[0].Cause != CauseTunnelDown {
		t.Errorf("refused events: %+v, want a refused dial", ev)
	}
	if st := w.a.tun.Stats(); st.DialFailures != 1 || st.PoolConns != 0 {
		t.Errorf("stats: %+v", st)
	}
	// Recovery: the node's endpoint comes back, and the next connection
	// works.
	w.a.dir.set(w.podB)
	pod, done = podConn(t, w.a.tun, srcA(40301), w.echo)
	if got := echoOnce(t, pod, []byte("back")); string(got) != "back" {
		t.Fatalf("echo after recovery: %q", got)
	}
	<-done
}

func TestWrongServerIDRejected(t *testing.T) {
	w := newWorld(t)
	// Node A believes pod B is someone else: the server's certificate
	// (pod B's real SVID) must fail AuthorizeID.
	imposter := w.podB
	imposter.SPIFFEID = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/db")
	w.a.dir.set(imposter)
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(40400), w.echo)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
	if ev := w.a.ev.find(EventHandshakeFailed); len(ev) != 1 {
		t.Errorf("handshake failed events: %+v", ev)
	}
	if c := w.b.dir.calls(); len(c) != 0 {
		t.Errorf("admit called: %+v", c)
	}
}

// rawClient connects to node's tunnel as svid, naming pod sni, trusting
// bundles, and returns the HTTP/2 client.
func rawClient(t testing.TB, at netip.AddrPort, svid *x509svid.SVID, sni netip.Addr, bundles x509bundle.Source) (*http2.ClientConn, *tls.Conn, error) {
	t.Helper()
	raw, err := net.Dial("tcp", at.String())
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: serverName(sni), NextProtos: []string{"h2"}}
	tlsconfig.HookMTLSClientConfig(cfg, svid, bundles, tlsconfig.AuthorizeAny())
	tc := tls.Client(raw, cfg)
	t.Cleanup(func() { tc.Close() })
	if err := tc.Handshake(); err != nil {
		return nil, tc, err
	}
	// TLS 1.3: a client certificate the server rejects shows on the
	// first read, not in Handshake.
	var tr http2.Transport
	cc, err := tr.NewClientConn(tc)
	return cc, tc, err
}

func connect(cc *http2.ClientConn, target netip.AddrPort, body io.ReadCloser) (*http.Response, error) {
	u := &url.URL{Host: authority(target)}
	req := &http.Request{Method: http.MethodConnect, URL: u, Host: u.Host, Body: body, ContentLength: -1,
		Header: http.Header{SourceHeader: []string{podA.String()}}}
	return cc.RoundTrip(req)
}

func TestConnectToAnotherPodThanTheServerIDRefused(t *testing.T) {
	w := newWorld(t)
	// Pod C is local on node B, with its own identity.
	podC := Pod{Key: "shop/c", IPs: []netip.Addr{netip.MustParseAddr("127.0.1.5")}, Identity: 1005,
		SPIFFEID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/c"), Enrolled: true, Endpoint: 5, Node: nodeB}
	w.b.dir.set(podC)
	w.b.ids.set("shop/c", mint(t, w.ca, "/ns/shop/sa/c", time.Hour))
	w.start(t)
	cc, _, err := rawClient(t, addrPortOf(w.b.tun.ListenAddr()), w.svidA, podB, w.b.ids.bundles)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	defer pw.Close()
	resp, err := connect(cc, netip.AddrPortFrom(podC.IPs[0], 80), pr)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("CONNECT to pod C over pod B's connection: %s, want 421", resp.Status)
	}
	if c := w.b.dir.calls(); len(c) != 0 {
		t.Errorf("admit called: %+v", c)
	}
	// And the right target on the same connection works.
	pr2, pw2 := io.Pipe()
	resp, err = connect(cc, w.echo, pr2)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT to pod B: %s", resp.Status)
	}
	go func() { _, _ = pw2.Write([]byte("x")); pw2.Close() }()
	if got, _ := io.ReadAll(resp.Body); string(got) != "x" {
		t.Errorf("echo: %q", got)
	}
}

func TestForeignTrustDomainClientRejected(t *testing.T) {
	w := newWorld(t)
	other := newCA(t, "other.test")
	w.start(t)
	foreign := mint(t, other, "/ns/shop/sa/a", time.Hour)
	// The client trusts B's CA, so only the server's check can fail.
	cc, tc, err := rawClient(t, addrPortOf(w.b.tun.ListenAddr()), foreign, podB, w.b.ids.bundles)
	if err == nil {
		_, err = connect(cc, w.echo, http.NoBody)
	}
	if err == nil {
		t.Fatal("a client of another trust domain got through")
	}
	_ = tc
	waitFor(t, "handshake failure", func() bool { return w.b.tun.Stats().HandshakeFailures == 1 })
	if c := w.b.dir.calls(); len(c) != 0 {
		t.Errorf("admit called: %+v", c)
	}
	if ev := w.b.ev.find(EventHandshakeFailed); len(ev) != 1 {
		t.Errorf("events: %+v", ev)
	}

	// Same through Forward: node A holds pod A's SVID from the foreign CA.
	w.a.ids.set(keyA, foreign)
	w.a.ids.bundles = x509bundle.NewSet(w.ca.Bundle(), other.Bundle())
	pod, done := podConn(t, w.a.tun, srcA(40500), w.echo)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
}

func TestRevokeClosesPooledConns(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(40600), w.echo)
	_ = pod.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := pod.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(pod, buf); err != nil {
		t.Fatal(err)
	}
	// Revoke with the SVID unchanged: nothing to close.
	w.a.tun.Revoke(keyA)
	if st := w.a.tun.Stats(); st.PoolConns != 1 {
		t.Fatalf("pool after a no-op revoke: %d conns", st.PoolConns)
	}
	// The SVID is replaced: the pooled connection that used the old one
	// closes, and the open pod connection with it.
	w.a.ids.set(keyA, mint(t, w.ca, "/ns/shop/sa/a", time.Hour))
	w.a.tun.Revoke(keyA)
	if err := readErr(t, pod); err == nil {
		t.Error("pod conn still open")
	}
	<-done
	waitFor(t, "pool to empty", func() bool { return w.a.tun.Stats().PoolConns == 0 })
	waitFor(t, "inbound to close", func() bool { return w.b.tun.Stats().InboundConns == 0 })
	// A new connection opens a new TLS connection with the new SVID.
	pod, done = podConn(t, w.a.tun, srcA(40601), w.echo)
	if got := echoOnce(t, pod, []byte("again")); string(got) != "again" {
		t.Fatalf("echo: %q", got)
	}
	<-done
	if st := w.a.tun.Stats(); st.PoolDials != 2 {
		t.Errorf("dials: %d, want 2", st.PoolDials)
	}
}

func TestRevokeClosesInboundServedWithSVID(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(40700), w.echo)
	_ = pod.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := pod.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(pod, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	// Pod B's SVID is withdrawn on node B.
	w.b.ids.set(keyB, nil)
	w.b.tun.Revoke(keyB)
	if err := readErr(t, pod); err == nil {
		t.Error("pod conn still open")
	}
	<-done
	waitFor(t, "inbound to close", func() bool { return w.b.tun.Stats().InboundConns == 0 })
}

func TestClientCertExpiryClosesInbound(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	short := mint(t, w.ca, "/ns/shop/sa/a", 2*time.Second)
	cc, tc, err := rawClient(t, addrPortOf(w.b.tun.ListenAddr()), short, podB, w.b.ids.bundles)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	defer pw.Close()
	resp, err := connect(cc, w.echo, pr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %s", resp.Status)
	}
	// The server ends the connection when the client's certificate
	// expires; the stream breaks.
	_, err = io.ReadAll(resp.Body)
	if err == nil {
		t.Error("stream ended cleanly; want it broken by the closed connection")
	}
	if time.Now().Before(short.Certificates[0].NotAfter) {
		t.Errorf("closed before the certificate expired (%s)", short.Certificates[0].NotAfter)
	}
	_ = tc
	waitFor(t, "inbound to close", func() bool { return w.b.tun.Stats().InboundConns == 0 })
}

func TestSourceSVIDExpiryClosesPooled(t *testing.T) {
	w := newWorld(t)
	w.a.ids.set(keyA, mint(t, w.ca, "/ns/shop/sa/a", 2*time.Second))
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(40800), w.echo)
	_ = pod.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := pod.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(pod, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	if err := readErr(t, pod); err == nil || errors.Is(err, io.EOF) {
		t.Errorf("pod conn ended with %v, want a broken connection", err)
	}
	<-done
	waitFor(t, "pool to empty", func() bool { return w.a.tun.Stats().PoolConns == 0 })
}

func TestServerNameRoundTrip(t *testing.T) {
	for _, s := range []string{"10.1.2.3", "fd00::1:2", "::ffff:10.0.0.1"} {
		ip := netip.MustParseAddr(s)
		name := serverName(ip)
		if len(name) != 32+len(sniSuffix) {
			t.Errorf("%s: %q", s, name)
		}
		back, err := parseServerName(name)
		if err != nil || back != ip.Unmap() {
			t.Errorf("%s: %q -> %v, %v", s, name, back, err)
		}
	}
	if serverName(netip.MustParseAddr("10.0.0.1")) != "00000000000000000000ffff0a000001.pod.bulkhead.invalid" {
		t.Errorf("v4 name: %s", serverName(netip.MustParseAddr("10.0.0.1")))
	}
	for _, bad := range []string{"", "example.com", "zz000000000000000000ffff0a000001" + sniSuffix, "0a000001" + sniSuffix} {
		if _, err := parseServerName(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestUnknownServerNameRefused(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	_, _, err := rawClient(t, addrPortOf(w.b.tun.ListenAddr()), w.svidA, netip.MustParseAddr("127.0.9.9"), w.b.ids.bundles)
	if err == nil {
		t.Fatal("handshake for a pod that is not on the node succeeded")
	}
}

func TestKernelTLSProbeReported(t *testing.T) {
	w := newWorld(t)
	tun, err := New(Config{Directory: w.a.dir, Identities: w.a.ids, Datapath: w.a.dp,
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	if err != nil {
		t.Fatal(err)
	}
	st := tun.Stats()
	if st.KernelTLSReason == "" {
		t.Error("no kernel TLS reason")
	}
	t.Logf("kernel tls: %v (%s)", st.KernelTLS, st.KernelTLSReason)
}

func TestNewRefusesIncompleteConfig(t *testing.T) {
	w := newWorld(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	for _, cfg := range []Config{
		{Identities: w.a.ids, Datapath: w.a.dp, TrustDomain: td},
		{Directory: w.a.dir, Identities: w.a.ids, Datapath: w.a.dp},
		{Directory: w.a.dir, Identities: w.a.ids, Datapath: w.a.dp, TrustDomain: td, ListenAddr: "nope"},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

func TestRunRegistersTransparentListener(t *testing.T) {
	privileged.Require(t) // IP_TRANSPARENT needs CAP_NET_ADMIN
	w := newWorld(t)
	tun, err := New(Config{Logger: quiet(), Directory: w.a.dir, Identities: w.a.ids, Datapath: w.a.dp,
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"),
		ListenAddr:  "127.0.0.1:0", RedirectAddr: "127.0.0.1:0", OnEvent: w.a.ev.add})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tun.Run(ctx) }()
	<-tun.Ready()
	w.a.dp.mu.Lock()
	reg := w.a.dp.listener
	w.a.dp.mu.Unlock()
	if !reg {
		t.Error("transparent listener not registered")
	}
	// A connection accepted there is forwarded: this one's original
	// destination (the listener itself) is no pod, so it is refused.
	// The reset may come so fast that the dial already reports it.
	c, err := net.Dial("tcp", tun.RedirectListenAddr().String())
	if err == nil {
		defer c.Close()
		err = readErr(t, c)
	}
	if !isReset(err) {
		t.Errorf("conn ended with %v, want a reset", err)
	}
	waitFor(t, "refused event", func() bool { return len(w.a.ev.find(EventRefused)) == 1 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	w.a.dp.mu.Lock()
	defer w.a.dp.mu.Unlock()
	if w.a.dp.listener {
		t.Error("transparent listener still registered after Run")
	}
}

// serveGreeter speaks first ("hi"), then echoes: a pod that waits for the
// greeting has sent nothing before its tunnel stream was accepted.
func serveGreeter(t testing.TB, ip netip.Addr) netip.AddrPort {
	t.Helper()
	return serveTCP(t, ip, func(c net.Conn) {
		if _, err := c.Write([]byte("hi")); err != nil {
			return
		}
		_, _ = io.Copy(c, struct{ io.Reader }{c})
		_ = c.(*net.TCPConn).CloseWrite()
	})
}

// A pooled connection that the peer closed is not the pod's problem as
// long as the pod has sent nothing yet: either the pool sees it closed,
// or the request fails before the pod's bytes were read and goes to a
// fresh connection.
func TestPooledConnClosedByPeerIsRetried(t *testing.T) {
	w := newWorld(t)
	greeter := serveGreeter(t, podB)
	w.start(t)
	t.Cleanup(func() {
		if t.Failed() {
			for _, e := range w.a.ev.find(EventRefused) {
				t.Logf("refused: %s %v (status %d)", e.Reason, e.Err, e.Status)
			}
		}
	})
	for i := range 30 {
		pod, done := podConn(t, w.a.tun, srcA(uint16(42000+i)), greeter)
		_ = pod.SetDeadline(time.Now().Add(30 * time.Second))
		hi := make([]byte, 2)
		if _, err := io.ReadFull(pod, hi); err != nil {
			t.Fatalf("conn %d: greeting: %v", i, err)
		}
		got := echoOnce(t, pod, []byte("ping"))
		<-done
		if string(got) != "ping" {
			t.Fatalf("echo %d: %q", i, got)
		}
		w.b.tun.inbound.closeAll()
	}
	if st := w.a.tun.Stats(); st.Refused != 0 {
		t.Errorf("refused %d connections", st.Refused)
	}
}
