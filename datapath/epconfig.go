package datapath

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// epConfigTable is the ep_configs array mapped into this process: one
// configuration per generation and endpoint, at gen*n + endpoint ID. BPF
// reads an endpoint's configuration with one 8-byte load, so it is written
// with one 8-byte store (a map update is a memcpy, which promises neither
// a whole old nor a whole new value).
type epConfigTable struct {
	mem []byte
	n   uint32 // endpoints per generation: MAX_ENDPOINTS
}

func init() {
	if unsafe.Sizeof(EPConfig{}) != 8 {
		panic("datapath: ep_config must be 8 bytes")
	}
}

func mapEPConfigs(m *ebpf.Map) (*epConfigTable, error) {
	if m.ValueSize() != 8 {
		return nil, fmt.Errorf("ep_configs: value of %d bytes, want 8 (pinned by another version?)", m.ValueSize())
	}
	mem, err := mapArray(m, "ep_configs", int(m.MaxEntries())*8)
	if err != nil {
		return nil, err
	}
	if m.MaxEntries() != 2*maxEndpoints {
		return nil, fmt.Errorf("ep_configs: %d entries, want %d (pinned by another version?)", m.MaxEntries(), 2*maxEndpoints)
	}
	return &epConfigTable{mem: mem, n: maxEndpoints}, nil
}

func (t *epConfigTable) close() error {
	if t == nil {
		return nil
	}
	return unmapArray(&t.mem)
}

// maxEndpoints is MAX_ENDPOINTS.
const maxEndpoints = 4096

// MaxEndpointID is the highest endpoint ID the datapath holds.
const MaxEndpointID policy.EndpointID = maxEndpoints - 1

func (t *epConfigTable) word(gen uint8, id policy.EndpointID) *uint64 {
	return (*uint64)(unsafe.Pointer(&t.mem[(uintptr(gen&1)*uintptr(t.n)+uintptr(id))*8]))
}

// check reports an endpoint ID the table has no room for.
func (t *epConfigTable) check(id policy.EndpointID) error {
	if t == nil {
		return errClosed
	}
	if id == 0 || uint32(id) >= t.n {
		return fmt.Errorf("endpoint ID %d out of range: the datapath holds IDs 1 to %d", id, t.n-1)
	}
	return nil
}

func (t *epConfigTable) store(gen uint8, id policy.EndpointID, cfg EPConfig) error {
	if err := t.check(id); err != nil {
		return err
	}
	atomic.StoreUint64(t.word(gen, id), *(*uint64)(unsafe.Pointer(&cfg)))
	return nil
}

// load returns endpoint id's configuration in generation gen; ok is false
// when it is unmanaged there.
func (t *epConfigTable) load(gen uint8, id policy.EndpointID) (cfg EPConfig, ok bool) {
	if t.check(id) != nil {
		return cfg, false
	}
	*(*uint64)(unsafe.Pointer(&cfg)) = atomic.LoadUint64(t.word(gen, id))
	return cfg, cfg.Identity != 0
}
