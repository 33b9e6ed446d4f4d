// Package wiretap records what crosses one link, as tcpdump would, with an
// AF_PACKET socket and no tool to install: the demo shows with it that the
// mTLS tunnel's bytes are TLS, and the end-to-end tests check the wire.
package wiretap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// captureLimit bounds the bytes a Capture keeps: a test that moves much
// data through a captured link must not take the machine's memory. Frames
// beyond it are counted, not kept (Dropped), and Truncated says so.
const captureLimit = 256 << 20

// Capture records every frame that crosses one link, in both directions,
// with an AF_PACKET socket bound to it: what tcpdump would see, with no
// tool to install. Offloads make the kernel hand the socket TCP segments
// larger than the MTU (GSO/GRO); the frames are kept as the socket gets
// them.
type Capture struct {
	fd   int
	done chan struct{}

	mu        sync.Mutex
	frames    [][]byte
	kept      int
	dropped   int
	stopped   bool
	readError error
}

// Open opens an AF_PACKET socket in the calling thread's network
// namespace (the socket stays in it), binds it to ifname, and records
// frames until Stop.
func Open(ifname string) (*Capture, error) {
	c := &Capture{fd: -1, done: make(chan struct{})}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	c.fd = fd
	err = func() error {
		idx, err := ifindex(ifname)
		if err != nil {
			return err
		}
		if err := unix.Bind(c.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: idx}); err != nil {
			return fmt.Errorf("bind packet socket to %s: %w", ifname, err)
		}
		// A large receive buffer, so that a burst is not lost while the
		// reader copies; a timeout, so that the reader sees Stop.
		_ = unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20)
		return unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000})
	}()
	if err != nil {
		unix.Close(c.fd)
		return nil, fmt.Errorf("capture on %s: %w", ifname, err)
	}
	go c.read()
	return c, nil
}

// ifindex looks name up in the calling thread's namespace.
func ifindex(name string) (int, error) {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, fmt.Errorf("interface %s: %w", name, err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("interface %s: %w", name, err)
	}
	defer unix.Close(s)
	if err := unix.IoctlIfreq(s, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("interface %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// read runs until Stop: frames that arrived before Stop are still read
// (the socket's queue is drained until a read times out).
func (c *Capture) read() {
	// The goroutine never switches namespaces, but a locked thread keeps
	// the reads off threads that the netns helpers may be moving.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(c.done)
	buf := make([]byte, 1<<18)
	for {
		k, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				c.mu.Lock()
				stop := c.stopped
				c.mu.Unlock()
				if stop {
					return
				}
				continue
			}
			c.mu.Lock()
			c.readError = err
			c.mu.Unlock()
			return
		}
		c.mu.Lock()
		if c.kept+k > captureLimit {
			c.dropped++
		} else {
			c.frames = append(c.frames, slices.Clone(buf[:k]))
			c.kept += k
		}
		c.mu.Unlock()
	}
}

// Stop ends the capture after reading what the socket holds, and closes
// the socket. The frames stay readable. Stopping twice is harmless.
func (c *Capture) Stop() {
	c.mu.Lock()
	already := c.stopped
	c.stopped = true
	c.mu.Unlock()
	<-c.done
	if !already {
		unix.Close(c.fd)
	}
}

// Err is the error that ended reading early, if any.
func (c *Capture) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readError
}

// Reset forgets the frames recorded so far.
func (c *Capture) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.frames, c.kept, c.dropped = nil, 0, 0
}

// Frames is the number of frames recorded (kept or not).
func (c *Capture) Frames() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.frames) + c.dropped
}

// Truncated reports whether frames were counted but not kept (over the
// capture's memory bound): then the checks below saw only a part.
func (c *Capture) Truncated() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dropped > 0
}

func (c *Capture) snapshot() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.frames)
}

// Contains reports whether any recorded frame holds payload anywhere in
// its bytes: headers included, so that a payload in any protocol, or in a
// packet this helper cannot parse, is found. A payload that TCP splits
// across two segments would be missed: keep payloads short and distinct.
func (c *Capture) Contains(payload []byte) bool {
	if len(payload) == 0 {
		return false
	}
	for _, f := range c.snapshot() {
		if bytes.Contains(f, payload) {
			return true
		}
	}
	return false
}

// TCPFlag bits, as in the TCP header.
const (
	TCPFin = 0x01
	TCPSyn = 0x02
	TCPRst = 0x04
	TCPPsh = 0x08
	TCPAck = 0x10
)

