package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Forward tunnels pod connection c from src to its original destination
// dst, and returns when the connection has ended. It owns c: c is closed
// on return, with an RST when it was refused or failed. It is meant for
// connections accepted while Run runs (after Ready): local destinations
// are dialed through the HBONE listener Run opened.
func (t *Tunnel) Forward(c net.Conn, src, dst netip.AddrPort) {
	t.forwarded.Add(1)
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	ev := Event{Side: SideSource, Src: src, Dst: dst}
	refuse := func(cause Cause, reason string, err error) {
		t.refused.Add(1)
		reset(c)
		ev.Kind, ev.Reason, ev.Err, ev.Cause = EventRefused, reason, err, cause
		t.log.Debug("tunnel: refused", "src", src, "dst", dst, "cause", cause, "reason", reason, "err", err)
		t.emit(ev)
	}

	sp, ok := t.cfg.Directory.PodByIP(src.Addr())
	if !ok || !sp.Local() {
		refuse(CauseNotTunnelable, "source is not a local pod", nil)
		return
	}
	svid, ok := t.cfg.Identities.SVID(sp.Key)
	if !ok || svid == nil || len(svid.Certificates) == 0 {
		refuse(CauseTunnelDown, "source pod has no svid", nil)
		return
	}
	ev.SrcID = svid.ID
	dp, ok := t.cfg.Directory.PodByIP(dst.Addr())
	if !ok {
		refuse(CauseNotTunnelable, "destination is not a known pod", nil)
		return
	}
	ev.DstID = dp.SPIFFEID
	if !dp.Enrolled {
		refuse(CauseNotTunnelable, "destination pod is not enrolled", nil)
		return
	}
	if dp.SPIFFEID.IsZero() {
		refuse(CauseNotTunnelable, "destination pod has no spiffe id", nil)
		return
	}
	node, ok := t.peerAddr(dp)
	if !ok {
		refuse(CauseNotTunnelable, "destination pod's node is unknown", nil)
		return
	}
	ev.Node = node

	ctx := t.baseCtx()
	key := poolKey{srcID: svid.ID.String(), serial: serialOf(svid), node: node, dstID: dp.SPIFFEID.String()}
	for attempt := 0; ; attempt++ {
		pc, reused, err := t.pool.get(ctx, key, sp.Key, svid, dst.Addr(), dp.SPIFFEID)
		if err != nil {
			t.dialFail.Add(1)
			refuse(CauseTunnelDown, "connect to destination node", err)
			return
		}
		ev.Reused = reused
		if reused {
			t.reuses.Add(1)
		}
		// A pooled connection may die (idle timeout, GOAWAY, peer
		// restart) between the pool's check and the request: that
		// costs one more try on a fresh connection, not the pod's
		// connection.
		if !t.stream(ctx, c, pc, ev, reused && attempt == 0) {
			return
		}
		pc.h2.setNoReuse()
	}
}

// baseCtx is Run's context, so that Forward's streams end with Run.
func (t *Tunnel) baseCtx() context.Context {
	t.runMu.Lock()
	defer t.runMu.Unlock()
	if t.runCtx != nil {
		return t.runCtx
	}
	return context.Background()
}

// stream carries pod connection c over pooled connection pc, whose stream
// slot the caller reserved. With mayRetry, a stream that failed before
// anything of c was read returns true, leaving c to the caller.
func (t *Tunnel) stream(ctx context.Context, c net.Conn, pc *clientConn, ev Event, mayRetry bool) (retry bool) {
	fail := func(err error) {
		t.dialFail.Add(1)
		t.refused.Add(1)
		reset(c)
		ev.Kind, ev.Reason, ev.Err, ev.Cause = EventRefused, "connect request failed", err, CauseTunnelDown
		t.emit(ev)
	}
	s, err := pc.h2.open(authority(ev.Dst), ev.Src.Addr().String())
	if err != nil {
		if mayRetry && ctx.Err() == nil {
			t.log.Debug("tunnel: pooled connection failed, retrying on a new one", "node", ev.Node, "err", err)
			return true
		}
		fail(err)
		return false
	}
	// The pod's first bytes go right behind the CONNECT: a
	// client-speaks-first protocol does not wait a round trip for the
	// response.
	var read atomic.Uint64
	var sent uint64
	upDone := make(chan error, 1)
	go func() {
		n, err := t.bufs.sendFrom(s, c, &read)
		sent = n
		if err != nil {
			s.cancel(http2.ErrCodeConnect)
		}
		upDone <- err
	}()
	status, err := s.response(ctx.Done())
	if err != nil {
		// Stop the sender, to learn whether it took anything from the
		// pod: if not, another connection may carry the pod's.
		s.cancel(http2.ErrCodeCancel)
		_ = c.SetReadDeadline(time.Unix(1, 0))
		<-upDone
		_ = c.SetReadDeadline(time.Time{})
		if mayRetry && ctx.Err() == nil && read.Load() == 0 {
			t.log.Debug("tunnel: pooled connection failed, retrying on a new one", "node", ev.Node, "err", err)
			return true
		}
		fail(err)
		return false
	}
	if status < 200 || status > 299 {
		s.cancel(http2.ErrCodeCancel)
		reset(c)
		<-upDone
		t.rejected.Add(1)
		ev.Kind, ev.Reason, ev.Status = EventRefused, fmt.Sprintf("destination refused: %d %s", status, http.StatusText(status)), status
		ev.Cause = causeOfStatus(status)
		t.emit(ev)
		return false
	}
	// From here on, the stream's reset (by the peer, a revoked or
	// expired SVID, the connection's end) resets the pod's connection.
	s.setOnAbort(func() { reset(c) })
	t.activeOut.Add(1)
	defer t.activeOut.Add(-1)
	ev.Kind = EventOpened
	t.emit(ev)

	// Bytes to the pod: the stream's, written by the connection's read
	// loop while the pod keeps up, else here.
	in, derr := s.pipeTo(c)
	t.bytesIn.Add(in)
	var uerr error
	if derr == nil {
		// The destination finished sending: pass its FIN on, and wait
		// for the pod to finish its side.
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		uerr = <-upDone
	}
	if derr != nil || uerr != nil {
		s.cancel(http2.ErrCodeConnect)
		reset(c)
		if derr != nil {
			uerr = <-upDone
		}
	} else {
		c.Close()
	}
	t.bytesOut.Add(sent)
	ev.Kind, ev.Sent, ev.Received, ev.Err = EventClosed, sent, in, errors.Join(derr, uerr)
	t.emit(ev)
	return false
}

