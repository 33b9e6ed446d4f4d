package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"golang.org/x/sys/unix"
)

// HBONE's framing: HTTP/2 (RFC 9113) CONNECT streams over one mutual-TLS
// connection, with x/net/http2's Framer and hpack for the wire format.
//
// x/net/http2's own client and server move every DATA frame between
// goroutines: the server's read loop hands frames to its serve loop, which
// hands them to the handler through a pipe, and the handler's writes go
// back through the serve loop to a frame-writing goroutine; the client's
// read loop hands response bytes over a pipe too. On two vCPUs those
// handoffs cost more than the crypto for small messages (they were most
// of the +0.61 ms added p99 at 1,000 req/s) and a good part of the bulk
// throughput. h2Conn speaks the same protocol (flow control, SETTINGS,
// PING, GOAWAY, RST_STREAM) without a handoff on the common path:
//   - a stream's sender, the goroutine that reads the plaintext socket,
//     writes its DATA frames itself under the connection's write lock,
//     straight from its read buffer (the frame header is written in front
//     of the bytes the read returned), so one read is one TLS write;
//   - the connection's read loop writes a DATA frame's payload to the
//     receiving socket itself, with one non-blocking write, and queues
//     for the stream's writer only what the socket did not take at once.
//
// The read loop never waits for a write: if it did, two endpoints
// sending to each other with full socket buffers would each wait for the
// other to read. Its control frames (SETTINGS and PING acks,
// WINDOW_UPDATE, RST_STREAM, GOAWAY) go to a queue, flushed by whoever
// holds the write lock next, and by the connection's control writer when
// nobody does. Flow control bounds what a stream may queue: the peer may
// not send more than the window this side advertised.

// Tuning: large frames, so that one DATA frame carries what one read from
// a socket returned, and windows large enough that a stream never stalls
// on WINDOW_UPDATE round trips at loopback or LAN latencies.
const (
	frameHeaderLen   = 9
	maxFrameSize     = 256 << 10
	streamWindow     = 4 << 20
	connWindow       = 64 << 20
	maxStreamsPerTLS = 1000
	maxHeaderList    = 16 << 10
	idleConnTimeout  = 5 * time.Minute
	readIdleTimeout  = 30 * time.Second
	pingTimeout      = 15 * time.Second
	// initialWindow is HTTP/2's window before SETTINGS say otherwise.
	initialWindow = 65535
	// maxWindow is the largest flow-control window HTTP/2 allows.
	maxWindow = 1<<31 - 1
)

// sourceField is SourceHeader as HTTP/2 carries it (lower case).
var sourceField = strings.ToLower(SourceHeader)

var (
	// errConnClosed ends the streams of a connection that closed.
	errConnClosed = errors.New("hbone: connection closed")
	// errUnprocessed: the peer says it did not process the stream
	// (GOAWAY below its ID, REFUSED_STREAM), so it may be retried.
	errUnprocessed = errors.New("hbone: stream not processed by the peer")
)

// resetError is a stream ended by RST_STREAM, from the peer or from here.
type resetError struct {
	code   http2.ErrCode
	remote bool
}

func (e resetError) Error() string {
	if e.remote {
		return "hbone: stream reset by peer: " + e.code.String()
	}
	return "hbone: stream reset: " + e.code.String()
}

// h2Conn is one HBONE connection, client or server side.
type h2Conn struct {
	conn   net.Conn   // the TLS connection
	raw    *batchConn // under conn: batches its records into few socket writes (nil: none)
	server bool
	rfr    *http2.Framer // the read loop's

	// Writes: one frame sequence at a time, batched into few socket
	// writes by raw.
	wmu  sync.Mutex
	wfr  *http2.Framer // writes to conn, under wmu
	henc *hpack.Encoder
	hbuf bytes.Buffer
	werr error // sticky, under wmu

	// Control frames from the read loop, under qmu.
	qmu      sync.Mutex
	qbuf     bytes.Buffer
	qspare   []byte
	qfr      *http2.Framer // writes to qbuf
	qwake    chan struct{}
	qpending atomic.Bool

	mu          sync.Mutex
	cond        sync.Cond // send windows, stream ends, close
	streams     map[uint32]*h2Stream
	nextID      uint32 // client: the next stream's ID
	lastPeerID  uint32 // server: the highest stream ID the peer opened
	sendWindow  int64  // connection send window
	recvWindow  int64  // what the peer may still send on the connection
	recvUnacked int64  // consumed and not yet returned by WINDOW_UPDATE
	peerInit    int64  // the peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame   int    // the peer's SETTINGS_MAX_FRAME_SIZE
	peerStreams int    // the peer's SETTINGS_MAX_CONCURRENT_STREAMS
	reserved    int    // client: streams promised by reserve
	goAway      bool
	noReuse     bool
	err         error // set once the connection closed
	idle        *time.Timer

	settings     chan struct{} // closed on the peer's first SETTINGS
	settingsOnce sync.Once
	lastRead     atomic.Int64 // unix nanoseconds of the last frame read
	pingSent     atomic.Int64
	health       *time.Timer
	done         chan struct{} // closed when the connection closed
	closeOnce    sync.Once
	onClose      func()

	// handler serves a new stream (server side), on its own goroutine;
	// handlers counts those running, reset streams' included.
	handler  func(*h2Stream)
	handlers atomic.Int32
}

