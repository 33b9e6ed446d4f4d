package tunnel

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// sendBuffer is the most sendFrom reads at once: one DATA frame of the
// largest size. The buffers come from a pool and are held only from the
// moment the socket has data until its frame was written.
const sendBuffer = maxFrameSize

// bufPool reuses the send buffers, which would otherwise be allocated per
// read.
type bufPool struct {
	bufs sync.Pool
}

func newBufPool() *bufPool {
	bp := &bufPool{}
	bp.bufs.New = func() any { b := make([]byte, frameHeaderLen+sendBuffer); return &b }
	return bp
}

// sendFrom sends what src delivers on s, each read as one DATA frame
// written from the read's own buffer, until src ends (then END_STREAM,
// and nil) or fails. It returns the bytes sent; read, when set, counts
// the bytes taken from src, sent or not.
func (bp *bufPool) sendFrom(s *h2Stream, src net.Conn, read *atomic.Uint64) (uint64, error) {
	rc := rawConnOf(src)
	var n uint64
	for {
		var bufp *[]byte
		var r int
		var rerr error
		if rc != nil {
			bufp, r, rerr = readPooled(rc, &bp.bufs, frameHeaderLen)
		} else {
			bufp = bp.bufs.Get().(*[]byte)
			r, rerr = src.Read((*bufp)[frameHeaderLen:])
		}
		if r > 0 {
			if read != nil {
				read.Add(uint64(r))
			}
			err := s.writeData(*bufp, r)
			bp.bufs.Put(bufp)
			if err != nil {
				return n, err
			}
			n += uint64(r)
		} else if bufp != nil {
			bp.bufs.Put(bufp)
		}
		if rerr == io.EOF {
			return n, s.closeSend()
		}
		if rerr != nil {
			return n, rerr
		}
	}
}
