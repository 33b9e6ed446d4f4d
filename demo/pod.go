package demo

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// pod is a sandbox: a network namespace with echo servers in it.
type pod struct {
	spec        PodSpec
	uid         string
	containerID string
	netns       ns.NetNS
	ip          netip.Addr

	mu      sync.Mutex
	closers []io.Closer
}

// serve starts a TCP and a UDP echo server for each port inside the pod's
// namespace. The sockets belong to the namespace they were created in, so
// only the creation has to happen there; the demo process serves them.
func (p *pod) serve(ports []Port) error {
	return p.netns.Do(func(ns.NetNS) error {
		for _, port := range ports {
			addr := fmt.Sprintf("0.0.0.0:%d", port.Num)
			switch port.Proto {
			case "TCP":
				ln, err := net.Listen("tcp4", addr)
				if err != nil {
					return fmt.Errorf("listen %s in %s: %w", port, p.spec.Ref(), err)
				}
				p.track(ln)
				go serveTCP(ln)
			case "UDP":
				pc, err := net.ListenPacket("udp4", addr)
				if err != nil {
					return fmt.Errorf("listen %s in %s: %w", port, p.spec.Ref(), err)
				}
				p.track(pc)
				go serveUDP(pc)
			default:
				return fmt.Errorf("port %s: only TCP and UDP", port)
			}
		}
		return nil
	})
}

func (p *pod) track(c io.Closer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closers = append(p.closers, c)
}

// stop closes the servers. Their sockets hold the namespace (and so the
// veth) alive, so this comes before the namespace is removed.
func (p *pod) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.closers {
		_ = c.Close()
	}
	p.closers = nil
}

func serveTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = io.Copy(c, c)
		}()
	}
}

func serveUDP(pc net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}

// probe reports whether a connection from p to addr on port carries an echo
// back within timeout. A dropped TCP SYN or UDP datagram simply never gets
// an answer, so a denied cell costs exactly timeout.
func (p *pod) probe(to netip.Addr, port Port, timeout time.Duration) (bool, error) {
	deadline := time.Now().Add(timeout)
	target := netip.AddrPortFrom(to, port.Num).String()
	var c net.Conn
	err := p.netns.Do(func(ns.NetNS) error {
		var err error
		switch port.Proto {
		case "TCP":
			c, err = net.DialTimeout("tcp4", target, timeout)
		case "UDP":
			c, err = net.Dial("udp4", target)
		default:
			err = fmt.Errorf("port %s: only TCP and UDP", port)
		}
		return err
	})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return false, nil
		}
		if port.Proto == "TCP" {
			// A reset or unreachable is an answer, but not an echo; the
			// demo's policies drop silently, so report it as not reached.
			return false, nil
		}
		return false, err
	}
	defer c.Close()
	msg := fmt.Appendf(nil, "bulkhead demo %s -> %s %s", p.spec.Ref(), target, port)
	buf := make([]byte, len(msg)+1)
	// UDP gives no delivery guarantee even on one host, so it gets three
	// tries within the same time budget; TCP retransmits by itself.
	tries := 1
	if port.Proto == "UDP" {
		tries = 3
	}
	for i := range tries {
		if _, err := c.Write(msg); err != nil {
			return false, nil
		}
		if port.Proto == "TCP" {
			// Connected means the policy let it through; the echo gets a
			// full timeout of its own however long the handshake took.
			_ = c.SetReadDeadline(time.Now().Add(timeout))
			_, err := io.ReadFull(c, buf[:len(msg)])
			return err == nil && bytes.Equal(buf[:len(msg)], msg), nil
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Until(deadline) / time.Duration(tries-i)))
		n, err := c.Read(buf)
		if err == nil && bytes.Equal(buf[:n], msg) {
			return true, nil
		}
	}
	return false, nil
}
