package demo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// wire records the TCP payloads to and from one port on one interface of
// the demo's network namespace, with an AF_PACKET socket: what anyone with
// a tap on that link would see.
type wire struct {
	fd   int
	port uint16
	done chan struct{}

	mu       sync.Mutex
	payloads [][]byte
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// tapWire starts recording TCP segments to or from port on interface ifname.
func tapWire(ifname string, port uint16) (*wire, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("tap %s: %w", ifname, err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return nil, fmt.Errorf("tap %s: packet socket: %w", ifname, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: bind: %w", ifname, err)
	}
	// A short receive timeout lets the reader notice stop.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: receive timeout: %w", ifname, err)
	}
	w := &wire{fd: fd, port: port, done: make(chan struct{})}
	go w.read()
	return w, nil
}

func (w *wire) read() {
	defer close(w.done)
	buf := make([]byte, 65536)
	for {
		n, from, err := unix.Recvfrom(w.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		// Loopback shows every segment twice, leaving and arriving.
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if p := tcpPayload(buf[:n], w.port); len(p) > 0 {
			w.mu.Lock()
			w.payloads = append(w.payloads, bytes.Clone(p))
			w.mu.Unlock()
		}
	}
}

// stop ends the recording and returns what it saw.
func (w *wire) stop() [][]byte {
	_ = unix.Shutdown(w.fd, unix.SHUT_RDWR)
	unix.Close(w.fd)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.payloads
}

// tcpPayload returns the payload of an Ethernet frame carrying TCP to or
// from port, over IPv4 or IPv6 (no extension headers), else nil.
func tcpPayload(f []byte, port uint16) []byte {
	if len(f) < 14 {
		return nil
	}
	var l4 []byte
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_IP:
		ip := f[14:]
		if len(ip) < 20 || ip[9] != unix.IPPROTO_TCP {
			return nil
		}
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		if ihl < 20 || total > len(ip) || ihl > total {
			return nil
		}
		l4 = ip[ihl:total]
	case unix.ETH_P_IPV6:
		ip := f[14:]
		if len(ip) < 40 || ip[6] != unix.IPPROTO_TCP {
			return nil
		}
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if 40+plen > len(ip) {
			return nil
		}
		l4 = ip[40 : 40+plen]
	default:
		return nil
	}
	if len(l4) < 20 {
		return nil
	}
	sport, dport := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
	off := int(l4[12]>>4) * 4
	if (sport != port && dport != port) || off < 20 || off > len(l4) {
		return nil
	}
	return l4[off:]
}

// tlsRecords counts the segments that begin with a TLS record header
// (handshake 0x16 or application data 0x17, version 3.x).
func tlsRecords(payloads [][]byte) (handshake, data int) {
	for _, p := range payloads {
		if len(p) < 5 || p[1] != 3 {
			continue
		}
		switch p[0] {
		case 0x16:
			handshake++
		case 0x17:
			data++
		}
	}
	return handshake, data
}

// containsPlain reports whether any payload holds needle in the clear.
func containsPlain(payloads [][]byte, needle []byte) bool {
	for _, p := range payloads {
		if bytes.Contains(p, needle) {
			return true
		}
	}
	// Also across segment boundaries.
	return bytes.Contains(bytes.Join(payloads, nil), needle)
}
