package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// inboundConn is one accepted TLS connection: which local pod's SVID it
// presented, and which client SVID it verified.
type inboundConn struct {
	raw    net.Conn
	podKey string
	// serverID and serial name the SVID this connection presented.
	serverID spiffeid.ID
	serial   string
	clientID spiffeid.ID
	remote   netip.AddrPort
	// notAfter is when the server SVID expires.
	notAfter time.Time
	timer    atomic.Pointer[time.Timer]
	closed   atomic.Bool
}

func (ic *inboundConn) close() {
	if ic.closed.Swap(true) {
		return
	}
	if tm := ic.timer.Load(); tm != nil {
		tm.Stop()
	}
	_ = ic.raw.Close()
}

type inboundSet struct {
	mu sync.Mutex
	m  map[*inboundConn]struct{}
}

func newInboundSet() *inboundSet { return &inboundSet{m: map[*inboundConn]struct{}{}} }

func (s *inboundSet) add(ic *inboundConn) {
	s.mu.Lock()
	s.m[ic] = struct{}{}
	s.mu.Unlock()
}

func (s *inboundSet) remove(ic *inboundConn) {
	s.mu.Lock()
	delete(s.m, ic)
	s.mu.Unlock()
}

func (s *inboundSet) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

func (s *inboundSet) revoke(podKey string, stale func(id, serial string) bool) int {
	s.mu.Lock()
	var victims []*inboundConn
	for ic := range s.m {
		if ic.podKey == podKey && stale(ic.serverID.String(), ic.serial) {
			victims = append(victims, ic)
		}
	}
	s.mu.Unlock()
	for _, ic := range victims {
		ic.close()
	}
	return len(victims)
}

func (s *inboundSet) closeAll() {
	s.mu.Lock()
	var all []*inboundConn
	for ic := range s.m {
		all = append(all, ic)
	}
	s.mu.Unlock()
	for _, ic := range all {
		ic.close()
	}
}

// serveConn runs the TLS handshake and then HTTP/2 on one inbound
// connection until it ends.
func (t *Tunnel) serveConn(ctx context.Context, raw net.Conn) {
	ic := &inboundConn{raw: raw, remote: addrPortOf(raw.RemoteAddr())}
	// Only peer tunnel endpoints may use this listener: a pod that
	// reached it would have its CONNECTs judged by the destination's
	// ingress policy alone, past its own egress policy. Checked before
	// the handshake, so that a pod cannot even make the node sign.
	if !t.cfg.Directory.IsNode(ic.remote.Addr()) {
		t.notNode.Add(1)
		raw.Close()
		t.log.Debug("tunnel: closed an inbound connection not from a node", "remote", ic.remote)
		return
	}
	select {
	case t.handshakes <- struct{}{}:
	default:
		t.shed.Add(1)
		raw.Close()
		t.log.Debug("tunnel: too many inbound handshakes in progress, closed one", "remote", ic.remote,
			"max", cap(t.handshakes))
		return
	}
	tc, bc, id, ok := t.handshake(ctx, ic)
	<-t.handshakes
	if !ok {
		return
	}
	ic.clientID = id
	t.accepted.Add(1)
	t.inbound.add(ic)
	defer t.inbound.remove(ic)
	st := tc.ConnectionState()
	exp := expiry(st.PeerCertificates)
	if ic.notAfter.Before(exp) {
		exp = ic.notAfter
	}
	ic.timer.Store(time.AfterFunc(time.Until(exp), ic.close))
	defer ic.close()
	// A Revoke that ran during the handshake did not see this connection.
	if cur, ok := t.cfg.Identities.SVID(ic.podKey); !ok || cur.ID != ic.serverID || serialOf(cur) != ic.serial {
		t.log.Debug("tunnel: server svid replaced during the handshake, closed", "remote", ic.remote, "pod", ic.podKey)
		return
	}
	if ic.closed.Load() {
		return
	}

	if err := h2Serve(tc, bc, func(s *h2Stream) { t.handleConnect(ic, s) }); err != nil {
		t.log.Debug("tunnel: inbound hbone", "remote", ic.remote, "err", err)
	}
}

