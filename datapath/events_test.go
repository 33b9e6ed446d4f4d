package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"
	"unsafe"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// decodeEventReflect is the reference decoder: encoding/binary.Read into
// the bpf2go struct, then field by field into a FlowEvent.
func decodeEventReflect(raw []byte) (FlowEvent, error) {
	var e segmentFlowEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &e); err != nil {
		return FlowEvent{}, err
	}
	ev := FlowEvent{
		Type:        EventType(e.Type),
		Timestamp:   e.Timestamp,
		Endpoint:    policy.EndpointID(e.EpId),
		Ifindex:     e.Ifindex,
		Direction:   policy.Direction(e.Dir),
		IsReply:     e.Flags&evfReply != 0,
		Tunnelled:   e.Flags&evfTunnelled != 0,
		MTLS:        e.Flags&evfMTLS != 0,
		PickedUp:    e.Flags&evfPickup != 0,
		Verdict:     policy.Verdict(e.Verdict),
		DropReason:  DropReason(e.DropReason),
		Rule:        policy.RuleID(e.RuleId),
		Proto:       e.Proto,
		Src:         addrOf(e.Saddr),
		Dst:         addrOf(e.Daddr),
		SrcPort:     e.Sport,
		DstPort:     e.Dport,
		SrcIdentity: identity.NumericID(e.SrcIdentity),
		DstIdentity: identity.NumericID(e.DstIdentity),
	}
	if ev.Proto == 1 || ev.Proto == 58 {
		ev.ICMPType = e.TcpFlags
	} else {
		ev.TCPFlags = e.TcpFlags
	}
	return ev, nil
}

func TestEventLayout(t *testing.T) {
	var e segmentFlowEvent
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"size", unsafe.Sizeof(e), 72},
		{"timestamp", unsafe.Offsetof(e.Timestamp), offTimestamp},
		{"saddr", unsafe.Offsetof(e.Saddr), offSaddr},
		{"daddr", unsafe.Offsetof(e.Daddr), offDaddr},
		{"ep_id", unsafe.Offsetof(e.EpId), offEpID},
		{"ifindex", unsafe.Offsetof(e.Ifindex), offIfindex},
		{"src_identity", unsafe.Offsetof(e.SrcIdentity), offSrcIdentity},
		{"dst_identity", unsafe.Offsetof(e.DstIdentity), offDstIdentity},
		{"rule_id", unsafe.Offsetof(e.RuleId), offRuleID},
		{"sport", unsafe.Offsetof(e.Sport), offSport},
		{"dport", unsafe.Offsetof(e.Dport), offDport},
		{"type", unsafe.Offsetof(e.Type), offType},
		{"verdict", unsafe.Offsetof(e.Verdict), offVerdict},
		{"drop_reason", unsafe.Offsetof(e.DropReason), offDropReason},
		{"dir", unsafe.Offsetof(e.Dir), offDir},
		{"proto", unsafe.Offsetof(e.Proto), offProto},
		{"tcp_flags", unsafe.Offsetof(e.TcpFlags), offTCPFlags},
		{"flags", unsafe.Offsetof(e.Flags), offFlags},
		{"ipv6", unsafe.Offsetof(e.Ipv6), offIPv6},
	} {
		if c.got != c.want {
			t.Errorf("struct flow_event %s: bpf2go says %d, DecodeEvent uses %d", c.name, c.got, c.want)
		}
	}
	if EventSize != int(unsafe.Sizeof(e)) {
		t.Errorf("EventSize %d", EventSize)
	}
}

