//lint:file-ignore SA1019 the interop test serves with x/net/http2's per-connection server (ServeConn), which net/http has no equivalent of for an existing connection.

package tunnel

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// tcpPair is a connected pair of loopback TCP sockets, closed at cleanup.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := l.Accept()
		ch <- res{c, err}
	}()
	a, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { a.Close(); r.c.Close() })
	return a, r.c
}

// h2Pair runs an HBONE server with handler on one end of a loopback TCP
// connection (no TLS: the framing is what is tested) and returns the
// client on the other.
func h2Pair(t testing.TB, handler func(*h2Stream)) *h2Conn {
	t.Helper()
	a, b := tcpPair(t)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = h2Serve(b, nil, handler)
	}()
	c, err := h2Dial(a, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.close(nil)
		b.Close()
		<-served
	})
	return c
}

// socketEcho serves a stream as the tunnel's destination side does, with
// a pod that echoes what it reads (or, with stall, never reads).
func socketEcho(t testing.TB, stall bool) func(*h2Stream) {
	return func(s *h2Stream) {
		x, y := tcpPair(t)
		s.setOnAbort(func() { reset(x) })
		if !stall {
			go func() {
				_, _ = io.Copy(y, y)
				_ = y.(*net.TCPConn).CloseWrite()
			}()
		}
		done := make(chan error, 1)
		go func() {
			_, err := s.pipeTo(x)
			if err == nil {
				_ = x.(*net.TCPConn).CloseWrite()
			}
			done <- err
		}()
		if err := s.respond(http.StatusOK); err != nil {
			return
		}
		bp := newBufPool()
		if _, err := bp.sendFrom(s, x, nil); err != nil {
			s.cancel(http2.ErrCodeConnect)
			return
		}
		<-done
	}
}

// roundTrip sends payload on a new stream of c from a local socket and
// returns what came back, as the source side's Forward does.
func roundTrip(t testing.TB, c *h2Conn, payload []byte) ([]byte, error) {
	if !c.reserve() {
		return nil, fmt.Errorf("connection takes no stream")
	}
	s, err := c.open("127.0.0.1:80", "127.0.0.1")
	if err != nil {
		return nil, err
	}
	pod, side := tcpPair(t)
	s.setOnAbort(func() { reset(side) })
	bp := newBufPool()
	sendErr := make(chan error, 1)
	go func() {
		_, err := bp.sendFrom(s, side, nil)
		sendErr <- err
	}()
	go func() {
		_, _ = pod.Write(payload)
		_ = pod.(*net.TCPConn).CloseWrite()
	}()
	if st, err := s.response(nil); err != nil || st != http.StatusOK {
		return nil, fmt.Errorf("response %d: %v", st, err)
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(pod)
		got <- b
	}()
	if _, err := s.pipeTo(side); err != nil {
		return nil, fmt.Errorf("pipe: %w", err)
	}
	_ = side.(*net.TCPConn).CloseWrite()
	if err := <-sendErr; err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	return <-got, nil
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// Many streams moving large payloads both ways at once on one connection:
// nothing deadlocks (each side's read loop keeps reading while its
// writers wait for socket space), and every byte arrives in order.
func TestH2BidirectionalBulkOnManyStreams(t *testing.T) {
	c := h2Pair(t, socketEcho(t, false))
	const streams, size = 8, 6 << 20
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Go(func() {
			payload := randomBytes(size+i, uint64(i))
			got, err := roundTrip(t, c, payload)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if sha256.Sum256(got) != sha256.Sum256(payload) {
				errs <- fmt.Errorf("stream %d: got %d bytes back, sent %d, or they differ", i, len(got), len(payload))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Streams that ended cleanly are forgotten; their bytes went back to
	// the connection's window.
	waitFor(t, "streams to be forgotten", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.streams) == 0
	})
}

// A destination pod that stops reading stalls its own stream only: its
// bytes wait within the stream's window, and another stream on the same
// connection still moves.
func TestH2StalledPodBlocksOnlyItsStream(t *testing.T) {
	stall := make(chan bool, 1)
	stall <- true
	c := h2Pair(t, func(s *h2Stream) {
		select {
		case <-stall:
			socketEcho(t, true)(s)
		default:
			socketEcho(t, false)(s)
		}
	})
	if !c.reserve() {
		t.Fatal("no stream")
	}
	s, err := c.open("127.0.0.1:80", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	// Fill the stalled pod's socket and the stream's window: the sender
	// blocks on flow control, not the connection.
	pod, side := tcpPair(t)
	s.setOnAbort(func() { reset(side) })
	go func() { _, _ = newBufPool().sendFrom(s, side, nil) }()
	go func() { _, _ = pod.Write(make([]byte, 3*streamWindow)) }()
	waitFor(t, "the stalled stream to run out of window", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return s.sendWindow <= 0
	})
	payload := randomBytes(1<<20, 7)
	got, err := roundTrip(t, c, payload)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("second stream: got %d bytes, want %d", len(got), len(payload))
	}
	s.cancel(http2.ErrCodeCancel)
}

// Our client speaks HTTP/2 as x/net's server understands it (and the
// tests that dial our server with x/net's client cover the other way).
func TestH2ClientInteroperatesWithXNetServer(t *testing.T) {
	a, b := tcpPair(t)
	srv := &http2.Server{}
	go srv.ServeConn(b, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect || r.Host != "127.0.0.1:80" || r.Header.Get(SourceHeader) != "127.0.0.1" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})})
	c, err := h2Dial(a, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close(nil)
	for i := range 3 {
		payload := randomBytes(3<<20, uint64(100+i))
		got, err := roundTrip(t, c, payload)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("round trip %d: got %d bytes, want %d", i, len(got), len(payload))
		}
	}
}