// handshake runs the TLS handshake of ic and reads the client's verified
// SPIFFE ID; on failure it closes the connection, counts and reports it.
func (t *Tunnel) handshake(ctx context.Context, ic *inboundConn) (*tls.Conn, *batchConn, spiffeid.ID, bool) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			return t.serverConfig(ic, hello)
		},
	}
	bc := newBatchConn(ic.raw, t.rbufs, t.wbufs)
	tc := tls.Server(bc, cfg)
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	reason := "tls handshake with client node"
	var id spiffeid.ID
	if err == nil {
		reason = "client certificate"
		id, err = peerID(tc.ConnectionState())
	}
	if err != nil {
		ic.raw.Close()
		t.hsFail.Add(1)
		t.log.Debug("tunnel: inbound handshake failed", "remote", ic.remote, "reason", reason, "err", err)
		t.emit(Event{Kind: EventHandshakeFailed, Side: SideDestination, Node: ic.remote, DstID: ic.serverID,
			Reason: reason, Err: err})
		return nil, nil, spiffeid.ID{}, false
	}
	return tc, bc, id, true
}

// peerID is the SPIFFE ID of a handshake's verified client certificate.
func peerID(st tls.ConnectionState) (spiffeid.ID, error) {
	if len(st.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("client presented no certificate")
	}
	id, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("client certificate: %w", err)
	}
	return id, nil
}

// expiry is when the first certificate of the client's chain expires: the
// connection it authenticated must end then.
func expiry(peer []*x509.Certificate) time.Time {
	exp := peer[0].NotAfter
	for _, c := range peer[1:] {
		if c.NotAfter.Before(exp) {
			exp = c.NotAfter
		}
	}
	return exp
}

// serverConfig picks the destination pod's SVID by SNI, and verifies the
// client against the trust bundle: any ID of the trust domain, because the
// destination's policy (Admit) decides who may connect.
func (t *Tunnel) serverConfig(ic *inboundConn, hello *tls.ClientHelloInfo) (*tls.Config, error) {
	ip, err := parseServerName(hello.ServerName)
	if err != nil {
		return nil, err
	}
	p, ok := t.cfg.Directory.PodByIP(ip)
	if !ok || !p.Local() {
		return nil, fmt.Errorf("server name %q: %s is not a local pod", hello.ServerName, ip)
	}
	svid, ok := t.cfg.Identities.SVID(p.Key)
	if !ok || svid == nil || len(svid.Certificates) == 0 {
		return nil, fmt.Errorf("server name %q: pod %s has no svid", hello.ServerName, p.Key)
	}
	ic.podKey, ic.serverID, ic.serial = p.Key, svid.ID, serialOf(svid)
	ic.notAfter = svid.Certificates[0].NotAfter
	cfg := &tls.Config{
		MinVersion:                  tls.VersionTLS13,
		MaxVersion:                  tls.VersionTLS13,
		NextProtos:                  []string{http2.NextProtoTLS},
		DynamicRecordSizingDisabled: true,
	}
	bundles := t.cfg.Identities.Bundles()
	if bundles == nil {
		return nil, errors.New("no trust bundle yet")
	}
	tlsconfig.HookMTLSServerConfig(cfg, svid, bundles, tlsconfig.AuthorizeMemberOf(t.cfg.TrustDomain))
	return cfg, nil
}

