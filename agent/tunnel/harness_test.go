package tunnel

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/identity/devca"
	"github.com/bulkhead-io/bulkhead/policy"
)

// The test topology lives on loopback: node A's tunnel on 127.0.0.1,
// node B's on 127.0.0.2 (same port, as PeerPort is one port for all
// nodes), pod A's address 127.0.1.1 (only ever a source) and pod B's
// 127.0.1.2, where an echo server stands in for the pod.
var (
	nodeA = netip.MustParseAddr("127.0.0.1")
	nodeB = netip.MustParseAddr("127.0.0.2")
	podA  = netip.MustParseAddr("127.0.1.1")
	podB  = netip.MustParseAddr("127.0.1.2")
)

const (
	keyA = "shop/a"
	keyB = "shop/b"
	idA  = identity.NumericID(1001)
	idB  = identity.NumericID(1002)
)

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newCA(t testing.TB, td string) *devca.CA {
	t.Helper()
	ca, err := devca.Open(t.TempDir(), spiffeid.RequireTrustDomainFromString(td), devca.Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func mint(t testing.TB, ca *devca.CA, path string, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	id, err := spiffeid.FromPath(ca.TrustDomain(), path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ca.Mint(id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeDir is one node's view of the pods.
type fakeDir struct {
	mu     sync.Mutex
	pods   map[netip.Addr]Pod
	admit  func(dst Pod, id spiffeid.ID, src, from netip.Addr, port uint16) (identity.NumericID, policy.Decision)
	admits []admitCall
	// nodes are the addresses IsNode accepts.
	nodes map[netip.Addr]bool
}

type admitCall struct {
	dst  string
	id   spiffeid.ID
	src  netip.Addr
	from netip.Addr
	port uint16
}

func (d *fakeDir) PodByIP(ip netip.Addr) (Pod, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pods[ip]
	return p, ok
}

func (d *fakeDir) set(p Pod) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ip := range p.IPs {
		d.pods[ip] = p
	}
}

func (d *fakeDir) IsNode(addr netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.nodes[addr]
}

func (d *fakeDir) setNode(addr netip.Addr, is bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.nodes[addr] = is
}

func (d *fakeDir) Admit(dst Pod, id spiffeid.ID, src, from netip.Addr, port uint16) (identity.NumericID, policy.Decision) {
	d.mu.Lock()
	d.admits = append(d.admits, admitCall{dst.Key, id, src, from, port})
	f := d.admit
	d.mu.Unlock()
	if f != nil {
		return f(dst, id, src, from, port)
	}
	return idA, policy.Decision{Verdict: policy.VerdictAllow}
}

func (d *fakeDir) calls() []admitCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]admitCall(nil), d.admits...)
}

type fakeIDs struct {
	mu      sync.Mutex
	svids   map[string]*x509svid.SVID
	bundles *x509bundle.Set
}

func (f *fakeIDs) SVID(key string) (*x509svid.SVID, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.svids[key]
	return s, ok
}

func (f *fakeIDs) Bundles() x509bundle.Source { return f.bundles }

func (f *fakeIDs) set(key string, s *x509svid.SVID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s == nil {
		delete(f.svids, key)
		return
	}
	f.svids[key] = s
}

type fakeDP struct {
	mu        sync.Mutex
	marks     map[uint64]identity.NumericID
	marked    []uint64
	forgotten []uint64
	listener  bool
	markErr   error
}

func (f *fakeDP) SetTunnelListener(syscall.Conn) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listener = true
	return nil
}

func (f *fakeDP) ClearTunnelListener() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listener = false
	return nil
}

func (f *fakeDP) MarkTunnelSocket(cookie uint64, peer identity.NumericID) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if cookie == 0 {
		return errors.New("zero cookie")
	}
	if f.markErr != nil {
		return f.markErr
	}
	f.marks[cookie] = peer
	f.marked = append(f.marked, cookie)
	return nil
}

func (f *fakeDP) ForgetTunnelSocket(cookie uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.marks, cookie)
	f.forgotten = append(f.forgotten, cookie)
	return nil
}

type eventLog struct {
	mu sync.Mutex
	ev []Event
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	l.ev = append(l.ev, e)
	l.mu.Unlock()
}