func newH2Conn(conn net.Conn, raw *batchConn, server bool) *h2Conn {
	c := &h2Conn{
		conn:        conn,
		raw:         raw,
		server:      server,
		streams:     map[uint32]*h2Stream{},
		nextID:      1,
		sendWindow:  initialWindow,
		recvWindow:  connWindow,
		peerInit:    initialWindow,
		peerFrame:   16 << 10,
		peerStreams: maxStreamsPerTLS,
		qwake:       make(chan struct{}, 1),
		settings:    make(chan struct{}),
		done:        make(chan struct{}),
	}
	c.cond.L = &c.mu
	c.rfr = http2.NewFramer(nil, conn)
	c.rfr.SetReuseFrames()
	c.rfr.SetMaxReadFrameSize(maxFrameSize)
	c.rfr.MaxHeaderListSize = maxHeaderList
	c.rfr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.wfr = http2.NewFramer(conn, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.qfr = http2.NewFramer(&c.qbuf, nil)
	c.lastRead.Store(time.Now().UnixNano())
	return c
}

// start sends this side's preface and SETTINGS and starts the control
// writer and the health check; the caller then runs readLoop.
func (c *h2Conn) start() error {
	c.wmu.Lock()
	c.raw.begin()
	var err error
	if !c.server {
		_, err = io.WriteString(c.conn, http2.ClientPreface)
	}
	settings := []http2.Setting{
		{ID: http2.SettingMaxFrameSize, Val: maxFrameSize},
		{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
	}
	if c.server {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: maxStreamsPerTLS})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0},
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
	}
	if err == nil {
		err = c.wfr.WriteSettings(settings...)
	}
	if err == nil {
		err = c.wfr.WriteWindowUpdate(0, connWindow-initialWindow)
	}
	if ferr := c.raw.end(); err == nil {
		err = ferr
	}
	c.werr = err
	c.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("hbone: send settings: %w", err)
	}
	go c.controlWriter()
	c.health = time.AfterFunc(readIdleTimeout, c.checkHealth)
	return nil
}

// readPreface reads the client's connection preface (server side).
func (c *h2Conn) readPreface() error {
	buf := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c.conn, buf); err != nil {
		return fmt.Errorf("hbone: read client preface: %w", err)
	}
	if string(buf) != http2.ClientPreface {
		return errors.New("hbone: bad client preface")
	}
	return nil
}

// closed reports whether the connection has ended.
func (c *h2Conn) closed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// close ends the connection: every stream ends with err, the TLS
// connection is closed, and onClose runs.
func (c *h2Conn) close(err error) {
	c.closeOnce.Do(func() {
		if err == nil {
			err = errConnClosed
		}
		c.mu.Lock()
		c.err = err
		streams := make([]*h2Stream, 0, len(c.streams))
		for _, s := range c.streams {
			streams = append(streams, s)
		}
		clear(c.streams)
		if c.idle != nil {
			c.idle.Stop()
		}
		c.cond.Broadcast()
		c.mu.Unlock()
		if c.health != nil {
			c.health.Stop()
		}
		close(c.done)
		_ = c.conn.Close()
		for _, s := range streams {
			s.abort(fmt.Errorf("%w: %w", errConnClosed, err), false, 0)
		}
		if c.onClose != nil {
			c.onClose()
		}
	})
}

