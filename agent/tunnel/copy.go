package tunnel

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Send buffers come in two sizes. A tunnelled connection spends most of
// its life idle, blocked in a read that holds its buffer: it waits with a
// small one, and moves to a large one only while reads fill the small one
// (a bulk transfer), so that a thousand idle connections do not pin a
// quarter of a megabyte each. Each has room for a frame header in front.
const (
	smallCopyBuffer = 16 << 10
	largeCopyBuffer = maxFrameSize
)

// bufPool reuses the send buffers, which would otherwise be allocated per
// connection.
type bufPool struct {
	small, large sync.Pool
}

func newBufPool() *bufPool {
	bp := &bufPool{}
	bp.small.New = func() any { b := make([]byte, frameHeaderLen+smallCopyBuffer); return &b }
	bp.large.New = func() any { b := make([]byte, frameHeaderLen+largeCopyBuffer); return &b }
	return bp
}

// sendFrom sends what src delivers on s, each read as one DATA frame
// written from the read's own buffer, until src ends (then END_STREAM,
// and nil) or fails. It returns the bytes sent; read, when set, counts
// the bytes taken from src, sent or not.
func (bp *bufPool) sendFrom(s *h2Stream, src net.Conn, read *atomic.Uint64) (uint64, error) {
	bufp, large := bp.small.Get().(*[]byte), false
	defer func() {
		if large {
			bp.large.Put(bufp)
		} else {
			bp.small.Put(bufp)
		}
	}()
	var n uint64
	for {
		buf := *bufp
		r, rerr := src.Read(buf[frameHeaderLen:])
		if r > 0 {
			if read != nil {
				read.Add(uint64(r))
			}
			if err := s.writeData(buf, r); err != nil {
				return n, err
			}
			n += uint64(r)
		}
		if rerr == io.EOF {
			return n, s.closeSend()
		}
		if rerr != nil {
			return n, rerr
		}
		switch {
		case !large && r == len(buf)-frameHeaderLen:
			bp.small.Put(bufp)
			bufp, large = bp.large.Get().(*[]byte), true
		case large && r < smallCopyBuffer:
			bp.large.Put(bufp)
			bufp, large = bp.small.Get().(*[]byte), false
		}
	}
}