func (l *eventLog) find(kind EventKind) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, e := range l.ev {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// node is one tunnel with its fakes.
type node struct {
	addr netip.Addr
	tun  *Tunnel
	dir  *fakeDir
	ids  *fakeIDs
	dp   *fakeDP
	ev   *eventLog
	// tweak, when set, edits the node's Config before New.
	tweak func(*Config)
}

// world is two nodes: A hosts pod A (the client), B hosts pod B (an echo
// server). Both pods are enrolled.
type world struct {
	ca     *devca.CA
	a, b   *node
	echo   netip.AddrPort // pod B's echo server
	svidA  *x509svid.SVID
	svidB  *x509svid.SVID
	podA   Pod
	podB   Pod
	tdName string
}

func newNode(addr netip.Addr, ca *devca.CA) *node {
	return &node{
		addr: addr,
		dir:  &fakeDir{pods: map[netip.Addr]Pod{}, nodes: map[netip.Addr]bool{nodeA: true, nodeB: true, netip.IPv6Loopback(): true}},
		ids:  &fakeIDs{svids: map[string]*x509svid.SVID{}, bundles: x509bundle.NewSet(ca.Bundle())},
		dp:   &fakeDP{marks: map[uint64]identity.NumericID{}},
		ev:   &eventLog{},
	}
}

func newWorld(t testing.TB) *world {
	t.Helper()
	ca := newCA(t, "cluster.local")
	w := &world{ca: ca, a: newNode(nodeA, ca), b: newNode(nodeB, ca), tdName: "cluster.local"}
	w.svidA = mint(t, ca, "/ns/shop/sa/a", time.Hour)
	w.svidB = mint(t, ca, "/ns/shop/sa/b", time.Hour)
	w.echo = serveEcho(t, podB)
	w.podA = Pod{Key: keyA, IPs: []netip.Addr{podA}, Identity: idA, SPIFFEID: w.svidA.ID, Enrolled: true, Node: nodeA}
	w.podB = Pod{Key: keyB, IPs: []netip.Addr{podB}, Identity: idB, SPIFFEID: w.svidB.ID, Enrolled: true, Node: nodeB}
	// Each node sees its own pod as local (an endpoint), the other's as
	// remote.
	la, rb := w.podA, w.podB
	la.Endpoint = 1
	w.a.dir.set(la)
	w.a.dir.set(rb)
	ra, lb := w.podA, w.podB
	lb.Endpoint = 2
	w.b.dir.set(ra)
	w.b.dir.set(lb)
	w.a.ids.set(keyA, w.svidA)
	w.b.ids.set(keyB, w.svidB)
	return w
}

// start runs both tunnels on one free port.
func (w *world) start(t testing.TB) {
	t.Helper()
	for try := 0; ; try++ {
		port := freePort(t)
		errA := w.a.run(t, port)
		if errA == nil {
			errB := w.b.run(t, port)
			if errB == nil {
				return
			}
			if try > 5 {
				t.Fatal(errB)
			}
			continue
		}
		if try > 5 {
			t.Fatal(errA)
		}
	}
}

func freePort(t testing.TB) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// run starts the node's tunnel on port; it returns once the listeners are
// open, or Run's error.
func (n *node) run(t testing.TB, port uint16) error {
	t.Helper()
	cfg := Config{
		Logger:       quiet(),
		Directory:    n.dir,
		Identities:   n.ids,
		Datapath:     n.dp,
		TrustDomain:  spiffeid.RequireTrustDomainFromString("cluster.local"),
		ListenAddr:   net.JoinHostPort(n.addr.String(), strconv.Itoa(int(port))),
		RedirectAddr: RedirectNone,
		PeerPort:     port,
		OnEvent:      n.ev.add,
	}
	if n.tweak != nil {
		n.tweak(&cfg)
	}
	tun, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tun.Run(ctx) }()
	select {
	case <-tun.Ready():
	case err := <-done:
		cancel()
		return err
	}
	n.tun = tun
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("run did not return")
		}
	})
	return nil
}

// serveEcho echoes every connection on ip until the test ends, passing the
// client's FIN on once all is echoed.
func serveEcho(t testing.TB, ip netip.Addr) netip.AddrPort {
	t.Helper()
	return serveTCP(t, ip, func(c net.Conn) {
		buf := make([]byte, 32<<10)
		_, _ = io.CopyBuffer(c, struct{ io.Reader }{c}, buf)
		_ = c.(*net.TCPConn).CloseWrite()
	})
}

// serveTCP listens on ip (any port) until the test ends and runs handle on
// every connection, closing it when handle returns.
func serveTCP(t testing.TB, ip netip.Addr, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	return addrPortOf(l.Addr())
}

// podConn makes a pod's connection as the transparent listener would hand
// it over: the pod end (returned) and the tunnel end, given to Forward with
// src and dst. It runs Forward and returns a channel closed when it
// returns.
func podConn(t testing.TB, tun *Tunnel, src, dst netip.AddrPort) (net.Conn, <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	pod, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pod.Close() })
	side, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tun.Forward(side, src, dst)
	}()
	return pod, done
}

// isReset reports whether err is a connection reset.
func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// readErr reads until c ends and returns how it ended.
func readErr(t testing.TB, c net.Conn) error {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err != nil {
			return err
		}
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
