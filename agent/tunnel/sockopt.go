package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenTransparent opens the listener the datapath assigns redirected
// SYNs to. IP_TRANSPARENT (and IPV6_TRANSPARENT) let it accept
// connections whose destination is not a local address: the pod's
// original destination stays the accepted socket's local address.
func listenTransparent(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if network == "tcp6" || network == "tcp" {
				// A dual-stack socket needs both: v4-mapped SYNs are
				// checked against the IPv4 flag.
				if e := unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); e != nil && network == "tcp6" {
					serr = fmt.Errorf("set IPV6_TRANSPARENT: %w", e)
					return
				}
			}
			if e := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); e != nil && network != "tcp6" {
				serr = fmt.Errorf("set IP_TRANSPARENT: %w", e)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("tunnel: transparent listen %s: %w", addr, err)
	}
	return l, nil
}

// probeKernelTLS asks the kernel for the "tls" upper layer protocol on a
// fresh TCP socket. The kernel resolves the ULP by name before it checks
// the socket's state, so ENOENT means the module is absent and ENOTCONN
// that it is there (it needs an established socket to attach).
func probeKernelTLS() (bool, string) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Sprintf("probe: socket: %v", err)
	}
	defer unix.Close(fd)
	err = unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_ULP, "tls")
	switch {
	case errors.Is(err, unix.ENOTCONN), err == nil:
		return true, "kernel offers TCP_ULP tls; the tunnel still uses user-space TLS (no kernel TLS path is built yet)"
	case errors.Is(err, unix.ENOENT):
		return false, "kernel has no TCP_ULP tls (CONFIG_TLS unset or module missing): user-space TLS"
	default:
		return false, fmt.Sprintf("TCP_ULP tls probe: %v: user-space TLS", err)
	}
}

// reset closes c with an RST (SO_LINGER 0), so that the pod sees its
// connection refused at once rather than a clean end of stream.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// socketCookie reads the kernel's cookie of a socket, the key the datapath
// uses for tunnel-delivered sockets.
func socketCookie(fd uintptr) (uint64, error) {
	v, err := unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("get SO_COOKIE: %w", err)
	}
	return v, nil
}
