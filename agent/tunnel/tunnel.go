package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Defaults of Config.
const (
	DefaultListenAddr   = "[::]:15008"
	DefaultRedirectAddr = "[::]:15001"
	DefaultPeerPort     = 15008
	// RedirectNone as Config.RedirectAddr opens no transparent listener
	// (tests and benchmarks call Forward themselves).
	RedirectNone = "none"
	// DialTimeout bounds the TCP connect to a peer node: a pod must see
	// its connection fail at once, not hang, when that node's endpoint is
	// down.
	DialTimeout = 3 * time.Second
	// HandshakeTimeout bounds the TLS handshake on both sides.
	HandshakeTimeout = 5 * time.Second
	// SourceHeader carries the source pod's IP, as its node claims it.
	SourceHeader = "Bulkhead-Source"
	// DefaultMaxPendingHandshakes bounds the inbound TLS handshakes in
	// progress: each costs a goroutine and an asymmetric signature, and
	// connections beyond the bound are closed at once.
	DefaultMaxPendingHandshakes = 256
)

// Pod is what the tunnel needs to know about a pod.
type Pod struct {
	Key      string // "namespace/name"
	IPs      []netip.Addr
	Identity identity.NumericID
	SPIFFEID spiffeid.ID // issued, else derived
	Enrolled bool
	Endpoint policy.EndpointID // local endpoint; 0 = on another node
	Node     netip.Addr        // its node's tunnel address (status.hostIP); invalid = unknown
}

// Local reports whether the pod is on this node.
func (p Pod) Local() bool { return p.Endpoint != 0 }

// Directory is the agent's current state. It must be safe for concurrent
// use and never block: it is asked on every tunnelled connection.
type Directory interface {
	PodByIP(ip netip.Addr) (Pod, bool)
	// IsNode reports whether addr is a node's address, from which a
	// peer tunnel endpoint may connect. Connections to the HBONE
	// listener from anything else (a pod) are closed before the TLS
	// handshake: a pod must not reach pods through it past its own
	// egress policy.
	IsNode(addr netip.Addr) bool
	// Admit judges a tunnelled TCP connection to port of local pod dst,
	// from a peer whose client SVID verified as id, opened by the node at
	// from (the TLS peer's address), whose claimed source address is src:
	// the identity it is judged as, and dst's ingress decision. The claim
	// may only be believed for pods that live on from.
	Admit(dst Pod, id spiffeid.ID, src, from netip.Addr, port uint16) (identity.NumericID, policy.Decision)
}

// Identities holds the local pods' SVIDs and the trust bundles.
type Identities interface {
	SVID(podKey string) (*x509svid.SVID, bool)
	// Bundles must be usable at once (an empty set, never a nil pointer
	// in the interface).
	Bundles() x509bundle.Source
}

// Datapath is the part of the loaded datapath the tunnel drives.
type Datapath interface {
	SetTunnelListener(c syscall.Conn) error
	ClearTunnelListener() error
	MarkTunnelSocket(cookie uint64, peer identity.NumericID) error
	ForgetTunnelSocket(cookie uint64) error
}

// Config wires a Tunnel.
type Config struct {
	Logger      *slog.Logger
	Directory   Directory
	Identities  Identities
	Datapath    Datapath
	TrustDomain spiffeid.TrustDomain
	// ListenAddr is the HBONE listener, DefaultListenAddr when empty.
	ListenAddr string
	// RedirectAddr is the transparent listener (IP_TRANSPARENT),
	// DefaultRedirectAddr when empty, RedirectNone for none.
	RedirectAddr string
	// PeerPort is the port of other nodes' tunnel endpoints.
	PeerPort uint16
	// MaxPendingHandshakes bounds the inbound TLS handshakes in
	// progress, DefaultMaxPendingHandshakes when 0.
	MaxPendingHandshakes int
	// OnEvent, when set, is told of refusals, handshake failures and
	// tunnelled connections opening and closing. It is called from the
	// connection's goroutine and must not block.
	OnEvent func(Event)
}

// EventKind says what an Event reports.
type EventKind uint8

const (
	// EventRefused: a connection was refused (reset) without being
	// tunnelled, or the peer refused it (Reason, Status).
	EventRefused EventKind = iota + 1
	// EventHandshakeFailed: a TLS handshake failed (either side).
	EventHandshakeFailed
	// EventOpened: a tunnelled connection was established.
	EventOpened
	// EventClosed: a tunnelled connection ended, with its byte counts.
	EventClosed
)

