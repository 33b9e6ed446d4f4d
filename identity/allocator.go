package identity

import (
	"errors"
	"fmt"
	"time"
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
//
// With Retain, a key whose last reference goes keeps its ID, retired, until
// Expire drops it: a label set that flaps back gets its old number, and a
// state saved with State and loaded with Restore gives a restarted agent the
// numbers the pinned maps already hold.
type Allocator struct {
	min, max NumericID
	next     NumericID
	byKey    map[string]*slot
	used     map[NumericID]string
	// now is set by Retain; nil means released IDs are freed at once.
	now func() time.Time
	// version counts changes of what State returns.
	version uint64
}

type slot struct {
	id   NumericID
	refs int
	// retired is when the last reference went (refs == 0).
	retired time.Time
}

// NewAllocator returns an allocator for IDs in [lo, hi].
func NewAllocator(lo, hi NumericID) *Allocator {
	return &Allocator{min: lo, max: hi, next: lo, byKey: map[string]*slot{}, used: map[NumericID]string{}}
}

// NewWorkloadAllocator allocates workload identities.
func NewWorkloadAllocator() *Allocator { return NewAllocator(MinWorkloadID, MaxWorkloadID) }

// NewCIDRAllocator allocates CIDR identities.
func NewCIDRAllocator() *Allocator { return NewAllocator(MinCIDRID, ^NumericID(0)) }

// Retain makes released keys keep their IDs until Expire; now stamps the
// release.
func (a *Allocator) Retain(now func() time.Time) { a.now = now }

// Empty returns an allocator with a's range and clock that has handed out
// nothing: a place to Restore into before committing to the result.
func (a *Allocator) Empty() *Allocator {
	e := NewAllocator(a.min, a.max)
	e.now = a.now
	return e
}

// Acquire returns the ID of key, allocating one on first use, and adds a
// reference.
func (a *Allocator) Acquire(key string) (NumericID, error) {
	if s, ok := a.byKey[key]; ok {
		if s.refs == 0 {
			s.retired = time.Time{}
			a.version++
		}
		s.refs++
		return s.id, nil
	}
	id, err := a.free()
	if err != nil {
		return 0, fmt.Errorf("allocate identity: %w", err)
	}
	a.byKey[key] = &slot{id: id, refs: 1}
	a.used[id] = key
	a.version++
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

// Release drops one reference to key; the ID is freed with the last one,
// or retired under Retain. Releasing an unknown key is a no-op.
func (a *Allocator) Release(key string) {
	s, ok := a.byKey[key]
	if !ok || s.refs == 0 {
		return
	}
	if s.refs--; s.refs > 0 {
		return
	}
	a.version++
	if a.now != nil {
		s.retired = a.now()
		return
	}
	delete(a.byKey, key)
	delete(a.used, s.id)
}

// ReleaseAll retires (or frees) every key, as if each reference were
// released: a full recompile re-acquires what it still needs and so keeps
// those keys' IDs.
func (a *Allocator) ReleaseAll() {
	for key, s := range a.byKey {
		if s.refs > 0 {
			s.refs = 1
			a.Release(key)
		}
	}
}

// Expire frees the IDs of keys retired before cutoff and returns how many.
// A freed ID is still not handed out again until the range wraps.
func (a *Allocator) Expire(cutoff time.Time) int {
	n := 0
	for key, s := range a.byKey {
		if s.refs == 0 && s.retired.Before(cutoff) {
			delete(a.byKey, key)
			delete(a.used, s.id)
			n++
		}
	}
	if n > 0 {
		a.version++
	}
	return n
}

// Lookup returns the ID of key without adding a reference. A retired key
// has no ID to look up.
func (a *Allocator) Lookup(key string) (NumericID, bool) {
	s, ok := a.byKey[key]
	if !ok || s.refs == 0 {
		return 0, false
	}
	return s.id, true
}

// Len is the number of IDs in use (retired ones not counted).
func (a *Allocator) Len() int {
	n := 0
	for _, s := range a.byKey {
		if s.refs > 0 {
			n++
		}
	}
	return n
}

// Version changes whenever State would return something else.
func (a *Allocator) Version() uint64 { return a.version }

// AllocatorState is what an Allocator needs to hand out the same IDs after
// a restart: every key's ID (retired keys with their retirement time) and
// where the search for a free ID goes on.
type AllocatorState struct {
	Next NumericID            `json:"next"`
	Keys map[string]KeyRecord `json:"keys"`
}

// KeyRecord is one key's ID in an AllocatorState.
type KeyRecord struct {
	ID NumericID `json:"id"`
	// Retired is set when nothing referred to the key when the state was
	// taken.
	Retired *time.Time `json:"retired,omitempty"`
}

// State returns the allocation. Keys in use are recorded as such; after
// Restore they count as retired until acquired again.
func (a *Allocator) State() AllocatorState {
	st := AllocatorState{Next: a.next, Keys: make(map[string]KeyRecord, len(a.byKey))}
	for key, s := range a.byKey {
		r := KeyRecord{ID: s.id}
		if s.refs == 0 {
			t := s.retired
			r.Retired = &t
		}
		st.Keys[key] = r
	}
	return st
}

// Restore loads a state taken by State into an allocator that has handed
// out nothing yet. Keys that were in use come back retired as of now, so
// they keep their IDs for a full grace period even if the restarted agent
// does not need them at once.
func (a *Allocator) Restore(st AllocatorState) error {
	if len(a.byKey) != 0 {
		return errors.New("restore allocation: allocator already in use")
	}
	if st.Next < a.min || st.Next > a.max {
		return fmt.Errorf("restore allocation: next ID %d outside [%d, %d]", st.Next, a.min, a.max)
	}
	now := time.Now()
	if a.now != nil {
		now = a.now()
	}
	byKey := make(map[string]*slot, len(st.Keys))
	used := make(map[NumericID]string, len(st.Keys))
	for key, r := range st.Keys {
		if r.ID < a.min || r.ID > a.max {
			return fmt.Errorf("restore allocation: key %q: ID %d outside [%d, %d]", key, r.ID, a.min, a.max)
		}
		if other, dup := used[r.ID]; dup {
			return fmt.Errorf("restore allocation: ID %d given to both %q and %q", r.ID, other, key)
		}
		s := &slot{id: r.ID, retired: now}
		if r.Retired != nil {
			s.retired = *r.Retired
		}
		byKey[key], used[r.ID] = s, key
	}
	a.byKey, a.used, a.next = byKey, used, st.Next
	a.version++
	return nil
}
