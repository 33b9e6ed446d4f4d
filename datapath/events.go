package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// EventType tells what a FlowEvent reports.
type EventType uint8

const (
	EventFlowNew EventType = 1
	EventDrop    EventType = 2
	EventFlowEnd EventType = 3
)

func (t EventType) String() string {
	switch t {
	case EventFlowNew:
		return "new"
	case EventDrop:
		return "drop"
	case EventFlowEnd:
		return "end"
	}
	return "unknown"
}

// DropReason tells why a packet was dropped.
type DropReason uint8

const (
	DropNone DropReason = 0
	// DropPolicy: a new flow was denied by a rule or the default.
	DropPolicy DropReason = 1
	// DropPolicyRevised: an established flow was denied after a policy change.
	DropPolicyRevised DropReason = 2
	// DropMalformed: a truncated or inconsistent header.
	DropMalformed DropReason = 3
	// Source validation at the pod's egress (bpf/lib/srcval.h).
	// DropInvalidSource: the IP source, or an ARP sender IP or NDP target,
	// is not one of the pod's addresses.
	DropInvalidSource DropReason = 4
	// DropInvalidSourceMAC: the Ethernet source, or an ARP/NDP link-layer
	// address, is not the pod's MAC.
	DropInvalidSourceMAC DropReason = 5
	// DropForbiddenICMPv6: a router advertisement or redirect, or NDP/MLD
	// outside its hop-limit and link-local rules.
	DropForbiddenICMPv6 DropReason = 6
	// DropUnsupportedL2: an ethertype other than IPv4, IPv6 and ARP, or
	// stacked VLAN tags.
	DropUnsupportedL2 DropReason = 7
	// DropAuthRequired: plaintext TCP that only an mtls: Required allow
	// would admit, or new plaintext TCP to an enrolled pod from an
	// enrolled peer (rule 0: no rule decided it; the source did not
	// tunnel it). On an AUDIT flow-new event it says the same of a flow
	// that audit mode let pass.
	DropAuthRequired DropReason = 8
	// DropTunnelDown: a flow that must go through the node's mTLS tunnel,
	// and the tunnel has no listener (the agent is down), or the pod's
	// endpoint_addrs slot is gone, so it is not known whether a bridge
	// would switch the packet past the tunnel.
	DropTunnelDown DropReason = 9
	// DropQuarantined: the endpoint is quarantined (SetQuarantine); the
	// event's RuleID is the quarantine's number.
	DropQuarantined DropReason = 10
)

// SourceValidation reports whether r is one of source validation's drop
// reasons: the packet was refused for what it claimed, not by policy.
func (r DropReason) SourceValidation() bool {
	return r >= DropInvalidSource && r <= DropUnsupportedL2
}

func (r DropReason) String() string {
	switch r {
	case DropNone:
		return ""
	case DropPolicy:
		return "POLICY_DENIED"
	case DropPolicyRevised:
		return "POLICY_DENIED_REVISED"
	case DropMalformed:
		return "MALFORMED"
	case DropInvalidSource:
		return "INVALID_SOURCE_IP"
	case DropInvalidSourceMAC:
		return "INVALID_SOURCE_MAC"
	case DropForbiddenICMPv6:
		return "FORBIDDEN_ICMP6_MESSAGE"
	case DropUnsupportedL2:
		return "UNSUPPORTED_L2_PROTOCOL"
	case DropAuthRequired:
		return "AUTH_REQUIRED"
	case DropTunnelDown:
		return "TUNNEL_DOWN"
	case DropQuarantined:
		return "QUARANTINED"
	}
	return fmt.Sprintf("REASON_%d", uint8(r))
}

// VerdictPass is the counters' verdict for packets that were not judged:
// unmanaged endpoints, non-IP, IPv6 neighbour discovery.
const VerdictPass policy.Verdict = 4

// FlowEvent is one event from the datapath's ring buffer.
type FlowEvent struct {
	Type EventType
	// Timestamp is CLOCK_MONOTONIC nanoseconds. BPF stamps events with the
	// conntrack clock, so those from the kernel have a tick's resolution
	// (1/HZ); EventReader converts them. DecodeEvent leaves the raw value.
	Timestamp uint64
	Endpoint  policy.EndpointID
	Ifindex   uint32
	// Direction is the flow's, as seen from the endpoint; IsReply tells
	// whether this packet went against it.
	Direction   policy.Direction
	IsReply     bool
	Verdict     policy.Verdict
	DropReason  DropReason
	Rule        policy.RuleID
	Proto       uint8
	Src, Dst    netip.Addr
	SrcPort     uint16
	DstPort     uint16
	SrcIdentity identity.NumericID
	DstIdentity identity.NumericID
	// TCPFlags are the TCP packet's flags; zero for other protocols.
	TCPFlags uint8
	// ICMPType is the ICMP or ICMPv6 packet's type (the event's flags byte
	// carries it for those protocols); zero for other protocols.
	ICMPType uint8
	// Tunnelled: the flow was redirected into the node's mTLS tunnel at
	// its source pod (this endpoint).
	Tunnelled bool
	// MTLS: the flow was delivered to this endpoint by the tunnel; the
	// source identity is the one the tunnel verified.
	MTLS bool
	// PickedUp: a TCP reply whose flow had no conntrack entry (evicted,
	// expired) and which its own direction's policy denies, passed because
	// the direction its connection was opened in is allowed; the flow is
	// tracked again from it (EventFlowNew, IsReply).
	PickedUp bool
}

