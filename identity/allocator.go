package identity

import (
	"errors"
	"fmt"
)

// ErrExhausted is returned when an allocator has no free ID left.
var ErrExhausted = errors.New("identity space exhausted")

// Allocator hands out numeric IDs for keys from a fixed range, with reference
// counts: the ID of a key stays the same while anything refers to it, and is
// released when the last reference goes.
//
// IDs are handed out in increasing order and a released ID is not reused
// until the range wraps: a flow record or a conntrack entry that still
// carries an old ID then never names a different workload. Acquiring keys in
// a fixed order from a new Allocator gives the same IDs every time, which is
// what makes a full compile deterministic.
type Allocator struct {
	min, max NumericID
	next     NumericID
	byKey    map[string]*slot
	used     map[NumericID]string
}

type slot struct {
	id   NumericID
	refs int
}

// NewAllocator returns an allocator for IDs in [lo, hi].
func NewAllocator(lo, hi NumericID) *Allocator {
	return &Allocator{min: lo, max: hi, next: lo, byKey: map[string]*slot{}, used: map[NumericID]string{}}
}

// NewWorkloadAllocator allocates workload identities.
func NewWorkloadAllocator() *Allocator { return NewAllocator(MinWorkloadID, MaxWorkloadID) }

// NewCIDRAllocator allocates CIDR identities.
func NewCIDRAllocator() *Allocator { return NewAllocator(MinCIDRID, ^NumericID(0)) }

// Acquire returns the ID of key, allocating one on first use, and adds a
// reference.
func (a *Allocator) Acquire(key string) (NumericID, error) {
	if s, ok := a.byKey[key]; ok {
		s.refs++
		return s.id, nil
	}
	id, err := a.free()
	if err != nil {
		return 0, fmt.Errorf("allocate identity: %w", err)
	}
	a.byKey[key] = &slot{id: id, refs: 1}
	a.used[id] = key
	return id, nil
}

func (a *Allocator) free() (NumericID, error) {
	span := uint64(a.max-a.min) + 1
	for range span {
		id := a.next
		if a.next == a.max {
			a.next = a.min
		} else {
			a.next++
		}
		if _, taken := a.used[id]; !taken {
			return id, nil
		}
	}
	return 0, ErrExhausted
}

// Release drops one reference to key; the ID is freed with the last one.
// Releasing an unknown key is a no-op.
func (a *Allocator) Release(key string) {
	s, ok := a.byKey[key]
	if !ok {
		return
	}
	if s.refs--; s.refs <= 0 {
		delete(a.byKey, key)
		delete(a.used, s.id)
	}
}

// Lookup returns the ID of key without adding a reference.
func (a *Allocator) Lookup(key string) (NumericID, bool) {
	s, ok := a.byKey[key]
	if !ok {
		return 0, false
	}
	return s.id, true
}

// Len is the number of IDs in use.
func (a *Allocator) Len() int { return len(a.byKey) }