func (k EventKind) String() string {
	switch k {
	case EventRefused:
		return "refused"
	case EventHandshakeFailed:
		return "handshake_failed"
	case EventOpened:
		return "opened"
	case EventClosed:
		return "closed"
	}
	return "unknown"
}

// Cause sorts the reasons of an EventRefused, for the agent's flow records.
type Cause uint8

const (
	// CauseNone: not a refusal.
	CauseNone Cause = iota
	// CauseNotTunnelable: refused before any dial, because the
	// connection cannot be tunnelled (the destination is unknown, not
	// enrolled, has no identity or no known node; or the destination
	// node answered that its target is not an enrolled local pod).
	CauseNotTunnelable
	// CauseTunnelDown: the tunnel could not carry the connection (no
	// source SVID, dial, handshake or request failure, the destination
	// node could not reach its pod, or a malformed request).
	CauseTunnelDown
	// CausePolicy: the destination's ingress policy refused the
	// verified peer (403).
	CausePolicy
)

func (c Cause) String() string {
	switch c {
	case CauseNotTunnelable:
		return "not_tunnelable"
	case CauseTunnelDown:
		return "tunnel_down"
	case CausePolicy:
		return "policy"
	}
	return "none"
}

// causeOfStatus is the cause of a CONNECT answered with status.
func causeOfStatus(status int) Cause {
	switch status {
	case http.StatusForbidden:
		return CausePolicy
	case http.StatusMisdirectedRequest:
		return CauseNotTunnelable
	}
	return CauseTunnelDown
}

// Side says which end of the tunnel reports an Event.
type Side uint8

const (
	// SideSource is the node of the connecting pod (Forward).
	SideSource Side = iota + 1
	// SideDestination is the node of the destination pod (HBONE server).
	SideDestination
)

func (s Side) String() string {
	if s == SideSource {
		return "source"
	}
	return "destination"
}

// Event is one report of the tunnel.
type Event struct {
	Kind EventKind
	Side Side
	Time time.Time
	// Src and Dst are the pod connection's addresses (Src as claimed on
	// the destination side); Node is the peer node's tunnel endpoint
	// (source side) or the client node's address (destination side).
	Src, Dst netip.AddrPort
	Node     netip.AddrPort
	// SrcID is the source's SPIFFE ID (verified on the destination
	// side), DstID the destination's.
	SrcID, DstID spiffeid.ID
	// Identity is the numeric identity the destination judged the
	// connection as (destination side).
	Identity identity.NumericID
	Decision policy.Decision
	// Reason says why a connection was refused or failed; Status is the
	// HTTP status of a refused CONNECT.
	Reason string
	Status int
	Err    error
	// Cause sorts an EventRefused's reason.
	Cause Cause
	// Sent and Received count the pod connection's bytes (from and to
	// the pod on the source side; to and from the pod on the destination
	// side), on EventClosed.
	Sent, Received uint64
	// Reused says that a pooled TLS connection carried the stream.
	Reused bool
}

// Stats are counters since New.
type Stats struct {
	Forwarded         uint64 // pod connections given to Forward
	Refused           uint64 // refused at the source (not tunnelled)
	RejectedByPeer    uint64 // CONNECT answered with a non-2xx status
	DialFailures      uint64 // TCP or TLS connect to a peer node failed
	HandshakeFailures uint64 // inbound handshakes that failed, or presented no usable client certificate
	NotFromNode       uint64 // inbound connections closed before TLS: not from a node's address
	HandshakesShed    uint64 // inbound connections closed before TLS: too many handshakes in progress
	InboundAccepted   uint64 // inbound handshakes that succeeded
	PoolDials         uint64 // outbound TLS connections opened
	PoolReuses        uint64 // streams carried by an existing TLS connection
	PoolConns         int    // open outbound TLS connections
	InboundConns      int    // open inbound TLS connections
	ActiveOutbound    int64  // tunnelled pod connections in progress (source side)
	ActiveInbound     int64  // CONNECT streams in progress (destination side)
	Admitted          uint64 // CONNECTs admitted
	Denied            uint64 // CONNECTs refused (policy, wrong target, dial error)
	BytesOut          uint64 // bytes from local pods into the tunnel
	BytesIn           uint64 // bytes from the tunnel to local pods (source side)
	// KernelTLS says whether the kernel offers TCP_ULP "tls"; the tunnel
	// uses user-space TLS either way today, KernelTLSReason says why.
	KernelTLS       bool
	KernelTLSReason string
}

