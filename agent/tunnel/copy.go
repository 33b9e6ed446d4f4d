package tunnel

import (
	"io"
	"sync"
)

// bufPool reuses the copy buffers: one per direction of every tunnelled
// connection, which would otherwise be allocated per connection.
type bufPool struct {
	size int
	p    sync.Pool
}

func newBufPool(size int) *bufPool {
	bp := &bufPool{size: size}
	bp.p.New = func() any {
		b := make([]byte, size)
		return &b
	}
	return bp
}

func (bp *bufPool) get() *[]byte  { return bp.p.Get().(*[]byte) }
func (bp *bufPool) put(b *[]byte) { bp.p.Put(b) }

// copyFlush copies src to dst with a pooled buffer until src ends,
// calling flush after each write so that the HTTP/2 layer frames what one
// read returned without waiting for more. It returns the bytes written
// and the first error other than src's io.EOF.
func (bp *bufPool) copyFlush(dst io.Writer, src io.Reader, flush func()) (uint64, error) {
	bufp := bp.get()
	defer bp.put(bufp)
	buf := *bufp
	var n uint64
	for {
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
	}
}