// Segment is one TCP segment of a recorded frame.
type Segment struct {
	Src, Dst netip.AddrPort
	Flags    uint8
	Payload  []byte
}

// Has reports whether every bit of flags is set.
func (s Segment) Has(flags uint8) bool { return s.Flags&flags == flags }

// Port reports whether the segment is from or to port.
func (s Segment) Port(port uint16) bool { return s.Src.Port() == port || s.Dst.Port() == port }

// Segments are the TCP segments of the recorded Ethernet frames (IPv4
// and IPv6, with the common IPv6 extension headers), in order.
func (c *Capture) Segments() []Segment {
	var out []Segment
	for _, f := range c.snapshot() {
		if s, ok := parseTCP(f); ok {
			out = append(out, s)
		}
	}
	return out
}

// TCPPorts are the TCP ports seen (source and destination), sorted.
func (c *Capture) TCPPorts() []uint16 {
	seen := map[uint16]bool{}
	for _, s := range c.Segments() {
		seen[s.Src.Port()] = true
		seen[s.Dst.Port()] = true
	}
	out := make([]uint16, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// PayloadPorts are the TCP ports of segments that carried data (both
// ports of each), sorted.
func (c *Capture) PayloadPorts() []uint16 {
	seen := map[uint16]bool{}
	for _, s := range c.Segments() {
		if len(s.Payload) > 0 {
			seen[s.Src.Port()] = true
			seen[s.Dst.Port()] = true
		}
	}
	out := make([]uint16, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// LooksLikeTLS reports whether data segments from or to port were seen
// and one of them starts with a TLS record header: a handshake (0x16) or
// application data (0x17) record of version 0x03xx. A capture that saw no
// data on port says false.
func (c *Capture) LooksLikeTLS(port uint16) bool {
	for _, s := range c.Segments() {
		if !s.Port(port) || len(s.Payload) < 5 {
			continue
		}
		if (s.Payload[0] == 0x16 || s.Payload[0] == 0x17) && s.Payload[1] == 0x03 {
			return true
		}
	}
	return false
}

// parseTCP reads an Ethernet frame's TCP segment.
func parseTCP(f []byte) (Segment, bool) {
	if len(f) < 14 {
		return Segment{}, false
	}
	etherType := binary.BigEndian.Uint16(f[12:14])
	p := f[14:]
	// One 802.1Q tag at most (none on veth; cheap to allow).
	if etherType == 0x8100 && len(p) >= 4 {
		etherType, p = binary.BigEndian.Uint16(p[2:4]), p[4:]
	}
	var src, dst netip.Addr
	var l4 []byte
	switch etherType {
	case 0x0800:
		if len(p) < 20 || p[0]>>4 != 4 {
			return Segment{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(p[2:4]))
		// A fragment other than the first carries no TCP header.
		if p[9] != unix.IPPROTO_TCP || ihl < 20 || len(p) < ihl || binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return Segment{}, false
		}
		// GSO frames may say 0 (or less than they hold): trust the frame
		// then.
		if total >= ihl && total <= len(p) {
			p = p[:total]
		}
		src, dst = netip.AddrFrom4([4]byte(p[12:16])), netip.AddrFrom4([4]byte(p[16:20]))
		l4 = p[ihl:]
	case 0x86dd:
		if len(p) < 40 || p[0]>>4 != 6 {
			return Segment{}, false
		}
		next := p[6]
		if plen := int(binary.BigEndian.Uint16(p[4:6])); plen > 0 && 40+plen <= len(p) {
			p = p[:40+plen]
		}
		src, dst = netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
		l4 = p[40:]
		// Hop-by-hop, routing and destination options headers.
		for next == 0 || next == 43 || next == 60 {
			if len(l4) < 8 {
				return Segment{}, false
			}
			hl := (int(l4[1]) + 1) * 8
			if len(l4) < hl {
				return Segment{}, false
			}
			next, l4 = l4[0], l4[hl:]
		}
		if next != unix.IPPROTO_TCP {
			return Segment{}, false
		}
	default:
		return Segment{}, false
	}
	if len(l4) < 20 {
		return Segment{}, false
	}
	off := int(l4[12]>>4) * 4
	if off < 20 || len(l4) < off {
		return Segment{}, false
	}
	return Segment{
		Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:2])),
		Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:4])),
		Flags:   l4[13],
		Payload: l4[off:],
	}, true
}
