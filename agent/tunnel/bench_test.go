package tunnel

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

const benchChunk = 256 << 10

// podSide hands pod connections to a tunnel as the transparent listener
// would: the pod dials a loopback listener, whose accepted end goes to
// Forward. That hop stands for the pod's veth into the node.
type podSide struct {
	l   net.Listener
	tun *Tunnel
	wg  sync.WaitGroup
}

func newPodSide(b *testing.B, tun *Tunnel) *podSide {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ps := &podSide{l: l, tun: tun}
	b.Cleanup(func() { l.Close(); ps.wg.Wait() })
	return ps
}

func (ps *podSide) dial(b *testing.B, src, dst netip.AddrPort) net.Conn {
	c, err := net.Dial("tcp", ps.l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	side, err := ps.l.Accept()
	if err != nil {
		b.Fatal(err)
	}
	ps.wg.Go(func() { ps.tun.Forward(side, src, dst) })
	return c
}

// serveSink reads and counts everything sent to it.
func serveSink(b *testing.B, ip netip.Addr, got *atomic.Int64) netip.AddrPort {
	return serveTCP(b, ip, func(c net.Conn) {
		buf := make([]byte, benchChunk)
		for {
			n, err := c.Read(buf)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
}

func bulk(b *testing.B, c net.Conn, got *atomic.Int64) {
	buf := make([]byte, benchChunk)
	for i := range buf {
		buf[i] = byte(i)
	}
	start := got.Load()
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	want := start + int64(b.N)*benchChunk
	for got.Load() < want {
		time.Sleep(50 * time.Microsecond)
	}
	b.StopTimer()
}

// BenchmarkTLSOnlyLoopback is the limit the tunnel is measured against:
// one crypto/tls connection over loopback, with the same TLS 1.3 settings
// and SVIDs as the tunnel, carrying bulk bytes with no proxying.
func BenchmarkTLSOnlyLoopback(b *testing.B) {
	w := newWorld(b)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	var got atomic.Int64
	srvCfg := &tls.Config{MinVersion: tls.VersionTLS13, DynamicRecordSizingDisabled: true}
	tlsconfig.HookMTLSServerConfig(srvCfg, w.svidB, w.b.ids.bundles, tlsconfig.AuthorizeAny())
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(c, srvCfg)
		defer tc.Close()
		buf := make([]byte, benchChunk)
		for {
			n, err := tc.Read(buf)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	cliCfg := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: serverName(podB), DynamicRecordSizingDisabled: true}
	tlsconfig.HookMTLSClientConfig(cliCfg, w.svidA, w.a.ids.bundles, tlsconfig.AuthorizeID(w.svidB.ID))
	c, err := tls.Dial("tcp", l.Addr().String(), cliCfg)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.Logf("cipher suite %s", tls.CipherSuiteName(c.ConnectionState().CipherSuite))
	bulk(b, c, &got)
}

// BenchmarkTunnelLoopback moves bulk bytes from pod A through node A's and
// node B's tunnels to a sink in pod B: pod -> Forward -> HTTP/2 over TLS ->
// HBONE server -> pod.
func BenchmarkTunnelLoopback(b *testing.B) {
	w := newWorld(b)
	var got atomic.Int64
	sink := serveSink(b, podB, &got)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	c := ps.dial(b, srcA(50000), sink)
	defer c.Close()
	bulk(b, c, &got)
	if w.a.tun.Stats().PoolDials != 1 {
		b.Fatal("no tunnel")
	}
	w.a.tun.pool.mu.Lock()
	for _, e := range w.a.tun.pool.m {
		b.Logf("cipher suite %s", tls.CipherSuiteName(e.conns[0].tls.ConnectionState().CipherSuite))
	}
	w.a.tun.pool.mu.Unlock()
}

// BenchmarkPlainLoopback is the plaintext reference: the same bytes pod to
// pod over loopback, no tunnel.
func BenchmarkPlainLoopback(b *testing.B) {
	var got atomic.Int64
	sink := serveSink(b, podB, &got)
	c, err := net.Dial("tcp", sink.String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	bulk(b, c, &got)
}

// connectRR is one connect plus a 1-byte request and response; it returns
// how long that took.
func connectRR(b *testing.B, dial func() net.Conn) time.Duration {
	start := time.Now()
	c := dial()
	var one [1]byte
	if _, err := c.Write(one[:]); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		b.Fatal(err)
	}
	d := time.Since(start)
	c.Close()
	return d
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkTunnelConnectWarm: a new pod connection over a pooled TLS
// connection (no handshake), with one 1-byte exchange.
func BenchmarkTunnelConnectWarm(b *testing.B) {
	w := newWorld(b)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	dial := func() net.Conn { return ps.dial(b, srcA(50001), w.echo) }
	connectRR(b, dial)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		lat = append(lat, connectRR(b, dial))
	}
	b.StopTimer()
	if st := w.a.tun.Stats(); st.PoolDials != 1 {
		b.Fatalf("warm connections dialed: %+v", st)
	}
	reportLatency(b, lat)
}

// BenchmarkTunnelConnectCold: every connection pays a TLS handshake (the
// pool is emptied before each).
func BenchmarkTunnelConnectCold(b *testing.B) {
	w := newWorld(b)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	dial := func() net.Conn { return ps.dial(b, srcA(50002), w.echo) }
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		w.a.tun.pool.closeAll()
		lat = append(lat, connectRR(b, dial))
	}
	b.StopTimer()
	if st := w.a.tun.Stats(); st.PoolDials != uint64(b.N) {
		b.Fatalf("cold connections: %d dials for %d", st.PoolDials, b.N)
	}
	reportLatency(b, lat)
}

// BenchmarkPlainConnect is the reference for the connect benchmarks: the
// same connect and exchange straight to the echo server.
func BenchmarkPlainConnect(b *testing.B) {
	echo := serveEcho(b, podB)
	dial := func() net.Conn {
		c, err := net.Dial("tcp", echo.String())
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		lat = append(lat, connectRR(b, dial))
	}
	b.StopTimer()
	reportLatency(b, lat)
}

// BenchmarkTunnelIdleConnMemory opens idleConns tunnelled connections that
// exchange one byte and then sit idle, and reports the Go heap they hold
// per connection (both nodes' tunnels, which share this process).
func BenchmarkTunnelIdleConnMemory(b *testing.B) {
	const idleConns = 500
	w := newWorld(b)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	connectRR(b, func() net.Conn { return ps.dial(b, srcA(50003), w.echo) })
	for range b.N {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		conns := make([]net.Conn, 0, idleConns)
		for range idleConns {
			c := ps.dial(b, srcA(50004), w.echo)
			var one [1]byte
			if _, err := c.Write(one[:]); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, one[:]); err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/idleConns/1024, "heap-KiB/conn")
		b.ReportMetric(float64(runtime.NumGoroutine())/idleConns, "goroutines/conn")
		for _, c := range conns {
			c.Close()
		}
	}
}

// serveSource sends bulk bytes to every connection until it closes.
func serveSource(b *testing.B, ip netip.Addr) netip.AddrPort {
	return serveTCP(b, ip, func(c net.Conn) {
		buf := make([]byte, benchChunk)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
}

// BenchmarkTunnelLoopbackDownload is BenchmarkTunnelLoopback the other
// way: pod B sends, through the destination node's HTTP/2 server side.
func BenchmarkTunnelLoopbackDownload(b *testing.B) {
	w := newWorld(b)
	src := serveSource(b, podB)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	c := ps.dial(b, srcA(50005), src)
	defer c.Close()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for range b.N {
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
}

// rr1K sends 1 KiB requests on c and reads 1 KiB answers, b.N times, and
// reports the latency percentiles.
func rr1K(b *testing.B, c net.Conn) {
	req, resp := make([]byte, 1024), make([]byte, 1024)
	lat := make([]time.Duration, 0, b.N)
	for range 100 {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	for _, q := range []int{50, 90, 99} {
		b.ReportMetric(float64(lat[len(lat)*q/100].Microseconds()), fmt.Sprintf("p%d-µs", q))
	}
}

// BenchmarkTunnelRR1K: request and response of 1 KiB each, one after the
// other, on one long-lived tunnelled connection.
func BenchmarkTunnelRR1K(b *testing.B) {
	w := newWorld(b)
	w.start(b)
	ps := newPodSide(b, w.a.tun)
	c := ps.dial(b, srcA(50006), w.echo)
	defer c.Close()
	rr1K(b, c)
}

// BenchmarkPlainRR1K is BenchmarkTunnelRR1K's reference, straight to the
// echo server.
func BenchmarkPlainRR1K(b *testing.B) {
	echo := serveEcho(b, podB)
	c, err := net.Dial("tcp", echo.String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	rr1K(b, c)
}

// relay is the floor of any user-space tunnel with this one's shape: a
// TCP relay that dials next for every connection it accepts and copies
// both ways (io.Copy between TCP sockets splices in the kernel), with no
// crypto and no framing.
func relay(b *testing.B, ip netip.Addr, next netip.AddrPort) netip.AddrPort {
	return serveTCP(b, ip, func(c net.Conn) {
		n, err := net.Dial("tcp", next.String())
		if err != nil {
			return
		}
		defer n.Close()
		done := make(chan struct{})
		go func() {
			_, _ = io.Copy(n, c)
			_ = n.(*net.TCPConn).CloseWrite()
			close(done)
		}()
		_, _ = io.Copy(c, n)
		_ = c.(*net.TCPConn).CloseWrite()
		<-done
	})
}

// BenchmarkRelayRR1K is BenchmarkTunnelRR1K through two plain relays
// (pod -> relay A -> relay B -> echo): what the hops alone cost.
func BenchmarkRelayRR1K(b *testing.B) {
	echo := serveEcho(b, podB)
	c, err := net.Dial("tcp", relay(b, podA, relay(b, podB, echo)).String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	rr1K(b, c)
}

// BenchmarkRelayLoopback is BenchmarkTunnelLoopback through two plain
// relays.
func BenchmarkRelayLoopback(b *testing.B) {
	var got atomic.Int64
	sink := serveSink(b, podB, &got)
	c, err := net.Dial("tcp", relay(b, podA, relay(b, podB, sink)).String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	bulk(b, c, &got)
}