// poolKey names the TLS connections that may carry a pod's stream: the
// same client SVID (ID and serial), the same destination node, the same
// expected server ID.
type poolKey struct {
	srcID, serial string
	node          netip.AddrPort
	dstID         string
}

// clientConn is one pooled TLS connection with its HBONE streams.
type clientConn struct {
	key    poolKey
	tls    *tls.Conn
	h2     *h2Conn
	timer  atomic.Pointer[time.Timer]
	closed atomic.Bool
	// gone is set when the TLS connection was closed, by us or by the
	// HBONE layer (idle timeout, GOAWAY, read error): it is then
	// unlinked from the pool.
	gone atomic.Bool
	// pods are the keys of the pods whose streams used it (for Revoke);
	// guarded by pool.mu.
	pods map[string]bool
}

func (pc *clientConn) close() {
	if pc.closed.Swap(true) {
		return
	}
	if tm := pc.timer.Load(); tm != nil {
		tm.Stop()
	}
	pc.h2.close(errConnClosed)
}

// dialing is one connection attempt that concurrent callers wait for, so
// that a burst of connections to a new peer pays one handshake.
type dialing struct {
	done chan struct{}
	err  error
}

type poolEntry struct {
	conns   []*clientConn
	pending *dialing
}

type pool struct {
	t  *Tunnel
	mu sync.Mutex
	m  map[poolKey]*poolEntry
}

func newPool(t *Tunnel) *pool { return &pool{t: t, m: map[poolKey]*poolEntry{}} }

// unlink removes a closed connection from the pool, and its entry when
// that was the last one: keys name an SVID serial, so an entry whose
// SVID was rotated or revoked is never asked for again.
func (p *pool) unlink(pc *clientConn) {
	pc.gone.Store(true)
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.m[pc.key]
	if e == nil {
		return
	}
	for i, c := range e.conns {
		if c == pc {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			e.conns = e.conns[:len(e.conns):len(e.conns)]
			break
		}
	}
	if len(e.conns) == 0 && e.pending == nil {
		delete(p.m, pc.key)
	}
}

// get returns a connection for key with a stream reserved, and whether it
// was an existing one.
func (p *pool) get(ctx context.Context, key poolKey, podKey string, svid *x509svid.SVID, dstIP netip.Addr, dstID spiffeid.ID) (*clientConn, bool, error) {
	for {
		p.mu.Lock()
		e := p.m[key]
		if e == nil {
			e = &poolEntry{}
			p.m[key] = e
		}
		var found *clientConn
		var dead []*clientConn
		live := make([]*clientConn, 0, len(e.conns))
		for _, pc := range e.conns {
			if pc.closed.Load() || pc.h2.closed() {
				dead = append(dead, pc)
				continue
			}
			// A connection that takes no new streams (GOAWAY, no
			// reuse) stays listed, for Revoke, until its last
			// stream ends and it closes.
			live = append(live, pc)
			if found == nil && pc.h2.reserve() {
				found = pc
			}
		}
		e.conns = live
		if found != nil {
			found.pods[podKey] = true
			p.mu.Unlock()
			// Closed outside p.mu: closing unlinks, which takes it.
			p.closeConns(dead)
			return found, true, nil
		}
		if d := e.pending; d != nil {
			p.mu.Unlock()
			p.closeConns(dead)
			select {
			case <-d.done:
			case <-ctx.Done():
				return nil, false, ctx.Err()
			}
			if d.err != nil {
				return nil, false, d.err
			}
			continue
		}
		d := &dialing{done: make(chan struct{})}
		e.pending = d
		p.mu.Unlock()
		p.closeConns(dead)

		pc, err := p.dial(ctx, key, svid, dstIP, dstID)

		p.mu.Lock()
		e.pending = nil
		d.err = err
		close(d.done)
		if err != nil {
			if len(e.conns) == 0 {
				delete(p.m, key)
			}
			p.mu.Unlock()
			return nil, false, err
		}
		if !pc.gone.Load() {
			e.conns = append(e.conns, pc)
		} else if len(e.conns) == 0 {
			// Closed already (by the peer): its unlink ran while
			// the dial was pending and could not drop the entry.
			delete(p.m, key)
		}
		pc.pods[podKey] = true
		ok := pc.h2.reserve()
		p.mu.Unlock()
		// A Revoke that ran during the dial did not see this connection.
		if cur, held := p.t.cfg.Identities.SVID(podKey); !held || cur.ID.String() != key.srcID || serialOf(cur) != key.serial {
			pc.close()
			return nil, false, fmt.Errorf("svid of %s was replaced or withdrawn while connecting", podKey)
		}
		if ok {
			return pc, false, nil
		}
		// Taken by waiters already: try again.
	}
}