// TestDecodeEventMatchesReflect decodes random records with both decoders;
// they must agree on every field. Half the records carry IPv4-mapped
// addresses, the datapath's encoding of IPv4, so Unmap is exercised.
func TestDecodeEventMatchesReflect(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	raw := make([]byte, EventSize+8)
	for i := range 100000 {
		for j := range raw {
			raw[j] = byte(rng.Uint32())
		}
		if i%2 == 0 {
			for _, off := range []int{offSaddr, offDaddr} {
				copy(raw[off:], []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff})
			}
		}
		n := EventSize + i%9 // longer records decode too
		got, err := DecodeEvent(raw[:n])
		if err != nil {
			t.Fatal(err)
		}
		want, err := decodeEventReflect(raw[:n])
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("record %x\n DecodeEvent %+v\n binary.Read %+v", raw[:n], got, want)
		}
		if i%2 == 0 && !got.Src.Is4() {
			t.Fatalf("IPv4-mapped source decoded as %s", got.Src)
		}
	}
}

func TestDecodeEventShort(t *testing.T) {
	for _, n := range []int{0, 1, EventSize - 1} {
		_, err := DecodeEvent(make([]byte, n))
		if !errors.Is(err, ErrShortEvent) {
			t.Fatalf("%d bytes: err %v, want ErrShortEvent", n, err)
		}
		if _, rerr := decodeEventReflect(make([]byte, n)); rerr == nil {
			t.Fatalf("%d bytes: the reference decoder accepts it", n)
		}
	}
}

func TestAppendEventRoundTrip(t *testing.T) {
	for _, ev := range []FlowEvent{
		{Type: EventFlowNew, Timestamp: 123456789, Endpoint: 7, Ifindex: 42, Direction: policy.Ingress,
			Verdict: policy.VerdictAllow, Rule: 9, Proto: 6, Src: netip.MustParseAddr("10.0.0.1"),
			Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: 40000, DstPort: 80, SrcIdentity: 300, DstIdentity: 400, TCPFlags: 0x12},
		{Type: EventDrop, Timestamp: 1, Endpoint: 8, Direction: policy.Egress, IsReply: true, Verdict: policy.VerdictDeny,
			DropReason: DropPolicy, Proto: 17, Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"),
			SrcPort: 53, DstPort: 5353, SrcIdentity: 2, DstIdentity: 1},
		{Type: EventFlowNew, Endpoint: 9, Direction: policy.Egress, Verdict: policy.VerdictAllow, Tunnelled: true, Proto: 6,
			Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: 1, DstPort: 80},
		{Type: EventFlowEnd, Endpoint: 9, Direction: policy.Ingress, Verdict: policy.VerdictAllow, MTLS: true, IsReply: true,
			Proto: 6, Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), SrcPort: 1, DstPort: 80},
		{Type: EventDrop, Endpoint: 9, Verdict: policy.VerdictDeny, DropReason: DropAuthRequired, Proto: 6,
			Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2")},
	} {
		raw := AppendEvent([]byte("prefix"), &ev)
		if len(raw) != len("prefix")+EventSize {
			t.Fatalf("length %d", len(raw))
		}
		got, err := DecodeEvent(raw[len("prefix"):])
		if err != nil {
			t.Fatal(err)
		}
		if got != ev {
			t.Fatalf("round trip\n got %+v\nwant %+v", got, ev)
		}
		ref, err := decodeEventReflect(raw[len("prefix"):])
		if err != nil || !reflect.DeepEqual(ref, ev) {
			t.Fatalf("reference decoder: %+v, %v", ref, err)
		}
	}
}

func TestDecodeEventAllocs(t *testing.T) {
	ev := FlowEvent{Type: EventFlowNew, Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("10.0.0.2")}
	raw := AppendEvent(nil, &ev)
	if n := testing.AllocsPerRun(100, func() {
		if _, err := DecodeEvent(raw); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("DecodeEvent allocates %v times", n)
	}
}

func BenchmarkDecodeEvent(b *testing.B) {
	ev := FlowEvent{Type: EventFlowNew, Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), Proto: 6}
	raw := AppendEvent(nil, &ev)
	b.Run("fixed-offsets", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := DecodeEvent(raw); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("binary.Read", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := decodeEventReflect(raw); err != nil {
				b.Fatal(err)
			}
		}
	})
}
