package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// ErrInvalidEntry is returned by Apply for an entry that breaks MapState's
// invariants (an empty port range, or a port range on protocol 0).
var ErrInvalidEntry = errors.New("invalid policy entry")

// ApplyStats tells what an Apply wrote.
type ApplyStats struct {
	PolicyWrites, PolicyDeletes   int
	IPCacheWrites, IPCacheDeletes int
	Flipped, Removed              int
	Revision                      uint64
}

// Apply makes ms live, writing only what differs from the live maps, with
// make-before-break per endpoint (see the package doc). On error the live
// state is still consistent per endpoint: every flip happens after its slot
// is complete, and the revision is bumped only when Apply finishes.
func (d *Datapath) Apply(ms *policy.MapState) (ApplyStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var st ApplyStats
	if d.epcfg == nil {
		return st, errClosed
	}
	// Refuse an endpoint the maps cannot hold before writing anything.
	for id := range ms.Endpoints {
		if err := d.epcfg.check(id); err != nil {
			return st, err
		}
	}

	desiredIP := make(map[IPCacheKey]IPCacheValue, len(ms.IPCache))
	for p, id := range ms.IPCache {
		desiredIP[ipcacheKeyOf(p)] = IPCacheValue{Identity: uint32(id)}
	}
	for k, v := range desiredIP {
		if cur, ok := d.ipcache[k]; ok && cur == v {
			continue
		}
		if err := d.objs.Ipcache.Update(k, v, ebpf.UpdateAny); err != nil {
			return st, fmt.Errorf("write ipcache: %w", err)
		}
		d.putHost(k, v)
		d.ipcache[k] = v
		st.IPCacheWrites++
	}

	for id, p := range ms.Endpoints {
		// The compiler hands unchanged endpoints over as the same
		// *EndpointPolicy; re-encoding them on every apply would make each
		// CNI ADD cost as much as the node's whole policy.
		if d.applied[id] == p {
			continue
		}
		if err := d.applyEndpoint(id, p, &st); err != nil {
			return st, fmt.Errorf("apply endpoint %d: %w", id, err)
		}
		d.applied[id] = p
	}
	for id := range d.epConfigs {
		if _, ok := ms.Endpoints[id]; ok {
			continue
		}
		if err := d.removeEndpoint(id, &st); err != nil {
			return st, fmt.Errorf("remove endpoint %d: %w", id, err)
		}
	}

	for k := range d.ipcache {
		if _, ok := desiredIP[k]; ok {
			continue
		}
		d.delHost(k)
		if err := d.objs.Ipcache.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return st, fmt.Errorf("delete ipcache: %w", err)
		}
		delete(d.ipcache, k)
		st.IPCacheDeletes++
	}

	g := d.global
	g.Flags = 0
	if ms.AllowHostIngress {
		g.Flags |= globalAllowHostIngress
	}
	changed := st.PolicyWrites+st.PolicyDeletes+st.IPCacheWrites+st.IPCacheDeletes+st.Flipped+st.Removed > 0
	if changed || g.Flags != d.global.Flags {
		g.Revision++
		if err := d.objs.Globals.Update(uint32(0), g, ebpf.UpdateAny); err != nil {
			return st, fmt.Errorf("write globals: %w", err)
		}
		d.global = g
	}
	st.Revision = d.global.Revision
	d.log.Debug("policy applied", "revision", st.Revision, "mapstate_revision", ms.Revision,
		"policy_writes", st.PolicyWrites, "policy_deletes", st.PolicyDeletes,
		"ipcache_writes", st.IPCacheWrites, "ipcache_deletes", st.IPCacheDeletes,
		"flipped", st.Flipped, "removed", st.Removed)
	return st, nil
}

const globalAllowHostIngress = 1 // GLOBAL_ALLOW_HOST_INGRESS

// slotQuiesce is how long a slot that just went inactive is left alone.
const slotQuiesce = 2 * time.Millisecond

func (d *Datapath) applyEndpoint(id policy.EndpointID, p *policy.EndpointPolicy, st *ApplyStats) error {
	// The encoding relies on these invariants (MapState's Entry doc).
	for _, e := range p.Entries {
		if e.PortLo > e.PortHi || (e.Proto == 0 && (e.PortLo != 0 || e.PortHi != 65535)) {
			return fmt.Errorf("%w: %+v", ErrInvalidEntry, e)
		}
	}
	desired := encodeEndpoint(id, p)
	cfg := epConfigOf(p)
	cur, managed := d.epConfigs[id]
	target := uint8(0)
	if managed {
		cfg.Slot = cur.Slot
		if cur == cfg && maps.Equal(d.slots[slotRef{id, cur.Slot}], desired) {
			return nil // unchanged
		}
		target = 1 - cur.Slot
	}
	// A packet that read the slot number just before the last flip may
	// still be inside its lookups in the slot we are about to rewrite. A
	// program run takes microseconds; waiting out slotQuiesce since that
	// flip closes the window for any sane run time.
	if wait := slotQuiesce - time.Since(d.lastFlip[id]); wait > 0 {
		time.Sleep(wait)
	}
	// The target slot holds the policy from two applies ago (or nothing):
	// bring it to the desired state while packets use the other slot.
	ref := slotRef{id, target}
	live := d.slots[ref]
	if live == nil {
		live = map[PolicyKey]PolicyValue{}
		d.slots[ref] = live
	}
	for _, k := range sortedKeys(desired) {
		v := desired[k]
		if cur, ok := live[k]; ok && cur == v {
			continue
		}
		mk := k
		mk.Slot = target
		if err := d.objs.Policy.Update(mk, v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write policy: %w", err)
		}
		d.putPolicy(mk, v)
		live[k] = v
		st.PolicyWrites++
	}
	for k := range live {
		if _, ok := desired[k]; ok {
			continue
		}
		mk := k
		mk.Slot = target
		d.delPolicy(mk)
		if err := d.objs.Policy.Delete(mk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete policy: %w", err)
		}
		delete(live, k)
		st.PolicyDeletes++
	}
	// The flip: one update makes the whole new policy live.
	cfg.Slot = target
	if err := d.epcfg.store(id, cfg); err != nil {
		return fmt.Errorf("flip slot: %w", err)
	}
	d.epConfigs[id] = cfg
	d.lastFlip[id] = time.Now()
	st.Flipped++
	return nil
}

// removeEndpoint makes the endpoint unmanaged first (everything passes, as
// for an endpoint no MapState knows) and then deletes its entries.
func (d *Datapath) removeEndpoint(id policy.EndpointID, st *ApplyStats) error {
	if err := d.epcfg.store(id, EPConfig{}); err != nil {
		return fmt.Errorf("delete ep config: %w", err)
	}
	delete(d.epConfigs, id)
	delete(d.lastFlip, id)
	delete(d.applied, id)
	for slot := range uint8(2) {
		ref := slotRef{id, slot}
		for k := range d.slots[ref] {
			mk := k
			mk.Slot = slot
			d.delPolicy(mk)
			if err := d.objs.Policy.Delete(mk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete policy: %w", err)
			}
			st.PolicyDeletes++
		}
		delete(d.slots, ref)
	}
	st.Removed++
	return nil
}

// IPCacheLookup returns the identity the datapath resolves addr to.
func (d *Datapath) IPCacheLookup(addr netip.Addr) (uint32, bool, error) {
	var v IPCacheValue
	err := d.objs.Ipcache.Lookup(ipcacheKeyOf(netip.PrefixFrom(addr, addr.BitLen())), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("lookup ipcache: %w", err)
	}
	return v.Identity, true, nil
}
