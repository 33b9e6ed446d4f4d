package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// ErrInvalidEntry is returned by Apply for an entry that breaks MapState's
// invariants (an empty port range, or a port range on protocol 0).
var ErrInvalidEntry = errors.New("invalid policy entry")

// ApplyStats tells what an Apply wrote into the generation it published.
type ApplyStats struct {
	PolicyWrites, PolicyDeletes   int
	IPCacheWrites, IPCacheDeletes int
	// Flipped counts the endpoints whose policy or configuration the new
	// generation changed, Removed those it no longer manages.
	Flipped, Removed int
	// Revision is the live revision after the Apply; Published tells
	// whether this Apply made a new one live.
	Revision  uint64
	Published bool
}

// Apply makes ms live in one step (see the package doc): it writes the
// whole of ms into the generation that is not live, diffing against what
// that generation holds (the state from two applies ago), and then
// publishes it with one atomic store of the revision. On error nothing was
// published and packets are judged by the old state exactly; the next
// Apply picks up from what was written. An Apply whose state is already
// live writes and publishes nothing.
func (d *Datapath) Apply(ms *policy.MapState) (ApplyStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var st ApplyStats
	if d.epcfg == nil {
		return st, errClosed
	}
	// Refuse what the maps cannot hold before writing anything.
	for id, p := range ms.Endpoints {
		if err := d.epcfg.check(id); err != nil {
			return st, err
		}
		if err := validEntries(p); err != nil {
			return st, fmt.Errorf("apply endpoint %d: %w", id, err)
		}
	}
	w := newGenWrite(ms)
	old := d.liveGen()
	st.Revision = d.global.Revision
	if d.holds(old, w) {
		// Publishing would only make conntrack re-judge every flow.
		return st, nil
	}
	target := 1 - old
	d.waitQuiesce()
	if err := d.writeGen(target, w, &st); err != nil {
		return st, err
	}
	if err := d.step("publish", func() error { return nil }); err != nil {
		return st, err
	}
	d.global.Revision++
	d.globals.publish(d.global.Revision)
	d.startQuiesce()
	st.Revision, st.Published = d.global.Revision, true
	d.log.Debug("policy applied", "revision", st.Revision, "mapstate_revision", ms.Revision,
		"policy_writes", st.PolicyWrites, "policy_deletes", st.PolicyDeletes,
		"ipcache_writes", st.IPCacheWrites, "ipcache_deletes", st.IPCacheDeletes,
		"flipped", st.Flipped, "removed", st.Removed)

	// Endpoints that are gone keep their entries in the old generation
	// until it is written next; clear them once no packet can still be
	// judged by it, so that a removed endpoint leaves nothing behind. A
	// failure here is only logged: the live state is ms, and the next
	// Apply writes whatever this left undone.
	var gone []policy.EndpointID
	for id := range d.gens[old].slots {
		if _, ok := ms.Endpoints[id]; !ok {
			gone = append(gone, id)
		}
	}
	for id := range d.gens[old].epConfigs {
		if _, ok := ms.Endpoints[id]; !ok {
			if _, listed := d.gens[old].slots[id]; !listed {
				gone = append(gone, id)
			}
		}
	}
	if len(gone) > 0 {
		d.waitQuiesce()
		var ignored ApplyStats
		for _, id := range gone {
			if err := d.writeEndpoint(old, id, nil, EPConfig{}, &ignored); err != nil {
				d.log.Warn("clear removed endpoint from the inactive policy generation", "endpoint", id, "error", err)
				break
			}
			delete(d.gens[old].slots, id)
			delete(d.gens[old].applied, id)
		}
	}
	return st, nil
}

// holds reports whether generation g holds w's state. Endpoints are
// compared by pointer first (the compiler hands unchanged ones over as the
// same *EndpointPolicy) and by content otherwise.
func (d *Datapath) holds(g uint8, w *genWrite) bool {
	gen := &d.gens[g]
	if gen.flags != w.flags || len(gen.ipcache) != len(w.ipcache) || !maps.Equal(gen.idFlags, w.idFlags) {
		return false
	}
	for id := range gen.epConfigs {
		if _, ok := w.ms.Endpoints[id]; !ok {
			return false
		}
	}
	for k, v := range w.ipcache {
		if cur, ok := gen.ipcache[k]; !ok || cur != v {
			return false
		}
	}
	for id, e := range gen.slots {
		if _, ok := w.ms.Endpoints[id]; !ok && len(e) > 0 {
			return false
		}
	}
	for id, p := range w.ms.Endpoints {
		if gen.applied[id] == p {
			continue
		}
		if gen.epConfigs[id] != epConfigOf(p) || !maps.Equal(gen.slots[id], w.endpoint(id)) {
			return false
		}
		gen.applied[id] = p
	}
	return true
}