// handleConnect serves one CONNECT stream.
func (t *Tunnel) handleConnect(ic *inboundConn, s *h2Stream) {
	ev := Event{Side: SideDestination, Node: ic.remote, SrcID: ic.clientID, DstID: ic.serverID}
	deny := func(status int, reason string, err error) {
		t.denied.Add(1)
		ev.Kind, ev.Status, ev.Reason, ev.Err, ev.Cause = EventRefused, status, reason, err, causeOfStatus(status)
		t.log.Debug("tunnel: refused a connect", "remote", ic.remote, "dst", ev.Dst, "src", ev.Src,
			"status", status, "reason", reason, "err", err)
		t.emit(ev)
		_ = s.respond(status)
	}
	if s.method != http.MethodConnect {
		deny(http.StatusMethodNotAllowed, "not a CONNECT request", nil)
		return
	}
	if s.extended {
		deny(http.StatusBadRequest, "not a plain CONNECT (has :scheme, :path or :protocol)", nil)
		return
	}
	dst, err := netip.ParseAddrPort(s.authority)
	if err != nil {
		deny(http.StatusBadRequest, "bad CONNECT authority", err)
		return
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	ev.Dst = dst
	src, err := netip.ParseAddr(s.source)
	if err != nil {
		deny(http.StatusBadRequest, "bad "+SourceHeader+" header", err)
		return
	}
	src = src.Unmap()
	ev.Src = netip.AddrPortFrom(src, 0)
	dp, ok := t.cfg.Directory.PodByIP(dst.Addr())
	if !ok || !dp.Local() {
		deny(http.StatusMisdirectedRequest, "target is not a local pod", nil)
		return
	}
	if dp.SPIFFEID != ic.serverID {
		// The client verified this connection's server as another
		// pod's identity: it must not reach this one through it.
		deny(http.StatusMisdirectedRequest, fmt.Sprintf("target's identity %s is not the connection's %s", dp.SPIFFEID, ic.serverID), nil)
		return
	}
	if !dp.Enrolled {
		// A source node never tunnels to a pod that is not enrolled:
		// only a direct HBONE client would, and such a pod's policy
		// does not expect tunnelled (authenticated) peers.
		deny(http.StatusMisdirectedRequest, "target pod is not enrolled", nil)
		return
	}
	num, dec := t.cfg.Directory.Admit(dp, ic.clientID, src, ic.remote.Addr(), dst.Port())
	ev.Identity, ev.Decision = num, dec
	if !dec.Verdict.Passes() {
		deny(http.StatusForbidden, "denied by ingress policy", nil)
		return
	}

	var cookie uint64
	var marked bool
	var markErr error
	d := net.Dialer{Timeout: DialTimeout, Control: func(_, _ string, rc syscall.RawConn) error {
		var cerr error
		if err := rc.Control(func(fd uintptr) {
			cookie, cerr = socketCookie(fd)
		}); err != nil {
			return err
		}
		if cerr != nil {
			return cerr
		}
		// Marked before connect: the SYN already carries the verified
		// identity in the destination's datapath.
		if err := t.cfg.Datapath.MarkTunnelSocket(cookie, num); err != nil {
			markErr = fmt.Errorf("mark tunnel socket: %w", err)
			return markErr
		}
		marked = true
		return nil
	}}
	target, err := d.DialContext(t.baseCtx(), "tcp", dst.String())
	if marked {
		defer func() {
			if err := t.cfg.Datapath.ForgetTunnelSocket(cookie); err != nil {
				t.log.Warn("tunnel: forget tunnel socket", "cookie", cookie, "err", err)
			}
		}()
	}
	if markErr != nil {
		// Not the pod's fault: the datapath's tunnel socket map is full
		// (or gone), and an unmarked socket would reach the pod as an
		// unauthenticated peer.
		deny(http.StatusBadGateway, "mark tunnel socket in the datapath", err)
		return
	}
	if err != nil {
		deny(http.StatusBadGateway, "connect to destination pod", err)
		return
	}
	t.admitted.Add(1)
	t.activeIn.Add(1)
	defer t.activeIn.Add(-1)
	// The stream's reset or its connection's end (a revoked or expired
	// SVID, a reset from the source) breaks the pod's connection at once.
	s.setOnAbort(func() { reset(target) })
	// Upstream: the stream's bytes to the pod. It starts before the 200
	// is written: the source sends the pod's first bytes right behind
	// the CONNECT, and they need not wait for the response's write.
	var sent atomic.Uint64
	upDone := make(chan error, 1)
	go func() {
		n, err := s.pipeTo(target)
		sent.Store(n)
		if err == nil {
			if tc, ok := target.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
		} else {
			reset(target)
		}
		upDone <- err
	}()
	if err := s.respond(http.StatusOK); err != nil {
		reset(target)
		s.cancel(http2.ErrCodeConnect)
		<-upDone
		ev.Kind, ev.Reason, ev.Err, ev.Cause = EventRefused, "answer the connect", err, CauseTunnelDown
		t.emit(ev)
		return
	}
	ev.Kind = EventOpened
	t.emit(ev)
	// Downstream: the pod's bytes to the stream.
	got, derr := t.bufs.sendFrom(s, target, nil)
	var uerr error
	if derr == nil {
		uerr = <-upDone
	}
	ev.Kind, ev.Sent, ev.Received = EventClosed, sent.Load(), got
	ev.Err = errors.Join(derr, uerr)
	if derr != nil || uerr != nil {
		// Either side broke: reset both, so that the source resets its
		// pod's connection rather than seeing a clean end.
		reset(target)
		s.cancel(http2.ErrCodeConnect)
		t.emit(ev)
		return
	}
	target.Close()
	t.emit(ev)
}
