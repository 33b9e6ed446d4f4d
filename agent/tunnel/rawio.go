package tunnel

import (
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The tunnel's reads and writes of socket data are non-blocking system
// calls made without telling the Go scheduler (RawSyscall). A syscall
// that the scheduler is told of wakes its monitor thread whenever the
// process was idle before it (entersyscall), and a tunnel at 1,000
// requests a second is idle between every two: each request paid futex
// wake-ups and thread switches on the way (most of the agent's futex time
// in a profile of the 1 KiB request benchmark). These calls never block
// (the sockets are non-blocking, and EAGAIN goes back to the poller
// through RawConn), so hiding them from the scheduler costs nothing.

// rawRead is read(2) on a non-blocking socket, EINTR retried.
func rawRead(fd uintptr, p []byte) (int, error) { return rawIO(unix.SYS_READ, fd, p) }

// rawWrite is write(2) on a non-blocking socket, EINTR retried.
func rawWrite(fd uintptr, p []byte) (int, error) { return rawIO(unix.SYS_WRITE, fd, p) }

func rawIO(trap, fd uintptr, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, _, e := unix.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(n), nil
	}
}

// writeAll writes p to a socket, waiting in the poller (with the write
// deadline) while it is full.
func writeAll(rc syscall.RawConn, p []byte) (int, error) {
	var done int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for done < len(p) {
			n, e := rawWrite(fd, p[done:])
			if e == unix.EAGAIN {
				return false
			}
			if e != nil {
				werr = os.NewSyscallError("write", e)
				return true
			}
			done += n
		}
		return true
	})
	if err != nil {
		return done, err
	}
	return done, werr
}

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
		n, rerr = rawRead(fd, (*bufp)[off:])
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
