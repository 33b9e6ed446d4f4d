package datapath

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

const (
	retPass = 0xffffffff // TCX_NEXT (-1)
	retShot = 2          // TC_ACT_SHOT
	// testIfindex is the device BPF_PROG_TEST_RUN runs on: loopback.
	testIfindex = 1
)

// newTestDatapath loads a private datapath pinned under a unique directory
// that is removed when t ends.
func newTestDatapath(t testing.TB, cfg Config) *Datapath {
	t.Helper()
	privileged.Require(t)
	if cfg.BPFFS == "" {
		cfg.BPFFS = testBPFFS(t)
	}
	d, err := New(cfg)
	if err != nil {
		if errors.Is(err, ErrNotSupported) {
			privileged.Unsupported(t, "datapath: %v", err)
		}
		t.Fatalf("new datapath: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Remove(); err != nil {
			t.Errorf("remove datapath: %v", err)
		}
	})
	return d
}

func testBPFFS(t testing.TB) string {
	b := make([]byte, 6)
	rand.Read(b)
	dir := filepath.Join("/sys/fs/bpf", "bulkhead-test-"+hex.EncodeToString(b))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// testPodMAC is the Ethernet source of every frame pktSpec.build makes.
var testPodMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}

// testPodAddrs are the addresses the test endpoints may send from: the
// prog tests' pod and the fuzz tests' pod.
var testPodAddrs = []netip.Addr{podIP, podIP6, fuzzPodIP4, fuzzPodIP6}

// bindTestEndpoint makes packets run through prog.Run belong to ep, which
// may send from testPodMAC and testPodAddrs, as Attach would register them.
func bindTestEndpoint(t testing.TB, d *Datapath, ep uint32) {
	t.Helper()
	v, err := encodeAddrs(Endpoint{ID: policy.EndpointID(ep), MAC: testPodMAC, Addrs: testPodAddrs})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.setAddrs(policy.EndpointID(ep), v); err != nil {
		t.Fatal(err)
	}
	if err := d.setEndpoint(testIfindex, policy.EndpointID(ep)); err != nil {
		t.Fatal(err)
	}
}

// pktSpec describes a crafted packet.
type pktSpec struct {
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16
	tcpFlags     uint8
	icmpType     uint8
	icmpID       uint16
	fragFirst    bool
	fragLater    bool
	fragID       uint32
	vlan         bool
	ipv4Options  int // words of IPv4 options
	ipv6HopByHop bool
	hopLimit     uint8 // IPv6 hop limit; 0 means 64
	// icmpQuote, for an ICMP error, is the packet the error is about: its
	// IP header and first L4 bytes follow the ICMP header.
	icmpQuote *pktSpec
}