func isICMP(proto uint8) bool { return proto == 1 || proto == 58 }

// flow_event.flags (EVF_*).
const (
	evfReply     = 1 << 0
	evfTunnelled = 1 << 1
	evfMTLS      = 1 << 2
	evfPickup    = 1 << 3
)

// EventSize is the size of one flow event record in the ring buffer
// (struct flow_event in bpf/include).
const EventSize = int(unsafe.Sizeof(segmentFlowEvent{}))

// ErrShortEvent is returned for a ring-buffer record shorter than EventSize.
var ErrShortEvent = errors.New("short flow event")

// Offsets of the fields of struct flow_event. The test checks them against
// the bpf2go struct, so a change of the C struct fails it rather than
// decoding garbage.
const (
	offTimestamp   = 0
	offSaddr       = 8
	offDaddr       = 24
	offEpID        = 40
	offIfindex     = 44
	offSrcIdentity = 48
	offDstIdentity = 52
	offRuleID      = 56
	offSport       = 60
	offDport       = 62
	offType        = 64
	offVerdict     = 65
	offDropReason  = 66
	offDir         = 67
	offProto       = 68
	offTCPFlags    = 69
	offFlags       = 70
	offIPv6        = 71
)

// DecodeEvent decodes one ring-buffer record. It reads the fixed layout
// field by field: encoding/binary.Read reflects over the struct and
// allocates on every call, and an unsafe cast would need the record to be
// aligned, which a caller's buffer need not be. The fixed-offset loads
// compile to plain moves. Bytes past EventSize are ignored, so a newer
// datapath may append fields.
func DecodeEvent(raw []byte) (FlowEvent, error) {
	if len(raw) < EventSize {
		return FlowEvent{}, fmt.Errorf("decode flow event: %w: %d bytes, want %d", ErrShortEvent, len(raw), EventSize)
	}
	raw = raw[:EventSize] // one bounds check for all the loads below
	ne := binary.NativeEndian
	ev := FlowEvent{
		Type:        EventType(raw[offType]),
		Timestamp:   ne.Uint64(raw[offTimestamp:]),
		Endpoint:    policy.EndpointID(ne.Uint32(raw[offEpID:])),
		Ifindex:     ne.Uint32(raw[offIfindex:]),
		Direction:   policy.Direction(raw[offDir]),
		IsReply:     raw[offFlags]&evfReply != 0,
		Tunnelled:   raw[offFlags]&evfTunnelled != 0,
		MTLS:        raw[offFlags]&evfMTLS != 0,
		PickedUp:    raw[offFlags]&evfPickup != 0,
		Verdict:     policy.Verdict(raw[offVerdict]),
		DropReason:  DropReason(raw[offDropReason]),
		Rule:        policy.RuleID(ne.Uint32(raw[offRuleID:])),
		Proto:       raw[offProto],
		Src:         netip.AddrFrom16([16]byte(raw[offSaddr : offSaddr+16])).Unmap(),
		Dst:         netip.AddrFrom16([16]byte(raw[offDaddr : offDaddr+16])).Unmap(),
		SrcPort:     ne.Uint16(raw[offSport:]),
		DstPort:     ne.Uint16(raw[offDport:]),
		SrcIdentity: identity.NumericID(ne.Uint32(raw[offSrcIdentity:])),
		DstIdentity: identity.NumericID(ne.Uint32(raw[offDstIdentity:])),
	}
	if isICMP(ev.Proto) {
		ev.ICMPType = raw[offTCPFlags]
	} else {
		ev.TCPFlags = raw[offTCPFlags]
	}
	return ev, nil
}

// AppendEvent appends ev as the datapath writes it to the ring buffer: the
// inverse of DecodeEvent, for replaying events and for tests of consumers.
// IPv4 addresses are written IPv4-mapped, as the datapath does.
func AppendEvent(dst []byte, ev *FlowEvent) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, EventSize)...)
	b := dst[n:]
	ne := binary.NativeEndian
	ne.PutUint64(b[offTimestamp:], ev.Timestamp)
	src, dstAddr := ev.Src.As16(), ev.Dst.As16()
	copy(b[offSaddr:], src[:])
	copy(b[offDaddr:], dstAddr[:])
	ne.PutUint32(b[offEpID:], uint32(ev.Endpoint))
	ne.PutUint32(b[offIfindex:], ev.Ifindex)
	ne.PutUint32(b[offSrcIdentity:], uint32(ev.SrcIdentity))
	ne.PutUint32(b[offDstIdentity:], uint32(ev.DstIdentity))
	ne.PutUint32(b[offRuleID:], uint32(ev.Rule))
	ne.PutUint16(b[offSport:], ev.SrcPort)
	ne.PutUint16(b[offDport:], ev.DstPort)
	b[offType] = uint8(ev.Type)
	b[offVerdict] = uint8(ev.Verdict)
	b[offDropReason] = uint8(ev.DropReason)
	b[offDir] = uint8(ev.Direction)
	b[offProto] = ev.Proto
	b[offTCPFlags] = ev.TCPFlags
	if isICMP(ev.Proto) {
		b[offTCPFlags] = ev.ICMPType
	}
	if ev.IsReply {
		b[offFlags] |= evfReply
	}
	if ev.Tunnelled {
		b[offFlags] |= evfTunnelled
	}
	if ev.PickedUp {
		b[offFlags] |= evfPickup
	}
	if ev.MTLS {
		b[offFlags] |= evfMTLS
	}
	if ev.Src.Is6() && !ev.Src.Is4In6() {
		b[offIPv6] = 1
	}
	return dst
}

