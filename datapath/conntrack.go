package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// CT state bits (bpf/include/bulkhead.h).
const (
	ctClosed   = 1 << 4
	ctDenied   = 1 << 5
	ctRedirect = 1 << 6
	ctTunnel   = 1 << 7
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

// Tunnelled reports whether the flow was redirected into the node's mTLS
// tunnel at its source pod (CT_REDIRECT).
func (e ConntrackEntry) Tunnelled() bool { return e.Entry.State&ctRedirect != 0 }

// MTLS reports whether the tunnel delivered the flow to its pod; PeerId is
// then the identity the tunnel verified (CT_TUNNEL).
func (e ConntrackEntry) MTLS() bool { return e.Entry.State&ctTunnel != 0 }

// Conntrack returns every conntrack entry, IPv4 flows with v4-mapped
// addresses.
func (d *Datapath) Conntrack() ([]ConntrackEntry, error) {
	var out []ConntrackEntry
	err := d.eachConntrack(func(k ConntrackKey, v ConntrackItem, _ ctRef) {
		out = append(out, ConntrackEntry{k, v})
	})
	return out, err
}

// The conntrack tables (bpf/lib/ct.h) are arrays of buckets of ctWays
// slots, mapped into this process. Go follows BPF's protocol: a slot is read
// between two equal, even reads of its seq, and written only by the one who
// moved seq from the value it read to odd, which then adds one more.
const ctWays = 4

type (
	ct4Slot = segmentCt4Slot
	ct6Slot = segmentCt6Slot
)

// ctTable is one address family's conntrack table.
type ctTable struct {
	mem      []byte
	buckets  uint32
	slotSize uintptr
	v6       bool
}

// ctRef names one slot and the seq its entry was read at.
type ctRef struct {
	t    *ctTable
	off  uintptr
	seen uint32
}

func mapCTTable(m *ebpf.Map, v6 bool) (*ctTable, error) {
	t := &ctTable{buckets: m.MaxEntries(), v6: v6, slotSize: unsafe.Sizeof(ct4Slot{})}
	if v6 {
		t.slotSize = unsafe.Sizeof(ct6Slot{})
	}
	if want := uint32(t.slotSize * ctWays); m.ValueSize() != want {
		return nil, fmt.Errorf("conntrack table: bucket of %d bytes, want %d (pinned by another version?)", m.ValueSize(), want)
	}
	var err error
	t.mem, err = mapArray(m, "conntrack table", int(t.buckets)*ctWays*int(t.slotSize))
	if err != nil {
		return nil, err
	}
	return t, nil
}

func (t *ctTable) close() error {
	if t == nil {
		return nil
	}
	return unmapArray(&t.mem)
}

func (t *ctTable) seq(off uintptr) *uint32 { return (*uint32)(unsafe.Pointer(&t.mem[off])) }

// read copies the slot at off, as bpf/lib/ct.h's readers do: a slot being
// written (odd seq), or one that changed while it was copied, is read
// again rather than taken for absent, up to a bound (a writer holds a slot
// for a few stores). ok is false for an empty slot, or one that kept
// changing under the reader. Only amd64 runs this (checkMemoryOrder): the
// plain copy between two atomic loads relies on loads not being reordered
// with loads.
func (t *ctTable) read(off uintptr) (k ConntrackKey, v ConntrackItem, seen uint32, ok bool) {
	seq := t.seq(off)
	for range 1000 {
		s := atomic.LoadUint32(seq)
		if s&1 != 0 {
			runtime.Gosched()
			continue
		}
		if t.v6 {
			sl := *(*ct6Slot)(unsafe.Pointer(&t.mem[off]))
			k, v = sl.Key, sl.Entry
		} else {
			sl := *(*ct4Slot)(unsafe.Pointer(&t.mem[off]))
			k, v = ctKeyFrom4(sl.Key), sl.Entry
		}
		if atomic.LoadUint32(seq) == s {
			return k, v, s, k.EpId != 0
		}
	}
	return k, v, 0, false
}

// remove empties the slot if it still holds what was read at r.seen.
func (r ctRef) remove() bool {
	seq := r.t.seq(r.off)
	if !atomic.CompareAndSwapUint32(seq, r.seen, r.seen+1) {
		return false
	}
	clear(r.t.mem[r.off+4 : r.off+r.t.slotSize])
	atomic.AddUint32(seq, 1)
	return true
}

// each calls fn with every occupied slot.
func (t *ctTable) each(fn func(ConntrackKey, ConntrackItem, ctRef)) {
	n := uintptr(t.buckets) * ctWays
	for i := range n {
		off := i * t.slotSize
		if k, v, seen, ok := t.read(off); ok {
			fn(k, v, ctRef{t, off, seen})
		}
	}
}

// find returns the slot that holds k (in the table's own key form): the
// first way that does, as in BPF, which also keeps the lower of two copies
// that concurrent inserts made (PFX_dedup) until it removes the other.
func (t *ctTable) find(k ConntrackKey, seed uint32) (ConntrackItem, ctRef, bool) {
	var h uint32
	if t.v6 {
		h = ctHash((*[unsafe.Sizeof(ConntrackKey{}) / 4]uint32)(unsafe.Pointer(&k))[:], seed)
	} else {
		k4 := ct4KeyOf(k)
		h = ctHash((*[unsafe.Sizeof(Conntrack4Key{}) / 4]uint32)(unsafe.Pointer(&k4))[:], seed)
	}
	base := uintptr(h&(t.buckets-1)) * ctWays * t.slotSize
	for w := range uintptr(ctWays) {
		off := base + w*t.slotSize
		if sk, v, seen, ok := t.read(off); ok && sk == k {
			return v, ctRef{t, off, seen}, true
		}
	}
	return ConntrackItem{}, ctRef{}, false
}

// ctHashMuls and ctHash are their twins in bpf/lib/ct.h.
var ctHashMuls = [11]uint64{
	0x9e3779b97f4a7c15, 0xbf58476d1ce4e5b9, 0x94d049bb133111eb, 0xd6e8feb86659fd93,
	0xa0761d6478bd642f, 0xe7037ed1a0b428db, 0x8ebc6af09c88c6e3, 0x589965cc75374cc3,
	0x1d8e4e27c47d124f, 0xc2b2ae3d27d4eb4f, 0x165667b19e3779f9,
}

func ctHash(words []uint32, seed uint32) uint32 {
	var sum uint64
	for i, w := range words {
		sum += uint64(w^seed) * ctHashMuls[i]
	}
	sum ^= sum >> 32
	return uint32((sum * 0x9e3779b97f4a7c15) >> 32)
}

// eachConntrack calls fn with every entry of both tables. IPv4 keys are
// given in ConntrackKey's v4-mapped form.
func (d *Datapath) eachConntrack(fn func(ConntrackKey, ConntrackItem, ctRef)) error {
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	if d.ct4 == nil || d.ct6 == nil {
		return errClosed
	}
	d.ct4.each(fn)
	d.ct6.each(fn)
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

func ct4KeyOf(k ConntrackKey) Conntrack4Key {
	return Conntrack4Key{AddrA: k.AddrA[3], AddrB: k.AddrB[3], EpId: k.EpId,
		PortA: k.PortA, PortB: k.PortB, Proto: k.Proto}
}

// ctTableOf returns the table BPF uses for a flow given in ConntrackKey
// form: conntrack4 when both addresses are v4-mapped. An IPv6 packet that
// carries v4-mapped addresses is tracked in conntrack6, which this cannot
// tell from the key; GC deletes through the slot it found an entry in.
func (d *Datapath) ctTableOf(k ConntrackKey) *ctTable {
	if isV4Mapped(k.AddrA) && isV4Mapped(k.AddrB) {
		return d.ct4
	}
	return d.ct6
}

func (d *Datapath) ctSeed() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.global.CtSeed
}

// lookupConntrack reads the entry of one flow; ebpf.ErrKeyNotExist if
// there is none.
func (d *Datapath) lookupConntrack(k ConntrackKey, v *ConntrackItem) error {
	return d.findConntrack(k, func(e ConntrackItem, _ ctRef) error {
		*v = e
		return nil
	})
}

// findConntrack calls fn with the entry of one flow and its slot, or
// returns ebpf.ErrKeyNotExist.
func (d *Datapath) findConntrack(k ConntrackKey, fn func(ConntrackItem, ctRef) error) error {
	seed := d.ctSeed()
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	if d.ct4 == nil {
		return errClosed
	}
	e, ref, ok := d.ctTableOf(k).find(k, seed)
	if !ok {
		return ebpf.ErrKeyNotExist
	}
	return fn(e, ref)
}

// deleteConntrack deletes the entry of one flow.
func (d *Datapath) deleteConntrack(k ConntrackKey) error {
	return d.findConntrack(k, func(_ ConntrackItem, ref ctRef) error {
		if !ref.remove() {
			return ebpf.ErrKeyNotExist
		}
		return nil
	})
}

var errClosed = errors.New("datapath closed")

// deleteConntrackWhere deletes every entry for which del returns true, and
// returns how many it deleted.
func (d *Datapath) deleteConntrackWhere(del func(ConntrackKey, ConntrackItem) bool) (int, error) {
	n := 0
	err := d.eachConntrack(func(k ConntrackKey, v ConntrackItem, r ctRef) {
		if del(k, v) && r.remove() {
			n++
		}
	})
	return n, err
}

// flushEndpointFlows deletes the conntrack entries of endpoint id, once
// its programs are detached (none can add more). Left in place, an
// established TCP entry lives for CTTimeoutTCP (6 h), far past the ID's
// retirement (the agent's --identity-grace, 15 min): a pod that got the ID
// and the address next would let the old peer's packets of that 5-tuple
// through without a policy lookup. It scans both tables: about 5.5 ms per
// call here, on a loaded 2-vCPU machine (2 x 65,536 slots, about 10 MB).
func (d *Datapath) flushEndpointFlows(id policy.EndpointID) error {
	_, err := d.deleteConntrackWhere(func(k ConntrackKey, _ ConntrackItem) bool { return k.EpId == uint32(id) })
	if err != nil {
		return fmt.Errorf("flush the endpoint's conntrack entries: %w", err)
	}
	return nil
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
	case v.State&ctDenied != 0:
		return d.cfg.CTTimeoutDenied
	case v.State&ctClosed != 0:
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
		ref ctRef
	}
	var expired []expiredEntry
	err = d.eachConntrack(func(k ConntrackKey, v ConntrackItem, r ctRef) {
		if now > v.LastSeen && time.Duration(now-v.LastSeen) > d.ctTimeout(&k, &v) {
			expired = append(expired, expiredEntry{ConntrackEntry{k, v}, r})
		}
	})
	if err != nil {
		return 0, nil, fmt.Errorf("scan conntrack: %w", err)
	}
	ids := map[policy.EndpointID]identity.NumericID{}
	d.mu.Lock()
	for ep, c := range d.gens[d.liveGen()].epConfigs {
		ids[ep] = identity.NumericID(c.Identity)
	}
	d.mu.Unlock()
	epIdentity := func(ep policy.EndpointID) identity.NumericID { return ids[ep] }
	for _, e := range expired {
		// A slot that changed since the scan (the flow was seen again,
		// or the slot holds another flow now) is left alone.
		if !e.ref.remove() {
			continue
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
