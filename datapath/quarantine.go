package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// Quarantine: an endpoint whose ep_quarantine slot holds a non-zero number
// has every packet in and out dropped (DropQuarantined, with that number as
// the event's rule), except DNS to the resolvers SetQuarantineDNS names,
// which policy then judges as usual. The check comes before conntrack, so
// established flows stop at once. The slot is outside the policy
// generations: one aligned 4-byte store sets or lifts it, and no Apply
// touches it. It lives in a pinned map, so it survives the agent.

// quarantineTable is the ep_quarantine array mapped into this process.
type quarantineTable struct {
	mem []byte
}

func init() {
	if unsafe.Sizeof(segmentQuarantine{}) != 4 {
		panic("datapath: struct quarantine must be 4 bytes")
	}
}

func mapQuarantine(m *ebpf.Map) (*quarantineTable, error) {
	if m.ValueSize() != 4 || m.MaxEntries() != maxEndpoints {
		return nil, fmt.Errorf("ep_quarantine: %d entries of %d bytes, want %d of 4 (pinned by another version?)",
			m.MaxEntries(), m.ValueSize(), maxEndpoints)
	}
	mem, err := mapArray(m, "ep_quarantine", maxEndpoints*quarantineStride)
	if err != nil {
		return nil, err
	}
	return &quarantineTable{mem: mem}, nil
}

func (t *quarantineTable) close() error {
	if t == nil {
		return nil
	}
	return unmapArray(&t.mem)
}

// quarantineStride is an element's size in the mapped array: the kernel
// rounds an array's values up to 8 bytes.
const quarantineStride = 8

func (t *quarantineTable) word(id policy.EndpointID) *uint32 {
	return (*uint32)(unsafe.Pointer(&t.mem[uintptr(id)*quarantineStride]))
}

// SetQuarantine quarantines endpoint id under number qid (non-zero; the
// caller's handle, reported as the rule of every DropQuarantined event), or
// lifts its quarantine when qid is 0. It takes effect at the endpoint's
// next packet.
func (d *Datapath) SetQuarantine(id policy.EndpointID, qid uint32) error {
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	if d.quarantine == nil {
		return errClosed
	}
	if id == 0 || uint32(id) >= maxEndpoints {
		return fmt.Errorf("quarantine: endpoint ID %d out of range: the datapath holds IDs 1 to %d", id, maxEndpoints-1)
	}
	atomic.StoreUint32(d.quarantine.word(id), qid)
	return nil
}

// Quarantined returns endpoint id's quarantine number (0: none).
func (d *Datapath) Quarantined(id policy.EndpointID) uint32 {
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	if d.quarantine == nil || id == 0 || uint32(id) >= maxEndpoints {
		return 0
	}
	return atomic.LoadUint32(d.quarantine.word(id))
}

// QuarantinedEndpoints returns every quarantined endpoint with its number.
func (d *Datapath) QuarantinedEndpoints() map[policy.EndpointID]uint32 {
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	out := map[policy.EndpointID]uint32{}
	if d.quarantine == nil {
		return out
	}
	for id := policy.EndpointID(1); id < maxEndpoints; id++ {
		if q := atomic.LoadUint32(d.quarantine.word(id)); q != 0 {
			out[id] = q
		}
	}
	return out
}

// clearQuarantine lifts endpoint id's quarantine when it leaves: its ID
// may be given to another pod.
func (d *Datapath) clearQuarantine(id policy.EndpointID) error {
	if id == 0 || uint32(id) >= maxEndpoints {
		return nil
	}
	return d.SetQuarantine(id, 0)
}

// maxQuarantineDNS is quarantine_dns's size.
const maxQuarantineDNS = 64

// SetQuarantineDNS replaces the resolvers that quarantined endpoints may
// still query on port 53. New entries are added before old ones go, so a
// resolver in both sets is never missing.
func (d *Datapath) SetQuarantineDNS(addrs []netip.Addr) error {
	want := map[QuarantineDNSKey]bool{}
	for _, a := range addrs {
		if !a.IsValid() {
			return errors.New("quarantine dns: invalid address")
		}
		want[QuarantineDNSKey{Addr: addrWords(a)}] = true
	}
	if len(want) > maxQuarantineDNS {
		return fmt.Errorf("quarantine dns: %d resolvers, at most %d", len(want), maxQuarantineDNS)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.objs.QuarantineDns
	if m == nil {
		return errClosed
	}
	for k := range want {
		if err := m.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("quarantine dns: add: %w", err)
		}
	}
	var k QuarantineDNSKey
	var v uint8
	var stale []QuarantineDNSKey
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("quarantine dns: read: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("quarantine dns: remove: %w", err)
		}
	}
	return nil
}

// QuarantineDNS returns the resolvers quarantined endpoints may query.
func (d *Datapath) QuarantineDNS() ([]netip.Addr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var k QuarantineDNSKey
	var v uint8
	var out []netip.Addr
	it := d.objs.QuarantineDns.Iterate()
	for it.Next(&k, &v) {
		out = append(out, addrOf(k.Addr))
	}
	return out, it.Err()
}