// shutdown says GOAWAY (when the write lock is free, so never waiting on
// a stuck peer) and closes.
func (c *h2Conn) shutdown(code http2.ErrCode, err error) {
	if c.wmu.TryLock() {
		if c.werr == nil {
			_ = c.conn.SetWriteDeadline(time.Now().Add(time.Second))
			c.mu.Lock()
			last := c.lastPeerID
			c.mu.Unlock()
			_ = c.wfr.WriteGoAway(last, code, nil)
		}
		c.wmu.Unlock()
	}
	c.close(err)
}

// lockWrite takes the write lock and opens a batch: everything written
// until unlockWrite leaves in as few socket writes as possible.
func (c *h2Conn) lockWrite() {
	c.wmu.Lock()
	c.raw.begin()
}

// unlockWrite writes the queued control frames, closes the batch and
// releases the write lock; control frames queued meanwhile are written
// by the next holder, or here again when the lock is free.
func (c *h2Conn) unlockWrite() {
	for {
		c.flushControlLocked()
		if err := c.raw.end(); err != nil && c.werr == nil {
			c.werr = err
		}
		werr := c.werr
		c.wmu.Unlock()
		if werr != nil {
			c.close(fmt.Errorf("hbone: write: %w", werr))
			return
		}
		if !c.qpending.Load() || !c.wmu.TryLock() {
			return
		}
		c.raw.begin()
	}
}

// flushControlLocked writes the queued control frames; wmu is held.
func (c *h2Conn) flushControlLocked() {
	if !c.qpending.Load() {
		return
	}
	c.qmu.Lock()
	b := c.qbuf.Bytes()
	out := append(c.qspare[:0], b...)
	c.qbuf.Reset()
	c.qpending.Store(false)
	c.qmu.Unlock()
	if c.werr == nil && len(out) > 0 {
		_, c.werr = c.conn.Write(out)
	}
	c.qspare = out[:0]
}

// maxControlQueue bounds the control frames waiting to be written: a
// peer that sends PINGs or SETTINGS faster than it reads the answers is
// disconnected rather than given memory.
const maxControlQueue = 1 << 20

// queue adds control frames (written by fn to qfr) without waiting for
// the write lock.
func (c *h2Conn) queue(fn func(*http2.Framer) error) {
	c.qmu.Lock()
	_ = fn(c.qfr) // writes to a bytes.Buffer: no error
	c.qpending.Store(true)
	over := c.qbuf.Len() > maxControlQueue
	c.qmu.Unlock()
	if over {
		// Not close itself: queue runs inside close (its streams'
		// resets), and close runs once.
		go c.close(errors.New("hbone: peer does not read its control frames"))
		return
	}
	select {
	case c.qwake <- struct{}{}:
	default:
	}
}

// controlWriter writes queued control frames when no stream's writer is
// about to.
func (c *h2Conn) controlWriter() {
	for {
		select {
		case <-c.done:
			return
		case <-c.qwake:
		}
		if c.qpending.Load() {
			c.lockWrite()
			c.unlockWrite()
		}
	}
}

// putFrameHeader writes a frame header into b[:frameHeaderLen].
func putFrameHeader(b []byte, length int, typ http2.FrameType, flags http2.Flags, stream uint32) {
	b[0], b[1], b[2] = byte(length>>16), byte(length>>8), byte(length)
	b[3], b[4] = byte(typ), byte(flags)
	binary.BigEndian.PutUint32(b[5:9], stream&(1<<31-1))
}

// checkHealth pings a connection that has been silent for
// readIdleTimeout, and closes it when the PING is not answered in
// pingTimeout: a peer that vanished (power loss, a cut link) must not hold
// pooled connections for the kernel's TCP timeouts.
func (c *h2Conn) checkHealth() {
	if c.closed() {
		return
	}
	now := time.Now()
	last := time.Unix(0, c.lastRead.Load())
	if sent := c.pingSent.Load(); sent != 0 {
		if last.UnixNano() < sent {
			c.close(errors.New("hbone: ping timeout"))
			return
		}
		c.pingSent.Store(0)
	}
	if idle := now.Sub(last); idle < readIdleTimeout {
		c.health.Reset(readIdleTimeout - idle)
		return
	}
	c.pingSent.Store(now.UnixNano())
	c.queue(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{'b', 'u', 'l', 'k'}) })
	c.health.Reset(pingTimeout)
}

// waitSettings waits for the peer's first SETTINGS: a client learns then
// that the server accepted its certificate (TLS 1.3 tells the client its
// handshake is done before the server has verified it).
func (c *h2Conn) waitSettings(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-c.settings:
		return nil
	case <-c.done:
		c.mu.Lock()
		err := c.err
		c.mu.Unlock()
		return err
	case <-t.C:
		return errors.New("hbone: no settings from the peer")
	}
}

