package tunnel

import (
	"bufio"
	"net"
	"sync"
)

// crypto/tls writes every record (16 KiB of plaintext at most) with its
// own write to the socket, and reads about one record per read. On a VM,
// where a syscall costs more than encrypting a record, that halves the
// throughput. batchConn sits under the TLS layer: it reads the socket in
// large chunks through a buffer, and, while a batch is open (HBONE holds
// one for as long as it holds its write lock), collects the records
// written into one large write.
type batchConn struct {
	net.Conn
	r     *bufio.Reader
	wbufs *sync.Pool // of *[]byte, held only while a batch is open

	mu       sync.Mutex
	batching bool
	wbuf     *[]byte
	werr     error
}

// The read buffer stays with the connection for its life (a pooled TLS
// connection may carry many streams), so it is kept moderate; the write
// buffer is taken from a pool for the length of one batch.
const (
	batchReadSize  = 64 << 10
	batchFlushSize = 256 << 10
)

func newBatchConn(c net.Conn, wbufs *sync.Pool) *batchConn {
	return &batchConn{Conn: c, r: bufio.NewReaderSize(c, batchReadSize), wbufs: wbufs}
}

func newWriteBufPool() *sync.Pool {
	return &sync.Pool{New: func() any {
		b := make([]byte, 0, batchFlushSize+32<<10)
		return &b
	}}
}

func (b *batchConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.werr != nil {
		return 0, b.werr
	}
	if !b.batching {
		return b.Conn.Write(p)
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
	_, err := b.Conn.Write(*b.wbuf)
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