func validEntries(p *policy.EndpointPolicy) error {
	// The encoding relies on these invariants (MapState's Entry doc).
	for _, e := range p.Entries {
		if e.PortLo > e.PortHi || (e.Proto == 0 && (e.PortLo != 0 || e.PortHi != 65535)) {
			return fmt.Errorf("%w: %+v", ErrInvalidEntry, e)
		}
	}
	return nil
}

// genWrite is what one Apply writes into a generation, computed once for
// both of the generations it writes.
type genWrite struct {
	ms      *policy.MapState
	ipcache map[IPCacheKey]IPCacheValue
	idFlags map[identity.NumericID]uint32
	flags   uint32
	encoded map[policy.EndpointID]map[PolicyKey]PolicyValue
}

func newGenWrite(ms *policy.MapState) *genWrite {
	w := &genWrite{ms: ms, ipcache: make(map[IPCacheKey]IPCacheValue, len(ms.IPCache)),
		encoded: map[policy.EndpointID]map[PolicyKey]PolicyValue{}}
	for p, id := range ms.IPCache {
		w.ipcache[ipcacheKeyOf(p)] = IPCacheValue{Identity: uint32(id)}
	}
	w.idFlags = make(map[identity.NumericID]uint32, len(ms.Enrolled))
	for id, on := range ms.Enrolled {
		if on {
			w.idFlags[id] = idEnrolled
		}
	}
	if ms.AllowHostIngress {
		w.flags |= globalAllowHostIngress
	}
	return w
}

func (w *genWrite) endpoint(id policy.EndpointID) map[PolicyKey]PolicyValue {
	e, ok := w.encoded[id]
	if !ok {
		e = encodeEndpoint(id, w.ms.Endpoints[id])
		w.encoded[id] = e
	}
	return e
}

const (
	globalAllowHostIngress = 1 // GLOBAL_ALLOW_HOST_INGRESS
	idEnrolled             = 1 // ID_ENROLLED
)

// writeGen makes generation g hold w's state, writing only what differs
// from what g holds. g must not be live.
func (d *Datapath) writeGen(g uint8, w *genWrite, st *ApplyStats) error {
	gen := &d.gens[g]
	// The target is not live, so the order of its writes is free: deletes
	// go first, so that it never holds the old and the new state at once,
	// which a nearly full trie could not take.
	for k := range gen.ipcache {
		if _, ok := w.ipcache[k]; ok {
			continue
		}
		mk := k
		mk.Gen = uint32(g)
		if err := d.step("host del", func() error { d.delHost(mk); return nil }); err != nil {
			return err
		}
		if err := d.step("ipcache delete", func() error { return d.objs.Ipcache.Delete(mk) }); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete ipcache: %w", err)
		}
		delete(gen.ipcache, k)
		st.IPCacheDeletes++
	}
	for k, v := range w.ipcache {
		if cur, ok := gen.ipcache[k]; ok && cur == v {
			continue
		}
		mk := k
		mk.Gen = uint32(g)
		// The host table loses the key before the trie changes and gets
		// it back after, so that whichever write fails, it never holds a
		// value the trie does not: a miss there is answered by the trie.
		if err := d.step("host del", func() error { d.delHost(mk); return nil }); err != nil {
			return err
		}
		if err := d.step("ipcache update", func() error { return d.objs.Ipcache.Update(mk, v, ebpf.UpdateAny) }); err != nil {
			return fmt.Errorf("write ipcache: %w", err)
		}
		gen.ipcache[k] = v
		if err := d.step("host put", func() error { d.putHost(mk, v); return nil }); err != nil {
			return err
		}
		st.IPCacheWrites++
	}

	for id := range gen.epConfigs {
		if _, ok := w.ms.Endpoints[id]; ok {
			continue
		}
		if err := d.step("ep config", func() error { return d.epcfg.store(g, id, EPConfig{}) }); err != nil {
			return fmt.Errorf("remove endpoint %d: %w", id, err)
		}
		delete(gen.epConfigs, id)
		st.Removed++
	}
	for id := range gen.slots {
		if _, ok := w.ms.Endpoints[id]; ok {
			continue
		}
		if err := d.writeEndpoint(g, id, nil, EPConfig{}, st); err != nil {
			return fmt.Errorf("remove endpoint %d: %w", id, err)
		}
		delete(gen.slots, id)
		delete(gen.applied, id)
	}

	for id, p := range w.ms.Endpoints {
		// The compiler hands unchanged endpoints over as the same
		// *EndpointPolicy; re-encoding them on every apply would make each
		// CNI ADD cost as much as the node's whole policy.
		if gen.applied[id] == p {
			continue
		}
		if err := d.writeEndpoint(g, id, w.endpoint(id), epConfigOf(p), st); err != nil {
			return fmt.Errorf("apply endpoint %d: %w", id, err)
		}
		gen.applied[id] = p
	}

	for id := range gen.idFlags {
		if _, ok := w.idFlags[id]; ok {
			continue
		}
		k := segmentIdFlagsKey{Gen: uint32(g), Identity: uint32(id)}
		if err := d.step("id flags delete", func() error { return d.objs.IdFlags.Delete(k) }); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete id flags: %w", err)
		}
		delete(gen.idFlags, id)
	}
	for id, f := range w.idFlags {
		if cur, ok := gen.idFlags[id]; ok && cur == f {
			continue
		}
		k := segmentIdFlagsKey{Gen: uint32(g), Identity: uint32(id)}
		if err := d.step("id flags update", func() error { return d.objs.IdFlags.Update(k, f, ebpf.UpdateAny) }); err != nil {
			return fmt.Errorf("write id flags: %w", err)
		}
		gen.idFlags[id] = f
	}

	if gen.flags != w.flags {
		if err := d.step("flags", func() error { d.globals.storeFlags(g, w.flags); return nil }); err != nil {
			return err
		}
		gen.flags = w.flags
	}
	return nil
}

