package tunnel

import (
	"io"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// readPooled reads once from a socket into a buffer of pool, at offset
// off, taking the buffer only once the socket has data: a connection that
// waits for its peer (most of a tunnelled connection's life) holds no
// buffer, so buffers can be large enough for bulk transfers and still
// cost nothing per idle connection. It returns the buffer (the caller
// puts it back) and the bytes read, or io.EOF at the end of the stream.
// Read deadlines apply as for net.Conn.Read.
func readPooled(rc syscall.RawConn, pool *sync.Pool, off int) (*[]byte, int, error) {
	var bufp *[]byte
	var n int
	var rerr error
	err := rc.Read(func(fd uintptr) bool {
		if bufp == nil {
			bufp = pool.Get().(*[]byte)
		}
		for {
			n, rerr = unix.Read(int(fd), (*bufp)[off:])
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr == unix.EAGAIN {
			// Nothing yet: wait for the socket without the buffer.
			pool.Put(bufp)
			bufp = nil
			return false
		}
		return true
	})
	switch {
	case err != nil:
		if bufp != nil {
			pool.Put(bufp)
		}
		return nil, 0, err
	case rerr != nil:
		pool.Put(bufp)
		return nil, 0, os.NewSyscallError("read", rerr)
	case n == 0:
		pool.Put(bufp)
		return nil, 0, io.EOF
	}
	return bufp, n, nil
}

// rawConnOf is the socket under c, nil when c has none (net.Pipe).
func rawConnOf(c any) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