// A peer that sends more than the stream's window it was given gets the
// stream reset with FLOW_CONTROL_ERROR, rather than growing this side's
// queue for a pod that does not read without bound.
func TestH2WindowOverrunResetsTheStream(t *testing.T) {
	a, b := tcpPair(t)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = h2Serve(b, nil, socketEcho(t, true))
	}()
	fr := http2.NewFramer(a, a)
	_, _ = io.WriteString(a, http2.ClientPreface)
	_ = fr.WriteSettings()
	var hbuf bytes.Buffer
	enc := newHeaderEncoder(&hbuf)
	enc("CONNECT", "127.0.0.1:80", "127.0.0.1")
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hbuf.Bytes(), EndHeaders: true})
	chunk := make([]byte, 16<<10)
	go func() {
		for range (connWindow + streamWindow) / len(chunk) {
			if fr.WriteData(1, false, chunk) != nil {
				return
			}
		}
	}()
	_ = a.SetReadDeadline(time.Now().Add(30 * time.Second))
	var code http2.ErrCode = 0xff
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			code = g.ErrCode
			break
		}
		if r, ok := f.(*http2.RSTStreamFrame); ok && r.StreamID == 1 {
			code = r.ErrCode
			break
		}
	}
	if code != http2.ErrCodeFlowControl {
		t.Fatalf("error code %v, want FLOW_CONTROL_ERROR", code)
	}
	a.Close()
	<-served
}

// FuzzH2Server feeds arbitrary frames to the server side after a valid
// preface: it must neither panic nor hang.
func FuzzH2Server(f *testing.F) {
	var seed bytes.Buffer
	fr := http2.NewFramer(&seed, nil)
	var hbuf bytes.Buffer
	newHeaderEncoder(&hbuf)("CONNECT", "127.0.0.1:80", "127.0.0.1")
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hbuf.Bytes(), EndHeaders: true})
	_ = fr.WriteData(1, false, []byte("hello"))
	_ = fr.WriteWindowUpdate(0, 1000)
	_ = fr.WritePing(false, [8]byte{1})
	_ = fr.WriteData(1, true, nil)
	_ = fr.WriteRSTStream(3, http2.ErrCodeCancel)
	_ = fr.WriteGoAway(1, http2.ErrCodeNo, nil)
	f.Add(seed.Bytes())
	f.Add([]byte{0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := tcpPair(t)
		served := make(chan struct{})
		go func() {
			defer close(served)
			_ = h2Serve(b, nil, socketEcho(t, false))
		}()
		go func() { _, _ = io.Copy(io.Discard, a) }()
		var pre bytes.Buffer
		pre.WriteString(http2.ClientPreface)
		_ = http2.NewFramer(&pre, nil).WriteSettings()
		pre.Write(data)
		_, _ = a.Write(pre.Bytes())
		_ = a.(*net.TCPConn).CloseWrite()
		select {
		case <-served:
		case <-time.After(20 * time.Second):
			t.Fatal("server still running 20 s after its input ended")
		}
	})
}

// newHeaderEncoder returns a function that encodes a CONNECT request's
// header block into buf, as a client would.
func newHeaderEncoder(buf *bytes.Buffer) func(method, authority, source string) {
	enc := hpack.NewEncoder(buf)
	return func(method, authority, source string) {
		_ = enc.WriteField(hpack.HeaderField{Name: ":method", Value: method})
		_ = enc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
		_ = enc.WriteField(hpack.HeaderField{Name: sourceField, Value: source})
	}
}

// A peer that opens streams and resets them at once (rapid reset) cannot
// make the server run more than maxStreamsPerTLS handlers: the streams
// beyond are refused.
func TestH2RapidResetBoundsHandlers(t *testing.T) {
	a, b := tcpPair(t)
	release := make(chan struct{})
	var running, peak atomic.Int32
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = h2Serve(b, nil, func(s *h2Stream) {
			n := running.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			<-release
			running.Add(-1)
		})
	}()
	defer func() { close(release); a.Close(); <-served }()
	fr := http2.NewFramer(a, a)
	_, _ = io.WriteString(a, http2.ClientPreface)
	_ = fr.WriteSettings()
	var hbuf bytes.Buffer
	enc := newHeaderEncoder(&hbuf)
	const opened = 3 * maxStreamsPerTLS
	go func() {
		for i := range opened {
			id := uint32(2*i + 1)
			hbuf.Reset()
			enc("CONNECT", "127.0.0.1:80", "127.0.0.1")
			if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hbuf.Bytes(), EndHeaders: true}) != nil ||
				fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	_ = a.SetReadDeadline(time.Now().Add(30 * time.Second))
	refused := 0
	for refused < opened-maxStreamsPerTLS {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %d refusals: %v", refused, err)
		}
		if r, ok := f.(*http2.RSTStreamFrame); ok && r.ErrCode == http2.ErrCodeRefusedStream {
			refused++
		}
	}
	if p := peak.Load(); p > maxStreamsPerTLS {
		t.Fatalf("%d handlers ran at once, want at most %d", p, maxStreamsPerTLS)
	}
}
