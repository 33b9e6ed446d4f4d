package tunnel

import (
	"io"
	"sync"
)

// Copy buffers come in two sizes. A tunnelled connection spends most of
// its life idle, blocked in a read that holds its buffer: it waits with a
// small one, and moves to a large one only while reads fill the small one
// (a bulk transfer), so that a thousand idle connections do not pin a
// quarter of a megabyte each.
const (
	smallCopyBuffer = 16 << 10
	largeCopyBuffer = 256 << 10
)

// bufPool reuses the copy buffers, which would otherwise be allocated per
// connection and direction.
type bufPool struct {
	small, large sync.Pool
}

func newBufPool() *bufPool {
	bp := &bufPool{}
	bp.small.New = func() any { b := make([]byte, smallCopyBuffer); return &b }
	bp.large.New = func() any { b := make([]byte, largeCopyBuffer); return &b }
	return bp
}

// copyFlush copies src to dst until src ends, calling flush (when set)
// after each write so that the HTTP/2 layer frames what one read returned
// without waiting for more. It returns the bytes written and the first
// error other than src's io.EOF.
func (bp *bufPool) copyFlush(dst io.Writer, src io.Reader, flush func()) (uint64, error) {
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
		r, rerr := src.Read(buf)
		if r > 0 {
			w, werr := dst.Write(buf[:r])
			n += uint64(w)
			if werr != nil {
				return n, werr
			}
			if w != r {
				return n, io.ErrShortWrite
			}
			if flush != nil {
				flush()
			}
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
		switch {
		case !large && r == len(buf):
			bp.small.Put(bufp)
			bufp, large = bp.large.Get().(*[]byte), true
		case large && r < smallCopyBuffer:
			bp.large.Put(bufp)
			bufp, large = bp.small.Get().(*[]byte), false
		}
	}
}
