package datapath

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// generation mirrors one of the two generations of the policy state, as
// the maps hold it (see the package doc, "One switch for a policy change").
// Policy keys have Slot zero and ipcache keys Gen zero: the generation is
// the index in Datapath.gens.
type generation struct {
	epConfigs map[policy.EndpointID]EPConfig
	slots     map[policy.EndpointID]map[PolicyKey]PolicyValue
	ipcache   map[IPCacheKey]IPCacheValue
	// idFlags mirrors id_flags: ID_* flags per identity (enrollment).
	idFlags map[identity.NumericID]uint32
	flags   uint32
	// applied is the policy each endpoint last got in this generation. A
	// policy in a MapState is never modified, so the same pointer means
	// no change.
	applied map[policy.EndpointID]*policy.EndpointPolicy
}

func newGeneration() generation {
	return generation{
		epConfigs: map[policy.EndpointID]EPConfig{},
		slots:     map[policy.EndpointID]map[PolicyKey]PolicyValue{},
		ipcache:   map[IPCacheKey]IPCacheValue{},
		idFlags:   map[identity.NumericID]uint32{},
		applied:   map[policy.EndpointID]*policy.EndpointPolicy{},
	}
}

// globalsTable is the globals map mapped into this process. revision is
// the live word: BPF reads it once per packet, and its low bit selects the
// generation of everything the packet is judged by, so one 8-byte store
// publishes a whole new policy state.
type globalsTable struct {
	mem []byte
}

func mapGlobals(m *ebpf.Map) (*globalsTable, error) {
	size := int(unsafe.Sizeof(GlobalConfig{}))
	if int(m.ValueSize()) != size || m.Flags()&flagMmapable == 0 {
		return nil, fmt.Errorf("globals: value of %d bytes (flags %#x), want %d, mmapable (pinned by another version?)",
			m.ValueSize(), m.Flags(), size)
	}
	mem, err := mapArray(m, "globals", size)
	if err != nil {
		return nil, err
	}
	return &globalsTable{mem: mem}, nil
}

// flagMmapable is BPF_F_MMAPABLE.
const flagMmapable = 1 << 10

func (t *globalsTable) close() error {
	if t == nil {
		return nil
	}
	return unmapArray(&t.mem)
}

func (t *globalsTable) cfg() *GlobalConfig { return (*GlobalConfig)(unsafe.Pointer(&t.mem[0])) }

func (t *globalsTable) load() GlobalConfig {
	g := t.cfg()
	return GlobalConfig{
		Revision: atomic.LoadUint64(&g.Revision),
		Flags:    [2]uint32{atomic.LoadUint32(&g.Flags[0]), atomic.LoadUint32(&g.Flags[1])},
		CtSeed:   atomic.LoadUint32(&g.CtSeed),
	}
}

func (t *globalsTable) revision() uint64 { return atomic.LoadUint64(&t.cfg().Revision) }

// publish makes revision (and so its generation) live.
func (t *globalsTable) publish(revision uint64) { atomic.StoreUint64(&t.cfg().Revision, revision) }

func (t *globalsTable) storeFlags(gen uint8, flags uint32) {
	atomic.StoreUint32(&t.cfg().Flags[gen&1], flags)
}

// liveGen is the generation packets are judged by now; callers hold d.mu.
func (d *Datapath) liveGen() uint8 { return uint8(d.global.Revision & 1) }

// liveGenUnlocked reads the live generation from the map, for readers that
// do not hold d.mu; they hold d.unmapMu for reading.
func (d *Datapath) liveGenUnlocked() uint8 { return uint8(d.globals.revision() & 1) }
