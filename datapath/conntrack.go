package datapath

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// CT state bits (bpf/include/bulkhead.h).
const (
	ctClosed = 1 << 4
	ctDenied = 1 << 5
)

const (
	protoTCP = 6
)

// ConntrackEntry is one live conntrack entry.
type ConntrackEntry struct {
	Key   ConntrackKey
	Entry ConntrackItem
}

// Closed reports whether the flow saw an RST or a FIN from both sides.
func (e ConntrackEntry) Closed() bool { return e.Entry.State&ctClosed != 0 }

// Denied reports whether a policy change denied the flow (a tombstone).
func (e ConntrackEntry) Denied() bool { return e.Entry.State&ctDenied != 0 }

// Conntrack returns every conntrack entry.
func (d *Datapath) Conntrack() ([]ConntrackEntry, error) {
	var out []ConntrackEntry
	var k ConntrackKey
	var v ConntrackItem
	it := d.objs.Conntrack.Iterate()
	for it.Next(&k, &v) {
		out = append(out, ConntrackEntry{k, v})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump conntrack: %w", err)
	}
	return out, nil
}

// monotonicNow is bpf_ktime_get_ns's clock.
func monotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read monotonic clock: %w", err)
	}
	return uint64(ts.Nano()), nil
}

func (d *Datapath) ctTimeout(k *ConntrackKey, v *ConntrackItem) time.Duration {
	switch {
	case v.State&(ctClosed|ctDenied) != 0:
		return d.cfg.CTTimeoutClosing
	case k.Proto == protoTCP:
		return d.cfg.CTTimeoutTCP
	}
	return d.cfg.CTTimeoutOther
}

// GC deletes expired conntrack entries. It returns a flow-end event for each
// flow that timed out (flows closed by FIN/RST had theirs from BPF).
func (d *Datapath) GC() (deleted int, ended []FlowEvent, err error) {
	now, err := monotonicNow()
	if err != nil {
		return 0, nil, err
	}
	var expired []ConntrackEntry
	var k ConntrackKey
	var v ConntrackItem
	it := d.objs.Conntrack.Iterate()
	for it.Next(&k, &v) {
		if now > v.LastSeen && time.Duration(now-v.LastSeen) > d.ctTimeout(&k, &v) {
			expired = append(expired, ConntrackEntry{k, v})
		}
	}
	if err := it.Err(); err != nil {
		return 0, nil, fmt.Errorf("scan conntrack: %w", err)
	}
	ids := map[policy.EndpointID]identity.NumericID{}
	d.mu.Lock()
	for ep, c := range d.epConfigs {
		ids[ep] = identity.NumericID(c.Identity)
	}
	d.mu.Unlock()
	epIdentity := func(ep policy.EndpointID) identity.NumericID { return ids[ep] }
	for _, e := range expired {
		if err := d.objs.Conntrack.Delete(e.Key); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			return deleted, ended, fmt.Errorf("delete conntrack entry: %w", err)
		}
		deleted++
		if !e.Closed() && !e.Denied() {
			ev := endEventOf(e, now)
			if ev.Direction == policy.Egress {
				ev.SrcIdentity = epIdentity(ev.Endpoint)
			} else {
				ev.DstIdentity = epIdentity(ev.Endpoint)
			}
			ended = append(ended, ev)
		}
	}
	return deleted, ended, nil
}

// endEventOf describes a timed-out flow in its original orientation.
func endEventOf(e ConntrackEntry, now uint64) FlowEvent {
	k, v := e.Key, e.Entry
	ev := FlowEvent{
		Type: EventFlowEnd, Timestamp: now, Endpoint: policy.EndpointID(k.EpId),
		Direction: policy.Direction(v.Dir), Verdict: policy.Verdict(v.Verdict),
		Rule: policy.RuleID(v.RuleId), Proto: k.Proto,
	}
	src, dst, sport, dport := addrOf(k.AddrA), addrOf(k.AddrB), k.PortA, k.PortB
	if v.OrigIsA == 0 {
		src, dst, sport, dport = dst, src, dport, sport
	}
	ev.Src, ev.Dst, ev.SrcPort, ev.DstPort = src, dst, sport, dport
	peer := identity.NumericID(v.PeerId)
	if ev.Direction == policy.Egress {
		ev.DstIdentity = peer
	} else {
		ev.SrcIdentity = peer
	}
	return ev
}

// RunGC runs GC every interval until ctx ends, handing the flows that timed
// out to ended (which may be nil). It logs GC errors and keeps going.
func (d *Datapath) RunGC(ctx context.Context, interval time.Duration, ended func([]FlowEvent)) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		n, evs, err := d.GC()
		if err != nil {
			d.log.Warn("conntrack gc", "error", err)
		}
		if n > 0 {
			d.log.Debug("conntrack gc", "deleted", n, "timed_out", len(evs))
		}
		if ended != nil && len(evs) > 0 {
			ended(evs)
		}
	}
}