// readLoop reads frames until the connection ends, and closes it.
func (c *h2Conn) readLoop() {
	err := c.readFrames()
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.shutdown(http2.ErrCode(ce), err)
		return
	}
	c.close(err)
}

func (c *h2Conn) readFrames() error {
	if c.server {
		if err := c.readPreface(); err != nil {
			return err
		}
	}
	first := true
	for {
		f, err := c.rfr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetStream(se.StreamID, se.Code)
				continue
			}
			if errors.Is(err, http2.ErrFrameTooLarge) {
				return http2.ConnectionError(http2.ErrCodeFrameSize)
			}
			return err
		}
		c.lastRead.Store(time.Now().UnixNano())
		if first {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			first = false
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			err = c.onData(f)
		case *http2.MetaHeadersFrame:
			err = c.onHeaders(f)
		case *http2.SettingsFrame:
			err = c.onSettings(f)
		case *http2.WindowUpdateFrame:
			err = c.onWindowUpdate(f)
		case *http2.PingFrame:
			if !f.IsAck() {
				data := f.Data
				c.queue(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
			}
		case *http2.RSTStreamFrame:
			c.onReset(f)
		case *http2.GoAwayFrame:
			c.onGoAway(f)
		case *http2.PushPromiseFrame:
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// PRIORITY and frame types this side does not know are ignored,
		// as RFC 9113 asks.
		if err != nil {
			return err
		}
	}
}

func (c *h2Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInit
			c.peerInit = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
			}
		case http2.SettingMaxFrameSize:
			c.peerFrame = int(s.Val)
		case http2.SettingMaxConcurrentStreams:
			c.peerStreams = int(min(s.Val, maxStreamsPerTLS))
		}
		return nil
	})
	c.cond.Broadcast()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.queue(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
	c.settingsOnce.Do(func() { close(c.settings) })
	return nil
}

func (c *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		c.sendWindow += inc
		if c.sendWindow > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		c.cond.Broadcast()
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil
	}
	s.sendWindow += inc
	if s.sendWindow > maxWindow {
		c.mu.Unlock()
		c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
		c.mu.Lock()
		return nil
	}
	c.cond.Broadcast()
	return nil
}

func (c *h2Conn) onReset(f *http2.RSTStreamFrame) {
	s := c.stream(f.StreamID)
	if s == nil {
		return
	}
	var err error = resetError{code: f.ErrCode, remote: true}
	if f.ErrCode == http2.ErrCodeRefusedStream {
		err = fmt.Errorf("%w: %w", errUnprocessed, err)
	}
	s.abort(err, false, 0)
}

