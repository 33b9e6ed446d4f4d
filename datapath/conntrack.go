package datapath

import (
	"context"
	"encoding/binary"
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

// Conntrack returns every conntrack entry, IPv4 flows with v4-mapped
// addresses.
func (d *Datapath) Conntrack() ([]ConntrackEntry, error) {
	var out []ConntrackEntry
	err := d.eachConntrack(func(k ConntrackKey, v ConntrackItem, _ *ebpf.Map) {
		out = append(out, ConntrackEntry{k, v})
	})
	return out, err
}

// eachConntrack calls fn with every entry of both conntrack maps, and the
// map that holds it. IPv4 keys are given in ConntrackKey's v4-mapped form.
func (d *Datapath) eachConntrack(fn func(ConntrackKey, ConntrackItem, *ebpf.Map)) error {
	var k4 Conntrack4Key
	var v ConntrackItem
	it := d.objs.Conntrack4.Iterate()
	for it.Next(&k4, &v) {
		fn(ctKeyFrom4(k4), v, d.objs.Conntrack4)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump conntrack4: %w", err)
	}
	var k ConntrackKey
	it = d.objs.Conntrack6.Iterate()
	for it.Next(&k, &v) {
		fn(k, v, d.objs.Conntrack6)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump conntrack6: %w", err)
	}
	return nil
}

// v4mappedWord2 is the third word of a v4-mapped address (::ffff:a.b.c.d)
// in the BPF layout of address words.
var v4mappedWord2 = binary.NativeEndian.Uint32([]byte{0, 0, 0xff, 0xff})

func isV4Mapped(a [4]uint32) bool { return a[0] == 0 && a[1] == 0 && a[2] == v4mappedWord2 }

func ctKeyFrom4(k Conntrack4Key) ConntrackKey {
	out := ConntrackKey{EpId: k.EpId, PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}
	out.AddrA = [4]uint32{0, 0, v4mappedWord2, k.AddrA}
	out.AddrB = [4]uint32{0, 0, v4mappedWord2, k.AddrB}
	return out
}

// ctMapKey returns the map and key BPF uses for a flow given in
// ConntrackKey form: conntrack4 when both addresses are v4-mapped. An IPv6
// packet that carries v4-mapped addresses is tracked in conntrack6, which
// this cannot tell from the key; GC deletes by the map it found an entry in.
func (d *Datapath) ctMapKey(k ConntrackKey) (*ebpf.Map, any) {
	if isV4Mapped(k.AddrA) && isV4Mapped(k.AddrB) {
		return d.objs.Conntrack4, Conntrack4Key{AddrA: k.AddrA[3], AddrB: k.AddrB[3], EpId: k.EpId,
			PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}
	}
	return d.objs.Conntrack6, k
}

// lookupConntrack reads the entry of one flow.
func (d *Datapath) lookupConntrack(k ConntrackKey, v *ConntrackItem) error {
	m, mk := d.ctMapKey(k)
	return m.Lookup(mk, v)
}

// deleteConntrack deletes the entry of one flow.
func (d *Datapath) deleteConntrack(k ConntrackKey) error {
	m, mk := d.ctMapKey(k)
	return m.Delete(mk)
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
	now, err := d.ctNow()
	if err != nil {
		return 0, nil, err
	}
	// Flow-end events carry CLOCK_MONOTONIC, as BPF's events do.
	evNow, err := monotonicNow()
	if err != nil {
		return 0, nil, err
	}
	type expiredEntry struct {
		ConntrackEntry
		m  *ebpf.Map
		mk any
	}
	var expired []expiredEntry
	err = d.eachConntrack(func(k ConntrackKey, v ConntrackItem, m *ebpf.Map) {
		if now > v.LastSeen && time.Duration(now-v.LastSeen) > d.ctTimeout(&k, &v) {
			// Delete from the map that holds the entry: an IPv6 packet
			// may carry v4-mapped addresses.
			var mk any = k
			if m == d.objs.Conntrack4 {
				_, mk = d.ctMapKey(k)
			}
			expired = append(expired, expiredEntry{ConntrackEntry{k, v}, m, mk})
		}
	})
	if err != nil {
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
		if err := e.m.Delete(e.mk); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			return deleted, ended, fmt.Errorf("delete conntrack entry: %w", err)
		}
		deleted++
		if !e.Closed() && !e.Denied() {
			ev := endEventOf(e.ConntrackEntry, evNow)
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
