package tunnel

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// A connection to the HBONE listener from an address that is not a node's
// (a pod's) is closed before the handshake: no Admit, no handshake.
func TestHBONERefusesConnectionsNotFromANode(t *testing.T) {
	w := newWorld(t)
	w.b.dir.setNode(nodeA, false)
	w.start(t)

	// A pod dialing the listener itself: closed before any TLS byte.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: podA.AsSlice()}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", w.b.tun.ListenAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || (err != io.EOF && !isReset(err)) {
		t.Errorf("raw connection from a pod: read %d, %v; want it closed", n, err)
	}

	// Node A, no longer a node to B: its tunnel cannot reach B.
	pod, done := podConn(t, w.a.tun, srcA(41000), w.echo)
	_ = pod.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := pod.Read(make([]byte, 1)); !isReset(err) {
		t.Errorf("pod conn: read %d, %v; want a reset", n, err)
	}
	pod.Close()
	<-done
	if ev := w.a.ev.find(EventRefused); len(ev) != 1 || ev[0].Cause != CauseTunnelDown {
		t.Errorf("source refused events: %+v", ev)
	}
	st := w.b.tun.Stats()
	if st.NotFromNode != 2 || st.HandshakeFailures != 0 || st.InboundAccepted != 0 {
		t.Errorf("destination stats: %+v, want 2 closed before the handshake", st)
	}
	if calls := w.b.dir.calls(); len(calls) != 0 {
		t.Errorf("admit called: %+v", calls)
	}
}

// Handshakes beyond the bound are closed at once; the slot frees when a
// handshake ends.
func TestPendingHandshakesBounded(t *testing.T) {
	w := newWorld(t)
	w.b.tweak = func(c *Config) { c.MaxPendingHandshakes = 1 }
	w.start(t)

	// A client that connects and never sends its hello holds the slot.
	first, err := net.Dial("tcp", w.b.tun.ListenAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	waitFor(t, "the first handshake to start", func() bool { return len(w.b.tun.handshakes) == 1 })

	second, err := net.Dial("tcp", w.b.tun.ListenAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	_ = second.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := second.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("second connection: read %d, %v; want it closed", n, err)
	}
	if st := w.b.tun.Stats(); st.HandshakesShed != 1 || st.HandshakeFailures != 0 {
		t.Errorf("stats while the first handshake is pending: %+v", st)
	}
	// The first gives up: the slot is free again, and a tunnel works.
	first.Close()
	waitFor(t, "the slot to free", func() bool { return len(w.b.tun.handshakes) == 0 })
	pod, done := podConn(t, w.a.tun, srcA(41100), w.echo)
	if got := echoOnce(t, pod, []byte("ok")); string(got) != "ok" {
		t.Fatalf("echo: %q", got)
	}
	<-done
}

// A CONNECT to a local pod that is not enrolled is refused with 421, even
// when the client's node believes it is.
func TestConnectToLocalPodNotEnrolledRefused(t *testing.T) {
	w := newWorld(t)
	lb := w.podB
	lb.Endpoint, lb.Enrolled = 2, false
	w.b.dir.set(lb)
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(41200), w.echo)
	_ = pod.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := pod.Read(make([]byte, 1)); !isReset(err) {
		t.Errorf("pod conn: read %d, %v; want a reset", n, err)
	}
	pod.Close()
	<-done
	if ev := w.a.ev.find(EventRefused); len(ev) != 1 || ev[0].Status != http.StatusMisdirectedRequest || ev[0].Cause != CauseNotTunnelable {
		t.Errorf("source refused events: %+v", ev)
	}
	if ev := w.b.ev.find(EventRefused); len(ev) != 1 || ev[0].Reason != "target pod is not enrolled" {
		t.Errorf("destination refused events: %+v", ev)
	}
	if calls := w.b.dir.calls(); len(calls) != 0 {
		t.Errorf("admit called: %+v", calls)
	}
}

// Pool entries are keyed by SVID serial: once the connections of a rotated
// SVID closed, their entry goes too.
func TestPoolForgetsEntriesOfClosedConns(t *testing.T) {
	w := newWorld(t)
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(41300), w.echo)
	if got := echoOnce(t, pod, []byte("one")); string(got) != "one" {
		t.Fatalf("echo: %q", got)
	}
	<-done
	if n := w.a.tun.pool.entries(); n != 1 {
		t.Fatalf("pool entries: %d, want 1", n)
	}
	// Rotation: the old SVID's connection closes, and its entry with it.
	w.a.ids.set(keyA, mint(t, w.ca, "/ns/shop/sa/a", time.Hour))
	w.a.tun.Revoke(keyA)
	waitFor(t, "the rotated svid's entry to go", func() bool { return w.a.tun.pool.entries() == 0 })

	pod, done = podConn(t, w.a.tun, srcA(41301), w.echo)
	if got := echoOnce(t, pod, []byte("two")); string(got) != "two" {
		t.Fatalf("echo: %q", got)
	}
	<-done
	// The peer closes the connection (its side of the rotation, or a
	// restart): the HTTP/2 layer's close unlinks it too.
	if n := w.a.tun.pool.entries(); n != 1 {
		t.Fatalf("pool entries: %d, want 1", n)
	}
	w.b.tun.inbound.closeAll()
	waitFor(t, "the entry of a connection the peer closed to go", func() bool { return w.a.tun.pool.entries() == 0 })
	if st := w.a.tun.Stats(); st.PoolConns != 0 {
		t.Errorf("pool conns: %d", st.PoolConns)
	}
}

// A socket the datapath cannot mark (its map is full) is refused with a
// reason of its own.
func TestMarkFailureHasItsOwnReason(t *testing.T) {
	w := newWorld(t)
	w.b.dp.markErr = errors.New("map full")
	w.start(t)
	pod, done := podConn(t, w.a.tun, srcA(41400), w.echo)
	if err := readErr(t, pod); !isReset(err) {
		t.Errorf("pod conn ended with %v, want a reset", err)
	}
	<-done
	ev := w.b.ev.find(EventRefused)
	if len(ev) != 1 || ev[0].Status != http.StatusBadGateway || ev[0].Reason != "mark tunnel socket in the datapath" ||
		ev[0].Cause != CauseTunnelDown {
		t.Errorf("destination refused events: %+v", ev)
	}
}

func TestPeerIDNeedsACertificate(t *testing.T) {
	if _, err := peerID(tls.ConnectionState{}); err == nil {
		t.Error("no peer certificate: no error")
	}
	w := newWorld(t)
	id, err := peerID(tls.ConnectionState{PeerCertificates: w.svidA.Certificates})
	if err != nil || id != w.svidA.ID {
		t.Errorf("peer id: %v, %v", id, err)
	}
}

func TestCauseOfStatus(t *testing.T) {
	for status, want := range map[int]Cause{403: CausePolicy, 421: CauseNotTunnelable, 502: CauseTunnelDown, 400: CauseTunnelDown} {
		if got := causeOfStatus(status); got != want {
			t.Errorf("cause of %d: %s, want %s", status, got, want)
		}
	}
}