func (c *h2Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAway = true
	var lost []*h2Stream
	for id, s := range c.streams {
		if !c.server && id > f.LastStreamID {
			lost = append(lost, s)
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	for _, s := range lost {
		s.abort(errUnprocessed, false, 0)
	}
}

// stream returns an open stream.
func (c *h2Conn) stream(id uint32) *h2Stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.streams[id]
}

// resetStream ends stream id from this side with code.
func (c *h2Conn) resetStream(id uint32, code http2.ErrCode) {
	if s := c.stream(id); s != nil {
		s.abort(resetError{code: code}, true, code)
		return
	}
	c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
}

func (c *h2Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if !c.server {
		s := c.stream(id)
		if s == nil {
			return nil
		}
		if s.answered.Load() {
			// Trailers: meaningless in CONNECT, but they may end the
			// stream.
			if f.StreamEnded() {
				s.recvEnded()
			}
			return nil
		}
		status, err := strconv.Atoi(f.PseudoValue("status"))
		if err != nil {
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
		if status >= 100 && status < 200 {
			return nil
		}
		s.gotResponse(status)
		if f.StreamEnded() {
			s.recvEnded()
		}
		return nil
	}
	c.mu.Lock()
	if id%2 == 0 || id <= c.lastPeerID {
		// A new stream must have a larger odd ID; a HEADERS on an open
		// stream (trailers) has no meaning in CONNECT.
		known := c.streams[id] != nil
		c.mu.Unlock()
		if known {
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.lastPeerID = id
	// Handlers of streams the peer reset early still run (a dial to the
	// pod may be in progress): they count too, so that opening and
	// resetting streams in a loop cannot start goroutines without bound.
	if c.goAway || c.err != nil || len(c.streams) >= maxStreamsPerTLS || c.handlers.Load() >= maxStreamsPerTLS {
		c.mu.Unlock()
		c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		return nil
	}
	s := newH2Stream(c, id)
	s.method = f.PseudoValue("method")
	s.authority = f.PseudoValue("authority")
	s.extended = f.PseudoValue("scheme") != "" || f.PseudoValue("path") != "" || f.PseudoValue("protocol") != ""
	for _, hf := range f.RegularFields() {
		if hf.Name == sourceField {
			s.source = hf.Value
		}
	}
	c.streams[id] = s
	c.stopIdleLocked()
	c.mu.Unlock()
	if f.StreamEnded() {
		s.recvEnded()
	}
	c.handlers.Add(1)
	go c.serveStream(s)
	return nil
}

// serveStream runs the handler; a stream it left open is reset.
func (c *h2Conn) serveStream(s *h2Stream) {
	defer c.handlers.Add(-1)
	defer s.abort(resetError{code: http2.ErrCodeCancel}, true, http2.ErrCodeCancel)
	c.handler(s)
}

func (c *h2Conn) onData(f *http2.DataFrame) error {
	n := int64(f.Length)
	c.mu.Lock()
	c.recvWindow -= n
	if c.recvWindow < 0 {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	s := c.streams[f.StreamID]
	var dead bool
	if s != nil {
		s.recvWindow -= n
		dead = s.recvWindow < 0
	}
	c.mu.Unlock()
	data := f.Data()
	// Padding, and whatever reaches no stream, is consumed at once.
	if free := n - int64(len(data)); s == nil || dead {
		c.credit(nil, n)
		if dead {
			c.resetStream(f.StreamID, http2.ErrCodeFlowControl)
		} else if f.StreamID > c.highestID() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	} else if free > 0 {
		c.credit(nil, free)
	}
	s.deliver(data, f.StreamEnded())
	return nil
}

// highestID is the largest stream ID either side has opened.
func (c *h2Conn) highestID() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.server {
		return c.lastPeerID
	}
	return c.nextID - 2
}

// credit returns n consumed bytes to the peer's windows (of the
// connection, and of s when set), in WINDOW_UPDATEs of a quarter window
// or more.
func (c *h2Conn) credit(s *h2Stream, n int64) {
	if n <= 0 {
		return
	}
	c.mu.Lock()
	c.recvUnacked += n
	var connInc, streamInc int64
	if c.recvUnacked >= connWindow/4 {
		connInc = c.recvUnacked
		c.recvUnacked = 0
		c.recvWindow += connInc
	}
	var id uint32
	if s != nil && c.streams[s.id] == s && !s.remoteEnd {
		s.recvUnacked += n
		if s.recvUnacked >= streamWindow/4 {
			streamInc = s.recvUnacked
			s.recvUnacked = 0
			s.recvWindow += streamInc
			id = s.id
		}
	}
	c.mu.Unlock()
	if connInc+streamInc == 0 {
		return
	}
	c.queue(func(fr *http2.Framer) error {
		if connInc > 0 {
			_ = fr.WriteWindowUpdate(0, uint32(connInc))
		}
		if streamInc > 0 {
			_ = fr.WriteWindowUpdate(id, uint32(streamInc))
		}
		return nil
	})
}

// reserve promises the caller a stream (client side): false when the
// connection may not take another.
func (c *h2Conn) reserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.goAway || c.noReuse || c.nextID >= 1<<31-1 {
		return false
	}
	if len(c.streams)+c.reserved >= c.peerStreams {
		return false
	}
	c.reserved++
	c.stopIdleLocked()
	return true
}

// setNoReuse keeps new streams off the connection; it closes when its
// last stream ends.
func (c *h2Conn) setNoReuse() {
	c.mu.Lock()
	c.noReuse = true
	idle := len(c.streams)+c.reserved == 0
	c.mu.Unlock()
	if idle {
		c.shutdown(http2.ErrCodeNo, errConnClosed)
	}
}

// open starts a CONNECT stream to authority on a reserved slot.
func (c *h2Conn) open(authority, source string) (*h2Stream, error) {
	c.lockWrite()
	c.mu.Lock()
	c.reserved--
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		c.unlockWrite()
		return nil, fmt.Errorf("%w: %w", errConnClosed, err)
	}
	s := newH2Stream(c, c.nextID)
	c.nextID += 2
	c.streams[s.id] = s
	c.mu.Unlock()
	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	_ = c.henc.WriteField(hpack.HeaderField{Name: sourceField, Value: source})
	if c.werr == nil {
		c.werr = c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true})
	}
	err := c.werr
	c.unlockWrite()
	if err != nil {
		// Nothing of the stream reached the peer.
		s.abort(fmt.Errorf("%w: %w", errUnprocessed, err), false, 0)
		return nil, fmt.Errorf("hbone: send connect: %w", err)
	}
	return s, nil
}