func (s pktSpec) reversed() pktSpec {
	r := s
	r.src, r.dst = s.dst, s.src
	r.sport, r.dport = s.dport, s.sport
	return r
}

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// build makes an Ethernet frame for s. Checksums are left zero: the
// programs never read them.
func (s pktSpec) build() []byte {
	var l4 []byte
	switch s.proto {
	case 6:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], s.sport)
		binary.BigEndian.PutUint16(l4[2:], s.dport)
		l4[12] = 5 << 4
		l4[13] = s.tcpFlags
	case 17, 132:
		l4 = make([]byte, 12)
		binary.BigEndian.PutUint16(l4[0:], s.sport)
		binary.BigEndian.PutUint16(l4[2:], s.dport)
		binary.BigEndian.PutUint16(l4[4:], 12)
	case 1, 58:
		l4 = make([]byte, 16)
		l4[0] = s.icmpType
		binary.BigEndian.PutUint16(l4[4:], s.icmpID)
		if s.icmpQuote != nil {
			l4 = append(l4[:8], s.icmpQuote.build()[14:]...)
		}
	default:
		l4 = make([]byte, 16)
	}
	if s.fragLater {
		l4 = make([]byte, 24) // payload only
	}
	var l3 []byte
	var ethType uint16
	if s.src.Is4() {
		ethType = 0x0800
		hl := 20 + 4*s.ipv4Options
		l3 = make([]byte, hl)
		l3[0] = 0x40 | byte(hl/4)
		binary.BigEndian.PutUint16(l3[2:], uint16(hl+len(l4)))
		binary.BigEndian.PutUint16(l3[4:], uint16(s.fragID))
		var fo uint16
		if s.fragFirst {
			fo = 0x2000
		}
		if s.fragLater {
			fo = 0x0003 // offset 24 bytes, last fragment
		}
		binary.BigEndian.PutUint16(l3[6:], fo)
		l3[8] = 64
		l3[9] = s.proto
		src, dst := s.src.As4(), s.dst.As4()
		copy(l3[12:], src[:])
		copy(l3[16:], dst[:])
		for i := 20; i < hl; i++ {
			l3[i] = 1 // NOP options
		}
	} else {
		ethType = 0x86DD
		var ext []byte
		nh := s.proto
		if s.fragFirst || s.fragLater {
			f := make([]byte, 8)
			f[0] = nh
			var fo uint16
			if s.fragFirst {
				fo = 1
			} else {
				fo = 3 << 3
			}
			binary.BigEndian.PutUint16(f[2:], fo)
			binary.BigEndian.PutUint32(f[4:], s.fragID)
			ext = append(f, ext...)
			nh = 44
		}
		if s.ipv6HopByHop {
			h := make([]byte, 8)
			h[0] = nh
			h[2] = 1 // PadN
			h[3] = 4
			ext = append(h, ext...)
			nh = 0
		}
		l3 = make([]byte, 40)
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(ext)+len(l4)))
		l3[6] = nh
		l3[7] = 64
		if s.hopLimit != 0 {
			l3[7] = s.hopLimit
		}
		src, dst := s.src.As16(), s.dst.As16()
		copy(l3[8:], src[:])
		copy(l3[24:], dst[:])
		l3 = append(l3, ext...)
	}
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 2})
	if s.vlan {
		binary.BigEndian.PutUint16(eth[12:], 0x8100)
		tag := make([]byte, 4)
		binary.BigEndian.PutUint16(tag[0:], 42)
		binary.BigEndian.PutUint16(tag[2:], ethType)
		eth = append(eth, tag...)
	} else {
		binary.BigEndian.PutUint16(eth[12:], ethType)
	}
	out := append(eth, l3...)
	return append(out, l4...)
}

// run passes a packet through prog and returns its verdict.
func run(t testing.TB, prog *ebpf.Program, pkt []byte) uint32 {
	t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt})
	if err != nil {
		t.Fatalf("prog run: %v", err)
	}
	return ret
}

// ctKeyOf is the Go twin of ct_normalise, for assertions.
func ctKeyOf(ep uint32, s pktSpec) ConntrackKey {
	sport, dport := s.sport, s.dport
	if s.proto == 1 || s.proto == 58 {
		sport, dport = 0, 0
		switch s.icmpType {
		case 8, 128:
			sport = s.icmpID
		case 0, 129:
			dport = s.icmpID
		}
	}
	if s.proto != 6 && s.proto != 17 && s.proto != 132 && s.proto != 1 && s.proto != 58 {
		sport, dport = 0, 0
	}
	toWords := func(a netip.Addr) [4]uint32 {
		var w [4]uint32
		b := a.As16()
		for i := range 4 {
			w[i] = binary.NativeEndian.Uint32(b[4*i:])
		}
		return w
	}
	sa, da := s.src.As16(), s.dst.As16()
	srcFirst := true
	if c := compareBytes(sa[:], da[:]); c != 0 {
		srcFirst = c < 0
	} else {
		srcFirst = sport <= dport
	}
	k := ConntrackKey{EpId: ep, Proto: s.proto}
	if srcFirst {
		k.AddrA, k.AddrB, k.PortA, k.PortB = toWords(s.src), toWords(s.dst), sport, dport
	} else {
		k.AddrA, k.AddrB, k.PortA, k.PortB = toWords(s.dst), toWords(s.src), dport, sport
	}
	return k
}

func compareBytes(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

// ctLookup returns the conntrack entry of s's flow, if any.
func ctLookup(t testing.TB, d *Datapath, ep uint32, s pktSpec) (ConntrackItem, bool) {
	t.Helper()
	var v ConntrackItem
	err := d.lookupConntrack(ctKeyOf(ep, s), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

// drainEvents reads what the ring holds now.
func drainEvents(t testing.TB, r *EventReader) []FlowEvent {
	t.Helper()
	evs, err := r.Pending()
	if err != nil {
		t.Fatalf("read events: %v", err)
	}
	return evs
}

func openEvents(t testing.TB, d *Datapath) *EventReader {
	t.Helper()
	r, err := d.Events()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}