// EventReader reads flow events. Only one reader should exist per datapath.
//
// BPF wakes the reader only when a batch is pending (a wakeup per event
// would cost more than judging the flow), so Read polls every
// eventPollInterval: an event waits at most that long.
type EventReader struct {
	rd       *ringbuf.Reader
	rec      ringbuf.Record // reused: reading allocates nothing
	deadline time.Time

	// The conntrack clock plus offset is CLOCK_MONOTONIC, re-measured
	// every clockRefresh: with a jiffy rounded to whole nanoseconds (HZ
	// 300) the two drift apart by about 0.4 ms an hour.
	d        *Datapath
	offset   int64
	offsetAt time.Time
}

const clockRefresh = time.Minute

const eventPollInterval = 20 * time.Millisecond

// ErrClosed is returned by EventReader.Read after Close.
var ErrClosed = ringbuf.ErrClosed

// Events opens a reader on the flow event ring buffer.
func (d *Datapath) Events() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.objs.Events)
	if err != nil {
		return nil, fmt.Errorf("open event ring: %w", err)
	}
	r := &EventReader{rd: rd, d: d}
	if err := r.measureOffset(); err != nil {
		rd.Close()
		return nil, err
	}
	return r, nil
}

// measureOffset measures CLOCK_MONOTONIC minus the conntrack clock. The
// conntrack clock reads the start of the current tick, so the offset is
// taken from the moment a tick begins, when the two agree: the read after
// the clock moves, bracketed by monotonic reads.
func (r *EventReader) measureOffset() error {
	prev, err := r.d.ctNow()
	if err != nil {
		return err
	}
	edge := false
	deadline := time.Now().Add(100 * time.Millisecond)
	for time.Now().Before(deadline) {
		t0, err := monotonicNow()
		if err != nil {
			return err
		}
		ct, err := r.d.ctNow()
		if err != nil {
			return err
		}
		t1, _ := monotonicNow()
		if ct != prev {
			// The tick began between the previous read and t1.
			r.offset = int64(t0+(t1-t0)/2) - int64(ct)
			edge = true
			break
		}
		r.offset = int64(t1) - int64(ct)
		prev = ct
	}
	if !edge {
		// No tick seen in time: the last read leaves an error of up
		// to one tick.
		r.d.log.Debug("event clock: no tick edge seen; offset within a tick")
	}
	r.offsetAt = time.Now()
	return nil
}

// Read blocks until the next event, the deadline (os.ErrDeadlineExceeded)
// or Close (ErrClosed).
func (r *EventReader) Read() (FlowEvent, error) {
	for {
		now := time.Now()
		poll := now.Add(eventPollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(poll) {
			poll = r.deadline
		}
		r.rd.SetDeadline(poll)
		err := r.rd.ReadInto(&r.rec)
		switch {
		case err == nil:
			ev, err := DecodeEvent(r.rec.RawSample)
			if err != nil {
				return ev, err
			}
			if now.Sub(r.offsetAt) > clockRefresh {
				if err := r.measureOffset(); err != nil {
					r.d.log.Warn("event clock", "error", err)
				}
			}
			ev.Timestamp = uint64(int64(ev.Timestamp) + r.offset)
			return ev, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			if !r.deadline.IsZero() && !time.Now().Before(r.deadline) {
				return FlowEvent{}, err
			}
		case errors.Is(err, ringbuf.ErrClosed):
			return FlowEvent{}, ErrClosed
		default:
			return FlowEvent{}, fmt.Errorf("read event: %w", err)
		}
	}
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t; the zero
// time means no deadline. Not safe to call concurrently with Read.
func (r *EventReader) SetDeadline(t time.Time) { r.deadline = t }

// Pending drains what is in the ring now without blocking.
func (r *EventReader) Pending() ([]FlowEvent, error) {
	saved := r.deadline
	r.deadline = time.Now()
	defer func() { r.deadline = saved }()
	var out []FlowEvent
	for {
		ev, err := r.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, ev)
	}
}

// Close unblocks Read.
func (r *EventReader) Close() error { return r.rd.Close() }