// respond answers a CONNECT (server side); a status other than 2xx ends
// the stream.
func (s *h2Stream) respond(status int) error {
	c := s.c
	end := status < 200 || status > 299
	c.lockWrite()
	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	if c.werr == nil {
		c.werr = c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: c.hbuf.Bytes(),
			EndHeaders: true, EndStream: end})
	}
	err := c.werr
	c.unlockWrite()
	if err != nil {
		return fmt.Errorf("hbone: send response: %w", err)
	}
	if end {
		// Whatever the client still sends is of no use: RST_STREAM
		// NO_ERROR tells it to stop (RFC 9113 8.1).
		s.sendEnded()
		s.abort(resetError{code: http2.ErrCodeNo}, true, http2.ErrCodeNo)
	}
	return nil
}

// removeStream forgets s once both directions ended or it was reset.
func (c *h2Conn) removeStream(s *h2Stream) {
	c.mu.Lock()
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	idle := len(c.streams)+c.reserved == 0 && c.err == nil
	noReuse := c.noReuse || c.goAway
	if idle && !noReuse && !c.server {
		if c.idle == nil {
			c.idle = time.AfterFunc(idleConnTimeout, c.idleExpired)
		} else {
			c.idle.Reset(idleConnTimeout)
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	if idle && noReuse {
		c.shutdown(http2.ErrCodeNo, errConnClosed)
	}
}

func (c *h2Conn) stopIdleLocked() {
	if c.idle != nil {
		c.idle.Stop()
	}
}

func (c *h2Conn) idleExpired() {
	c.mu.Lock()
	idle := len(c.streams)+c.reserved == 0
	c.mu.Unlock()
	if idle {
		c.shutdown(http2.ErrCodeNo, errors.New("hbone: idle"))
	}
}

// h2Stream is one CONNECT stream: a pod connection's bytes both ways.
type h2Stream struct {
	c  *h2Conn
	id uint32

	// The request, on the server side.
	method, authority, source string
	// extended: the request has :scheme, :path or :protocol, which a
	// plain CONNECT must not.
	extended bool

	// Flow control and ends, under c.mu.
	sendWindow  int64
	recvWindow  int64
	recvUnacked int64
	remoteEnd   bool // END_STREAM received (for credit)

	// The receiving side, under mu.
	mu       sync.Mutex
	cond     sync.Cond
	sink     net.Conn
	sinkRaw  syscall.RawConn
	pending  []byte
	spare    []byte
	busy     bool // a write to sink is in progress
	recvEnd  bool
	sentEnd  bool
	err      error
	finished bool // removed from the connection
	// delivered counts the bytes written to the sink, by the read loop
	// and by pipeTo.
	delivered atomic.Uint64

	status   chan int // the response's status (client side)
	answered atomic.Bool
	done     chan struct{}
	onAbort  func()
}

func newH2Stream(c *h2Conn, id uint32) *h2Stream {
	s := &h2Stream{c: c, id: id, sendWindow: c.peerInit, recvWindow: streamWindow,
		status: make(chan int, 1), done: make(chan struct{})}
	s.cond.L = &s.mu
	return s
}

// setOnAbort registers fn to run once if the stream is reset or its
// connection ends; at once if that happened already.
func (s *h2Stream) setOnAbort(fn func()) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		fn()
		return
	}
	s.onAbort = fn
	s.mu.Unlock()
}

// abort ends the stream with err, telling the peer with RST_STREAM code
// when rst is set, and runs the stream's onAbort. The first end wins; a
// stream whose both directions ended is left alone.
func (s *h2Stream) abort(err error, rst bool, code http2.ErrCode) {
	s.mu.Lock()
	if s.err != nil || (s.recvEnd && s.sentEnd && s.finished) {
		s.mu.Unlock()
		return
	}
	s.err = err
	s.finished = true
	fn := s.onAbort
	s.onAbort = nil
	// What was queued for the sink will never be written: it goes back
	// to the connection's window.
	dropped := int64(len(s.pending))
	s.pending, s.spare = nil, nil
	s.cond.Broadcast()
	s.mu.Unlock()
	close(s.done)
	s.c.removeStream(s)
	s.c.credit(nil, dropped)
	if rst {
		id := s.id
		s.c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
	}
	if fn != nil {
		fn()
	}
}

