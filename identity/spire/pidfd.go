package spire

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// pidWatch holds a pidfd of a pod's process for the life of its
// subscription. SPIRE attests the PID when the stream opens and trusts the
// caller to make sure that the PID still names that process: a pidfd
// refers to one process, never to a later one with the same number, so
// "our pidfd's process is alive" after a response means SPIRE attested it.
type pidWatch struct {
	pid  int
	file *os.File // the pidfd, in Go's poller (PIDFD_NONBLOCK)
	rc   syscall.RawConn
	wg   sync.WaitGroup
}

// errProcessGone is the cause a subscription's context is cancelled with
// when its process exits.
var errProcessGone = errors.New("pod process exited")

func openPID(pid int) (*pidWatch, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", pid))
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("pidfd %d: %w", pid, err)
	}
	return &pidWatch{pid: pid, file: f, rc: rc}, nil
}

// exited reports whether the process has exited (a pidfd polls readable
// from then on, zombie or reaped).
func (p *pidWatch) exited() bool {
	gone := false
	if err := p.rc.Control(func(fd uintptr) { gone = pidfdReadable(int(fd)) }); err != nil {
		return true // closed: the subscription is over anyway
	}
	return gone
}

func pidfdReadable(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n > 0 && fds[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0
	}
}

// watch calls onExit once the process exits, from a goroutine that waits in
// Go's poller (no thread per pod). close ends the wait.
func (p *pidWatch) watch(onExit func()) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		err := p.rc.Read(func(fd uintptr) bool { return pidfdReadable(int(fd)) })
		if err == nil {
			onExit()
		}
	}()
}

// close releases the pidfd and waits for watch to end.
func (p *pidWatch) close() {
	p.file.Close()
	p.wg.Wait()
}
