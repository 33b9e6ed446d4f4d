package netns

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ServeEcho echoes TCP and UDP on port inside n until t ends, with one
// listener per address family ("4", "6"): what a wildcard "tcp" listener
// covers depends on Go's process-wide probe of the first namespace it ran
// in.
func ServeEcho(t testing.TB, n ns.NetNS, port int, families ...string) {
	t.Helper()
	for _, f := range families {
		var ln net.Listener
		var pc net.PacketConn
		err := n.Do(func(ns.NetNS) error {
			var err error
			if ln, err = net.Listen("tcp"+f, fmt.Sprintf(":%d", port)); err != nil {
				return err
			}
			pc, err = net.ListenPacket("udp"+f, fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatalf("listen on %d/ipv%s in %s: %v", port, f, n.Path(), err)
		}
		t.Cleanup(func() { ln.Close(); pc.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
			}
		}()
		go func() {
			buf := make([]byte, 1500)
			for {
				k, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(buf[:k], from)
			}
		}()
	}
}

// Dial connects from inside n to to:port.
func Dial(n ns.NetNS, network string, to netip.Addr, port int, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout(network, netip.AddrPortFrom(to, uint16(port)).String(), timeout)
		return err
	})
	return c, err
}

// Echo reports whether a message written to c comes back whole within
// timeout (from a ServeEcho peer).
func Echo(c net.Conn, timeout time.Duration) bool {
	_ = c.SetDeadline(time.Now().Add(timeout))
	msg := []byte("bulkhead " + time.Now().String())
	if _, err := c.Write(msg); err != nil {
		return false
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(c, buf)
	return err == nil && bytes.Equal(buf, msg)
}