// cancel resets the stream from this side.
func (s *h2Stream) cancel(code http2.ErrCode) {
	s.abort(resetError{code: code}, true, code)
}

// maybeFinish removes a stream whose both directions ended.
func (s *h2Stream) maybeFinishLocked() bool {
	if s.recvEnd && s.sentEnd && len(s.pending) == 0 && !s.busy && !s.finished {
		s.finished = true
		return true
	}
	return false
}

func (s *h2Stream) gotResponse(status int) {
	s.answered.Store(true)
	select {
	case s.status <- status:
	default:
	}
}

// response waits for the answer to the CONNECT.
func (s *h2Stream) response(timeout <-chan struct{}) (int, error) {
	select {
	case st := <-s.status:
		return st, nil
	case <-s.done:
		select {
		case st := <-s.status:
			return st, nil
		default:
		}
		s.mu.Lock()
		err := s.err
		s.mu.Unlock()
		return 0, err
	case <-timeout:
		return 0, errors.New("hbone: canceled")
	}
}

// recvEnded records END_STREAM from the peer.
func (s *h2Stream) recvEnded() { s.deliver(nil, true) }

// deliver is the read loop's: data for the stream's sink. It writes to
// the sink at once when nothing is queued before it, without waiting,
// and queues the rest for pipeTo.
func (s *h2Stream) deliver(data []byte, end bool) {
	c := s.c
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		c.credit(nil, int64(len(data)))
		return
	}
	if s.recvEnd {
		// DATA after END_STREAM (RFC 9113 5.1: STREAM_CLOSED).
		s.mu.Unlock()
		c.credit(nil, int64(len(data)))
		s.abort(resetError{code: http2.ErrCodeStreamClosed}, true, http2.ErrCodeStreamClosed)
		return
	}
	var wrote int
	if len(data) > 0 && s.sinkRaw != nil && !s.busy && len(s.pending) == 0 {
		s.busy = true
		s.mu.Unlock()
		n, err := tryWrite(s.sinkRaw, data)
		s.mu.Lock()
		s.busy = false
		if err != nil {
			s.mu.Unlock()
			c.credit(nil, int64(len(data)))
			s.abort(fmt.Errorf("write to pod: %w", err), true, http2.ErrCodeConnect)
			return
		}
		wrote = n
		s.delivered.Add(uint64(n))
		data = data[n:]
	}
	if len(data) > 0 {
		s.pending = append(s.pending, data...)
	}
	if end {
		s.recvEnd = true
	}
	fin := s.maybeFinishLocked()
	s.cond.Broadcast()
	s.mu.Unlock()
	if end {
		c.mu.Lock()
		s.remoteEnd = true
		c.mu.Unlock()
	}
	c.credit(s, int64(wrote))
	if fin {
		c.removeStream(s)
	}
}

// tryWrite writes p to a socket with one non-blocking write.
func tryWrite(rc syscall.RawConn, p []byte) (int, error) {
	var n int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		n, werr = rawWrite(fd, p)
		return true
	})
	if err != nil {
		return 0, err
	}
	if werr == unix.EAGAIN {
		return 0, nil
	}
	if werr != nil {
		return 0, werr
	}
	return n, nil
}

// pipeTo writes the stream's bytes from the peer to dst until the peer
// ends its side (nil) or the stream is reset (the error), and returns the
// bytes dst took. The read loop writes to dst itself while nothing is
// queued; pipeTo writes what it queued.
func (s *h2Stream) pipeTo(dst net.Conn) (uint64, error) {
	var raw syscall.RawConn
	if sc, ok := dst.(syscall.Conn); ok {
		raw, _ = sc.SyscallConn()
	}
	s.mu.Lock()
	s.sink, s.sinkRaw = dst, raw
	for {
		for s.err == nil && (s.busy || (len(s.pending) == 0 && !s.recvEnd)) {
			s.cond.Wait()
		}
		if s.err != nil {
			err := s.err
			s.sinkRaw = nil
			s.mu.Unlock()
			return s.delivered.Load(), err
		}
		if len(s.pending) == 0 {
			s.sinkRaw = nil
			s.mu.Unlock()
			return s.delivered.Load(), nil
		}
		buf := s.pending
		s.pending, s.spare = s.spare[:0], nil
		s.busy = true
		s.mu.Unlock()
		var n int
		var err error
		if raw != nil {
			n, err = writeAll(raw, buf)
		} else {
			n, err = dst.Write(buf)
		}
		s.delivered.Add(uint64(n))
		s.c.credit(s, int64(n))
		s.mu.Lock()
		s.busy = false
		if err != nil {
			s.mu.Unlock()
			s.c.credit(nil, int64(len(buf)-n))
			s.abort(fmt.Errorf("write to pod: %w", err), true, http2.ErrCodeConnect)
			s.mu.Lock()
			err = s.err
			s.sinkRaw = nil
			s.mu.Unlock()
			return s.delivered.Load(), err
		}
		if cap(buf) <= streamWindow {
			s.spare = buf[:0]
		}
		fin := s.maybeFinishLocked()
		s.cond.Broadcast()
		if fin {
			s.mu.Unlock()
			s.c.removeStream(s)
			s.mu.Lock()
		}
	}
}

