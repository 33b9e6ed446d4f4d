package datapath

import (
	"fmt"
	"slices"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// exactTable is ipcache_hosts or policy_exact mapped into this process: the
// full-length entries of an LPM trie again, in 4-way buckets that BPF
// searches without a call (see EXACT_WAYS in bpf/include/bulkhead.h). A
// slot is words: seq, the key, the value; a value of zeros is an empty
// slot. Go is the only writer and holds d.mu while it writes; a slot's seq
// is odd while it does. A key that finds no slot stays in the trie alone,
// which BPF consults on a miss, so a full bucket costs speed, never
// correctness.
type exactTable struct {
	name               string
	mem                []byte
	buckets            uint32
	keyWords, valWords int
}

const exactWays = 4

func mapExactTable(m *ebpf.Map, name string, keyWords, valWords int) (*exactTable, error) {
	t := &exactTable{name: name, buckets: m.MaxEntries(), keyWords: keyWords, valWords: valWords}
	if want := uint32(t.slotWords() * 4 * exactWays); m.ValueSize() != want {
		return nil, fmt.Errorf("%s: bucket of %d bytes, want %d (pinned by another version?)", name, m.ValueSize(), want)
	}
	var err error
	t.mem, err = mapArray(m, name, int(t.buckets)*exactWays*t.slotWords()*4)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func (t *exactTable) close() error {
	if t == nil {
		return nil
	}
	return unmapArray(&t.mem)
}

func (t *exactTable) slotWords() int { return 1 + t.keyWords + t.valWords }

// slot returns slot i's words: seq, key, value.
func (t *exactTable) slot(i int) []uint32 {
	n := t.slotWords()
	return unsafe.Slice((*uint32)(unsafe.Pointer(&t.mem[i*n*4])), n)
}

func (t *exactTable) parts(s []uint32) (seq *uint32, key, val []uint32) {
	return &s[0], s[1 : 1+t.keyWords], s[1+t.keyWords:]
}

func isZero(w []uint32) bool { return !slices.ContainsFunc(w, func(x uint32) bool { return x != 0 }) }

// write sets a slot's key and value between two seq bumps.
func (t *exactTable) write(s []uint32, key, val []uint32) {
	seq, k, v := t.parts(s)
	atomic.AddUint32(seq, 1)
	copy(k, key)
	for i := range v {
		atomic.StoreUint32(&v[i], val[i])
	}
	atomic.AddUint32(seq, 1)
}

func (t *exactTable) clear(s []uint32) {
	seq, k, v := t.parts(s)
	atomic.AddUint32(seq, 1)
	clear(v)
	clear(k)
	atomic.AddUint32(seq, 1)
}

func (t *exactTable) bucket(key []uint32, seed uint32) int {
	return int(ctHash(key, seed)&(t.buckets-1)) * exactWays
}

// put files key with val; it returns false when key's bucket is full.
func (t *exactTable) put(key, val []uint32, seed uint32) bool {
	base := t.bucket(key, seed)
	var free []uint32
	for w := range exactWays {
		s := t.slot(base + w)
		_, k, v := t.parts(s)
		switch {
		case !isZero(v) && slices.Equal(k, key):
			if !slices.Equal(v, val) {
				t.write(s, key, val)
			}
			return true
		case isZero(v) && free == nil:
			free = s
		}
	}
	if free == nil {
		return false
	}
	t.write(free, key, val)
	return true
}

// del removes key, if it is there.
func (t *exactTable) del(key []uint32, seed uint32) {
	base := t.bucket(key, seed)
	for w := range exactWays {
		s := t.slot(base + w)
		if _, k, v := t.parts(s); !isZero(v) && slices.Equal(k, key) {
			t.clear(s)
		}
	}
}

// sync makes the table hold exactly what want says, for the keys that fit:
// a process that died between writing a trie and its table may have left
// them apart. want returns a key's value, or false for a key the trie does
// not hold at full length; all lists every full-length entry.
func (t *exactTable) sync(seed uint32, want func(key []uint32) ([]uint32, bool), all func(put func(key, val []uint32))) {
	for i := range int(t.buckets) * exactWays {
		s := t.slot(i)
		_, k, v := t.parts(s)
		if isZero(v) {
			continue
		}
		val, ok := want(k)
		switch {
		case !ok || t.bucket(k, seed) != i/exactWays*exactWays:
			t.clear(s)
		case !slices.Equal(val, v):
			t.write(s, slices.Clone(k), val)
		}
	}
	all(func(key, val []uint32) { t.put(key, val, seed) })
}

// policyFullBits is POLICY_FULL_BITS: a key with one protocol and one port.
const policyFullBits = policyProtoBits + 16

func policyExactKey(k *PolicyKey) []uint32 {
	w := (*[unsafe.Sizeof(PolicyKey{}) / 4]uint32)(unsafe.Pointer(k))
	return slices.Clone(w[1:])
}

func policyExactValue(v PolicyValue) []uint32 {
	w := (*[unsafe.Sizeof(PolicyValue{}) / 4]uint32)(unsafe.Pointer(&v))
	return slices.Clone(w[:])
}

// putPolicy and delPolicy keep policy_exact in step with the trie; mk is
// the key as written to the trie (with its slot).
func (d *Datapath) putPolicy(mk PolicyKey, v PolicyValue) {
	if mk.Prefixlen == policyFullBits {
		d.policyExact.put(policyExactKey(&mk), policyExactValue(v), d.global.CtSeed)
	}
}

func (d *Datapath) delPolicy(mk PolicyKey) {
	if mk.Prefixlen == policyFullBits {
		d.policyExact.del(policyExactKey(&mk), d.global.CtSeed)
	}
}

// ipcacheFullBits is a host entry's prefix length: the generation and a
// whole IPv6 (or v4-mapped) address.
const ipcacheFullBits = ipcacheGenBits + 128

// hostKey is an ipcache_hosts key: the generation, then the address.
func hostKey(k IPCacheKey) []uint32 {
	return []uint32{k.Gen, k.Addr[0], k.Addr[1], k.Addr[2], k.Addr[3]}
}

// putHost and delHost keep ipcache_hosts in step with the trie; k is the
// key as written to the trie (with its generation).
func (d *Datapath) putHost(k IPCacheKey, v IPCacheValue) {
	if k.Prefixlen == ipcacheFullBits {
		d.hosts.put(hostKey(k), []uint32{v.Identity}, d.global.CtSeed)
	}
}

func (d *Datapath) delHost(k IPCacheKey) {
	if k.Prefixlen == ipcacheFullBits {
		d.hosts.del(hostKey(k), d.global.CtSeed)
	}
}

// syncExact makes both exact tables match the tries' mirrors.
func (d *Datapath) syncExact() {
	seed := d.global.CtSeed
	d.hosts.sync(seed, func(key []uint32) ([]uint32, bool) {
		if key[0] > 1 {
			return nil, false
		}
		v, ok := d.gens[key[0]].ipcache[IPCacheKey{Prefixlen: ipcacheFullBits, Addr: [4]uint32(key[1:])}]
		return []uint32{v.Identity}, ok
	}, func(put func(key, val []uint32)) {
		for g := range d.gens {
			for k, v := range d.gens[g].ipcache {
				if k.Prefixlen == ipcacheFullBits {
					k.Gen = uint32(g)
					put(hostKey(k), []uint32{v.Identity})
				}
			}
		}
	})
	d.policyExact.sync(seed, func(key []uint32) ([]uint32, bool) {
		var mk PolicyKey
		w := (*[unsafe.Sizeof(PolicyKey{}) / 4]uint32)(unsafe.Pointer(&mk))
		w[0] = policyFullBits
		copy(w[1:], key)
		slot := mk.Slot
		if slot > 1 {
			return nil, false
		}
		mk.Slot = 0
		v, ok := d.gens[slot].slots[policy.EndpointID(mk.EpId)][mk]
		return policyExactValue(v), ok
	}, func(put func(key, val []uint32)) {
		for g := range d.gens {
			for _, entries := range d.gens[g].slots {
				for k, v := range entries {
					if k.Prefixlen == policyFullBits {
						mk := k
						mk.Slot = uint8(g)
						put(policyExactKey(&mk), policyExactValue(v))
					}
				}
			}
		}
	})
}
