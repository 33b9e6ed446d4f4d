package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

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
)

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
	}
	return fmt.Sprintf("REASON_%d", uint8(r))
}

// VerdictPass is the counters' verdict for packets that were not judged:
// unmanaged endpoints, non-IP, IPv6 neighbour discovery.
const VerdictPass policy.Verdict = 4

// FlowEvent is one event from the datapath's ring buffer.
type FlowEvent struct {
	Type EventType
	// Timestamp is CLOCK_MONOTONIC nanoseconds.
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
	TCPFlags    uint8
}

func decodeEvent(raw []byte) (FlowEvent, error) {
	var e segmentFlowEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &e); err != nil {
		return FlowEvent{}, fmt.Errorf("decode flow event: %w", err)
	}
	return flowEventOf(&e), nil
}

func flowEventOf(e *segmentFlowEvent) FlowEvent {
	return FlowEvent{
		Type:        EventType(e.Type),
		Timestamp:   e.Timestamp,
		Endpoint:    policy.EndpointID(e.EpId),
		Ifindex:     e.Ifindex,
		Direction:   policy.Direction(e.Dir),
		IsReply:     e.IsReply != 0,
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
		TCPFlags:    e.TcpFlags,
	}
}

// EventReader reads flow events. Only one reader should exist per datapath.
//
// BPF wakes the reader only when a batch is pending (a wakeup per event
// would cost more than judging the flow), so Read polls every
// eventPollInterval: an event waits at most that long.
type EventReader struct {
	rd       *ringbuf.Reader
	deadline time.Time
}

const eventPollInterval = 50 * time.Millisecond

// ErrClosed is returned by EventReader.Read after Close.
var ErrClosed = ringbuf.ErrClosed

// Events opens a reader on the flow event ring buffer.
func (d *Datapath) Events() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.objs.Events)
	if err != nil {
		return nil, fmt.Errorf("open event ring: %w", err)
	}
	return &EventReader{rd: rd}, nil
}

// Read blocks until the next event, the deadline (os.ErrDeadlineExceeded)
// or Close (ErrClosed).
func (r *EventReader) Read() (FlowEvent, error) {
	for {
		poll := time.Now().Add(eventPollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(poll) {
			poll = r.deadline
		}
		r.rd.SetDeadline(poll)
		rec, err := r.rd.Read()
		switch {
		case err == nil:
			return decodeEvent(rec.RawSample)
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