// writeData sends buf[frameHeaderLen:frameHeaderLen+n] as DATA frames.
// buf[:frameHeaderLen] is free for the first frame's header; a later
// frame's header overwrites the last bytes of the frame before it, which
// were sent by then.
func (s *h2Stream) writeData(buf []byte, n int) error {
	c := s.c
	for off := 0; off < n; {
		chunk, err := s.awaitWindow(n - off)
		if err != nil {
			return err
		}
		frame := buf[off : off+frameHeaderLen+chunk]
		putFrameHeader(frame, chunk, http2.FrameData, 0, s.id)
		c.lockWrite()
		if c.werr == nil {
			_, c.werr = c.conn.Write(frame)
		}
		err = c.werr
		c.unlockWrite()
		if err != nil {
			return fmt.Errorf("hbone: send data: %w", err)
		}
		off += chunk
	}
	return nil
}

// awaitWindow takes up to want bytes of send window (stream and
// connection), waiting for WINDOW_UPDATEs while either is empty.
func (s *h2Stream) awaitWindow(want int) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if err := s.sendErr(); err != nil {
			return 0, err
		}
		if c.err != nil {
			return 0, fmt.Errorf("%w: %w", errConnClosed, c.err)
		}
		if s.sendWindow > 0 && c.sendWindow > 0 {
			n := min(int64(want), s.sendWindow, c.sendWindow, int64(c.peerFrame))
			s.sendWindow -= n
			c.sendWindow -= n
			return int(n), nil
		}
		c.cond.Wait()
	}
}

// sendErr is the reset that ended the stream, if any.
func (s *h2Stream) sendErr() error {
	select {
	case <-s.done:
	default:
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		return errConnClosed
	}
	return s.err
}

// closeSend ends this side of the stream (END_STREAM).
func (s *h2Stream) closeSend() error {
	c := s.c
	var hdr [frameHeaderLen]byte
	putFrameHeader(hdr[:], 0, http2.FrameData, http2.FlagDataEndStream, s.id)
	if err := s.sendErr(); err != nil {
		return err
	}
	c.lockWrite()
	if c.werr == nil {
		_, c.werr = c.conn.Write(hdr[:])
	}
	err := c.werr
	c.unlockWrite()
	if err != nil {
		return fmt.Errorf("hbone: send end of stream: %w", err)
	}
	s.sendEnded()
	return nil
}

func (s *h2Stream) sendEnded() {
	s.mu.Lock()
	s.sentEnd = true
	fin := s.maybeFinishLocked()
	s.mu.Unlock()
	if fin {
		s.c.removeStream(s)
	}
}

// h2Dial starts HBONE on a verified client TLS connection, and waits
// for the server's SETTINGS.
func h2Dial(tc net.Conn, bc *batchConn, onClose func()) (*h2Conn, error) {
	c := newH2Conn(tc, bc, false)
	c.onClose = onClose
	if err := c.start(); err != nil {
		c.close(err)
		return nil, err
	}
	go c.readLoop()
	if err := c.waitSettings(HandshakeTimeout); err != nil {
		c.close(err)
		return nil, err
	}
	return c, nil
}

// h2Serve runs HBONE's server side on an accepted, verified TLS
// connection until it ends; handler serves each CONNECT stream on its own
// goroutine.
func h2Serve(tc net.Conn, bc *batchConn, handler func(*h2Stream)) error {
	c := newH2Conn(tc, bc, true)
	c.handler = handler
	if err := c.start(); err != nil {
		c.close(err)
		return err
	}
	c.readLoop()
	return nil
}