// writeEndpoint makes endpoint id's entries and configuration in
// generation g equal desired and cfg.
func (d *Datapath) writeEndpoint(g uint8, id policy.EndpointID, desired map[PolicyKey]PolicyValue, cfg EPConfig, st *ApplyStats) error {
	gen := &d.gens[g]
	live := gen.slots[id]
	if live == nil {
		live = map[PolicyKey]PolicyValue{}
		gen.slots[id] = live
	}
	cur := gen.epConfigs[id]
	if cur == cfg && maps.Equal(live, desired) {
		return nil // unchanged
	}
	for k := range live {
		if _, ok := desired[k]; ok {
			continue
		}
		mk := k
		mk.Slot = g
		if err := d.step("exact del", func() error { d.delPolicy(mk); return nil }); err != nil {
			return err
		}
		if err := d.step("policy delete", func() error { return d.objs.Policy.Delete(mk) }); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete policy: %w", err)
		}
		delete(live, k)
		st.PolicyDeletes++
	}
	for _, k := range sortedKeys(desired) {
		v := desired[k]
		if cur, ok := live[k]; ok && cur == v {
			continue
		}
		mk := k
		mk.Slot = g
		// As for the ipcache: policy_exact never holds a value the trie
		// does not, whichever write fails.
		if err := d.step("exact del", func() error { d.delPolicy(mk); return nil }); err != nil {
			return err
		}
		if err := d.step("policy update", func() error { return d.objs.Policy.Update(mk, v, ebpf.UpdateAny) }); err != nil {
			return fmt.Errorf("write policy: %w", err)
		}
		live[k] = v
		if err := d.step("exact put", func() error { d.putPolicy(mk, v); return nil }); err != nil {
			return err
		}
		st.PolicyWrites++
	}
	if cur != cfg {
		if err := d.step("ep config", func() error { return d.epcfg.store(g, id, cfg) }); err != nil {
			return fmt.Errorf("write ep config: %w", err)
		}
		if cfg.Identity == 0 {
			delete(gen.epConfigs, id)
		} else {
			gen.epConfigs[id] = cfg
		}
	}
	if cfg.Identity != 0 {
		st.Flipped++
	}
	return nil
}

// step makes one write to a map BPF reads, after beforeWrite (tests) had
// its say.
func (d *Datapath) step(op string, write func() error) error {
	if d.beforeWrite != nil {
		if err := d.beforeWrite(op); err != nil {
			return err
		}
	}
	return write()
}

// IPCacheLookup returns the identity the live generation of the ipcache
// gives addr (an exact entry only).
func (d *Datapath) IPCacheLookup(addr netip.Addr) (uint32, bool, error) {
	d.unmapMu.RLock()
	if d.globals == nil {
		d.unmapMu.RUnlock()
		return 0, false, errClosed
	}
	k := ipcacheKeyOf(netip.PrefixFrom(addr, addr.BitLen()))
	k.Gen = uint32(d.liveGenUnlocked())
	d.unmapMu.RUnlock()
	var v IPCacheValue
	err := d.objs.Ipcache.Lookup(k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("lookup ipcache: %w", err)
	}
	return v.Identity, true, nil
}