// dial opens a TLS connection to key.node as svid, which must find the
// server to be dstID.
func (p *pool) dial(ctx context.Context, key poolKey, svid *x509svid.SVID, dstIP netip.Addr, dstID spiffeid.ID) (*clientConn, error) {
	t := p.t
	t.dials.Add(1)
	d := net.Dialer{Timeout: DialTimeout}
	raw, err := d.DialContext(ctx, "tcp", key.node.String())
	if err != nil {
		return nil, fmt.Errorf("dial tunnel endpoint %s: %w", key.node, err)
	}
	cfg := &tls.Config{
		MinVersion:                  tls.VersionTLS13,
		MaxVersion:                  tls.VersionTLS13,
		ServerName:                  serverName(dstIP),
		NextProtos:                  []string{http2.NextProtoTLS},
		DynamicRecordSizingDisabled: true,
	}
	bundles := t.cfg.Identities.Bundles()
	if bundles == nil {
		raw.Close()
		return nil, errors.New("no trust bundle yet")
	}
	tlsconfig.HookMTLSClientConfig(cfg, svid, bundles, tlsconfig.AuthorizeID(dstID))
	bc := newBatchConn(raw, t.rbufs, t.wbufs)
	tc := tls.Client(bc, cfg)
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		raw.Close()
		t.emit(Event{Kind: EventHandshakeFailed, Side: SideSource, Node: key.node, SrcID: svid.ID, DstID: dstID,
			Reason: "tls handshake with destination node", Err: err})
		return nil, fmt.Errorf("tls handshake with %s as %s: %w", key.node, dstID, err)
	}
	st := tc.ConnectionState()
	if st.NegotiatedProtocol != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("tunnel endpoint %s did not negotiate h2 (got %q)", key.node, st.NegotiatedProtocol)
	}
	pc := &clientConn{key: key, tls: tc, pods: map[string]bool{}}
	// The HBONE layer closes the TLS connection whenever it ends, on its
	// own too (idle, GOAWAY, a read error): that unlinks it from the
	// pool. The server's SETTINGS are waited for: TLS 1.3 finishes the
	// client's handshake before the server has verified the client's
	// certificate, and a refusal shows on the first read.
	h2, err := h2Dial(tc, bc, func() { p.unlink(pc) })
	if err != nil {
		return nil, fmt.Errorf("hbone with %s: %w", key.node, err)
	}
	pc.h2 = h2
	// Nothing authenticated by a certificate outlives it: close when
	// either side's expires.
	exp := svid.Certificates[0].NotAfter
	if len(st.PeerCertificates) > 0 && st.PeerCertificates[0].NotAfter.Before(exp) {
		exp = st.PeerCertificates[0].NotAfter
	}
	pc.timer.Store(time.AfterFunc(time.Until(exp), pc.close))
	return pc, nil
}

// revoke closes the connections that pod podKey used whose SVID is stale.
func (p *pool) revoke(podKey string, stale func(id, serial string) bool) int {
	p.mu.Lock()
	var victims []*clientConn
	for _, e := range p.m {
		for _, pc := range e.conns {
			if pc.pods[podKey] && stale(pc.key.srcID, pc.key.serial) {
				victims = append(victims, pc)
			}
		}
	}
	p.mu.Unlock()
	for _, pc := range victims {
		pc.close()
	}
	return len(victims)
}

func (p *pool) closeConns(pcs []*clientConn) {
	for _, pc := range pcs {
		pc.close()
	}
}

// entries is the number of pool keys held.
func (p *pool) entries() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.m)
}

func (p *pool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, e := range p.m {
		for _, pc := range e.conns {
			if !pc.closed.Load() {
				n++
			}
		}
	}
	return n
}

func (p *pool) closeAll() {
	p.mu.Lock()
	var all []*clientConn
	for k, e := range p.m {
		all = append(all, e.conns...)
		delete(p.m, k)
	}
	p.mu.Unlock()
	for _, pc := range all {
		pc.close()
	}
}
