package datapath

import (
	"errors"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// Feature is one probed kernel capability.
type Feature struct {
	Name string
	// Err is nil when the kernel has it; it wraps ErrNotSupported when the
	// kernel lacks it.
	Err error
}

// Features probes what the datapath uses. Nothing is attached anywhere:
// TCX is probed by a link create on an interface index that cannot exist,
// which a kernel with TCX rejects with ENODEV and one without rejects as an
// unknown attach type.
func Features() []Feature {
	out := []Feature{{Name: "tcx", Err: probeTCX()}}
	for _, m := range []struct {
		name string
		t    ebpf.MapType
	}{{"ringbuf", ebpf.RingBuf}, {"lpm-trie", ebpf.LPMTrie}, {"lru-hash", ebpf.LRUHash}, {"percpu-array", ebpf.PerCPUArray}} {
		err := features.HaveMapType(m.t)
		if errors.Is(err, ebpf.ErrNotSupported) {
			err = errors.Join(ErrNotSupported, err)
		}
		out = append(out, Feature{Name: m.name, Err: err})
	}
	return out
}

func probeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		return err
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: 0x7fffffff, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return errors.Join(ErrNotSupported, err)
	}
	return nil // ENODEV: the kernel knows TCX
}

// MapStat is how full one map is.
type MapStat struct {
	Name       string
	Entries    int
	MaxEntries int
}

// MapStats reports the fill of the maps that can run full. Policy, ipcache
// and endpoint configs are counted from the mirrors Apply keeps; conntrack
// is counted by iterating it, so call this at scrape intervals, not per
// packet.
func (d *Datapath) MapStats() []MapStat {
	d.mu.Lock()
	// Both generations count: they share the maps.
	policyEntries, ipcacheEntries, epConfigs := 0, 0, 0
	for g := range d.gens {
		for _, s := range d.gens[g].slots {
			policyEntries += len(s)
		}
		ipcacheEntries += len(d.gens[g].ipcache)
		epConfigs += len(d.gens[g].epConfigs)
	}
	out := []MapStat{
		{Name: "policy", Entries: policyEntries, MaxEntries: int(d.objs.Policy.MaxEntries())},
		{Name: "ipcache", Entries: ipcacheEntries, MaxEntries: int(d.objs.Ipcache.MaxEntries())},
		{Name: "ep_configs", Entries: epConfigs, MaxEntries: int(d.objs.EpConfigs.MaxEntries())},
	}
	d.mu.Unlock()
	// Both families' maps count as one "conntrack", as users know it.
	ct := 0
	if d.eachConntrack(func(ConntrackKey, ConntrackItem, ctRef) { ct++ }) == nil {
		out = append(out, MapStat{Name: "conntrack", Entries: ct,
			MaxEntries: int(d.objs.Conntrack4.MaxEntries()+d.objs.Conntrack6.MaxEntries()) * ctWays})
	}
	return out
}