// Tunnel is a node's tunnel endpoint.
type Tunnel struct {
	cfg  Config
	log  *slog.Logger
	bufs *bufPool
	// rbufs and wbufs are batchConn's read and write buffers.
	rbufs, wbufs *sync.Pool

	self     netip.AddrPort // where local destinations are dialed, set by Run
	ready    chan struct{}
	hbone    net.Addr
	redirect net.Addr

	pool    *pool
	inbound *inboundSet

	ktls       bool
	ktlsReason string

	forwarded, refused, rejected, dialFail, hsFail, dials, reuses atomic.Uint64
	admitted, denied, bytesOut, bytesIn, accepted                 atomic.Uint64
	notNode, shed                                                 atomic.Uint64
	// handshakes holds a slot per inbound handshake in progress.
	handshakes          chan struct{}
	activeOut, activeIn atomic.Int64

	// runCtx ends the connections Run serves; set before ready closes.
	runMu  sync.Mutex
	runCtx context.Context
}

// New checks cfg and returns a Tunnel that Run serves.
func New(cfg Config) (*Tunnel, error) {
	if cfg.Directory == nil || cfg.Identities == nil || cfg.Datapath == nil {
		return nil, errors.New("new tunnel: directory, identities and datapath are required")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("new tunnel: trust domain is empty")
	}
	if cfg.ListenAddr == "" {
		cfg.ListenAddr = DefaultListenAddr
	}
	if cfg.RedirectAddr == "" {
		cfg.RedirectAddr = DefaultRedirectAddr
	}
	if cfg.PeerPort == 0 {
		cfg.PeerPort = DefaultPeerPort
	}
	if cfg.MaxPendingHandshakes <= 0 {
		cfg.MaxPendingHandshakes = DefaultMaxPendingHandshakes
	}
	if _, _, err := net.SplitHostPort(cfg.ListenAddr); err != nil {
		return nil, fmt.Errorf("new tunnel: listen address %q: %w", cfg.ListenAddr, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Tunnel{
		cfg:        cfg,
		log:        log,
		bufs:       newBufPool(),
		rbufs:      newReadBufPool(),
		wbufs:      newWriteBufPool(),
		ready:      make(chan struct{}),
		inbound:    newInboundSet(),
		handshakes: make(chan struct{}, cfg.MaxPendingHandshakes),
	}
	t.pool = newPool(t)
	t.ktls, t.ktlsReason = probeKernelTLS()
	return t, nil
}

// Ready is closed once Run has opened its listeners.
func (t *Tunnel) Ready() <-chan struct{} { return t.ready }

// ListenAddr is the bound HBONE listener address, after Ready.
func (t *Tunnel) ListenAddr() net.Addr { return t.hbone }

// RedirectListenAddr is the bound transparent listener address, after
// Ready (nil with RedirectNone).
func (t *Tunnel) RedirectListenAddr() net.Addr { return t.redirect }

// Run opens both listeners, registers the transparent one with the
// datapath, and serves until ctx ends. On return every listener and
// connection is closed and the datapath registration is cleared.
func (t *Tunnel) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var lc net.ListenConfig
	hl, err := lc.Listen(ctx, "tcp", t.cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("tunnel: listen %s: %w", t.cfg.ListenAddr, err)
	}
	t.hbone = hl.Addr()
	t.self = selfAddr(hl.Addr())

	var rl net.Listener
	if t.cfg.RedirectAddr != RedirectNone {
		rl, err = listenTransparent(ctx, t.cfg.RedirectAddr)
		if err != nil {
			hl.Close()
			return err
		}
		t.redirect = rl.Addr()
		sc, ok := rl.(syscall.Conn)
		if !ok {
			hl.Close()
			rl.Close()
			return errors.New("tunnel: transparent listener has no raw socket")
		}
		if err := t.cfg.Datapath.SetTunnelListener(sc); err != nil {
			hl.Close()
			rl.Close()
			return fmt.Errorf("tunnel: register transparent listener: %w", err)
		}
	}
	t.runMu.Lock()
	t.runCtx = ctx
	t.runMu.Unlock()
	t.log.Info("tunnel listening", "hbone", t.hbone.String(), "redirect", t.cfg.RedirectAddr,
		"kernel_tls", t.ktls, "kernel_tls_reason", t.ktlsReason)
	close(t.ready)

	var wg sync.WaitGroup
	wg.Go(func() {
		t.acceptLoop(ctx, hl, "hbone", func(c net.Conn) { t.serveConn(ctx, c) })
	})
	if rl != nil {
		// The accepted socket's local address is the original
		// destination (bpf_sk_assign).
		wg.Go(func() {
			t.acceptLoop(ctx, rl, "redirected", func(c net.Conn) {
				t.Forward(c, addrPortOf(c.RemoteAddr()), addrPortOf(c.LocalAddr()))
			})
		})
	}
	<-ctx.Done()
	hl.Close()
	var clearErr error
	if rl != nil {
		if err := t.cfg.Datapath.ClearTunnelListener(); err != nil {
			clearErr = fmt.Errorf("tunnel: clear transparent listener: %w", err)
		}
		rl.Close()
	}
	t.pool.closeAll()
	t.inbound.closeAll()
	wg.Wait()
	return clearErr
}

// acceptLoop serves each connection l accepts on its own goroutine until
// ctx ends, and waits for them. An accept error (EMFILE) is logged and
// retried after a pause rather than ending the listener.
func (t *Tunnel) acceptLoop(ctx context.Context, l net.Listener, what string, serve func(net.Conn)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			t.log.Warn("tunnel: accept "+what+" connection", "err", err)
			if !sleepCtx(ctx, 50*time.Millisecond) {
				return
			}
			continue
		}
		wg.Go(func() { serve(c) })
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// selfAddr is where this node's own HBONE listener is dialed: its bound
// address, loopback of its family when it is bound to the unspecified one.
func selfAddr(bound net.Addr) netip.AddrPort {
	b := addrPortOf(bound)
	a := b.Addr()
	switch {
	case a.IsUnspecified() && a.Is4():
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case a.IsUnspecified():
		a = netip.IPv6Loopback()
	}
	return netip.AddrPortFrom(a, b.Port())
}

// peerAddr is the tunnel endpoint that serves pod dst.
func (t *Tunnel) peerAddr(dst Pod) (netip.AddrPort, bool) {
	if dst.Local() || (dst.Node.IsValid() && dst.Node == t.self.Addr()) {
		return t.self, true
	}
	if !dst.Node.IsValid() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(dst.Node.Unmap(), t.cfg.PeerPort), true
}

func (t *Tunnel) emit(e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	if t.cfg.OnEvent != nil {
		t.cfg.OnEvent(e)
	}
}

// Revoke is called when the pod's SVID was withdrawn or replaced: pooled
// connections that authenticated with a previous SVID of the pod (client
// side) and inbound connections served with one (server side) are closed.
// Connections using the pod's current SVID stay.
func (t *Tunnel) Revoke(podKey string) {
	cur, ok := t.cfg.Identities.SVID(podKey)
	stale := func(id, serial string) bool {
		return !ok || cur.ID.String() != id || serialOf(cur) != serial
	}
	n := t.pool.revoke(podKey, stale)
	m := t.inbound.revoke(podKey, stale)
	if n+m > 0 {
		t.log.Info("tunnel: closed connections of a revoked svid", "pod", podKey, "outbound", n, "inbound", m)
	}
}

func serialOf(s *x509svid.SVID) string {
	if s == nil || len(s.Certificates) == 0 {
		return ""
	}
	return s.Certificates[0].SerialNumber.Text(16)
}

// Stats returns the counters.
func (t *Tunnel) Stats() Stats {
	return Stats{
		Forwarded:         t.forwarded.Load(),
		Refused:           t.refused.Load(),
		RejectedByPeer:    t.rejected.Load(),
		DialFailures:      t.dialFail.Load(),
		HandshakeFailures: t.hsFail.Load(),
		NotFromNode:       t.notNode.Load(),
		HandshakesShed:    t.shed.Load(),
		InboundAccepted:   t.accepted.Load(),
		PoolDials:         t.dials.Load(),
		PoolReuses:        t.reuses.Load(),
		PoolConns:         t.pool.size(),
		InboundConns:      t.inbound.size(),
		ActiveOutbound:    t.activeOut.Load(),
		ActiveInbound:     t.activeIn.Load(),
		Admitted:          t.admitted.Load(),
		Denied:            t.denied.Load(),
		BytesOut:          t.bytesOut.Load(),
		BytesIn:           t.bytesIn.Load(),
		KernelTLS:         t.ktls,
		KernelTLSReason:   t.ktlsReason,
	}
}

// authority is the CONNECT target, IPv6 in brackets.
func authority(ap netip.AddrPort) string {
	return net.JoinHostPort(ap.Addr().Unmap().String(), strconv.Itoa(int(ap.Port())))
}
