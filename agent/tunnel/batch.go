package tunnel

import (
	"net"
	"sync"
	"syscall"
)

// crypto/tls writes every record (16 KiB of plaintext at most) with its
// own write to the socket, and reads about one record per read. On a VM,
// where a syscall costs more than encrypting a record, that halves the
// throughput. batchConn sits under the TLS layer: it reads the socket in
// large chunks, into a buffer taken from a pool only while the socket has
// data, and, while a batch is open (HBONE holds one for as long as it
// holds its write lock), collects the records written into one large
// write.
type batchConn struct {
	net.Conn
	raw   syscall.RawConn // nil: reads go to Conn as they are
	rbufs *sync.Pool      // of *[]byte, held while read bytes wait for the TLS layer
	wbufs *sync.Pool      // of *[]byte, held only while a batch is open

	// rbuf[rpos:rend] was read and not yet consumed; only the TLS
	// layer reads, one read at a time.
	rbuf       *[]byte
	rpos, rend int

	mu       sync.Mutex
	batching bool
	wbuf     *[]byte
	werr     error
}

// Both buffers come from pools and are held only while bytes wait in
// them, so they can be large: a pooled TLS connection that waits holds
// neither.
const (
	batchReadSize  = 256 << 10
	batchFlushSize = 256 << 10
)

func newBatchConn(c net.Conn, rbufs, wbufs *sync.Pool) *batchConn {
	return &batchConn{Conn: c, raw: rawConnOf(c), rbufs: rbufs, wbufs: wbufs}
}

func newReadBufPool() *sync.Pool {
	return &sync.Pool{New: func() any {
		b := make([]byte, batchReadSize)
		return &b
	}}
}

func newWriteBufPool() *sync.Pool {
	return &sync.Pool{New: func() any {
		b := make([]byte, 0, batchFlushSize+32<<10)
		return &b
	}}
}

func (b *batchConn) Read(p []byte) (int, error) {
	if b.rbuf == nil {
		if b.raw == nil {
			return b.Conn.Read(p)
		}
		bufp, n, err := readPooled(b.raw, b.rbufs, 0)
		if err != nil {
			return 0, err
		}
		b.rbuf, b.rpos, b.rend = bufp, 0, n
	}
	n := copy(p, (*b.rbuf)[b.rpos:b.rend])
	b.rpos += n
	if b.rpos == b.rend {
		b.rbufs.Put(b.rbuf)
		b.rbuf = nil
	}
	return n, nil
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.werr != nil {
		return 0, b.werr
	}
	if !b.batching {
		return b.write(p)
	}
	if b.wbuf == nil {
		b.wbuf = b.wbufs.Get().(*[]byte)
	}
	*b.wbuf = append(*b.wbuf, p...)
	if len(*b.wbuf) >= batchFlushSize {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (b *batchConn) flushLocked() error {
	if b.wbuf == nil || len(*b.wbuf) == 0 {
		return nil
	}
	_, err := b.write(*b.wbuf)
	*b.wbuf = (*b.wbuf)[:0]
	if err != nil {
		b.werr = err
	}
	return err
}

func (b *batchConn) begin() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

func (b *batchConn) end() error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	err := b.flushLocked()
	if b.wbuf != nil {
		b.wbufs.Put(b.wbuf)
		b.wbuf = nil
	}
	return err
}

// write writes p to the socket.
func (b *batchConn) write(p []byte) (int, error) {
	if b.raw == nil {
		return b.Conn.Write(p)
	}
	return writeAll(b.raw, p)
}
