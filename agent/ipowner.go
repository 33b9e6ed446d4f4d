package agent

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"
)

// ipOwners decides which pod owns each address when several claim it: a
// reused IP whose old pod the store (or a missed DEL) still lists, or two
// store pods with one status.podIPs entry. Only the owner's identity goes
// into the ipcache for the address, and only the owner's removal takes it
// out: the last writer no longer wins, and deleting a stale pod no longer
// removes the live pod's entry.
//
// A local endpoint outranks a store pod (CNI's result comes from this
// node's IPAM; a store's status may be stale); among local endpoints the
// newest ADD wins (an IPAM reuse after a missed DEL); among store pods the
// one that owned the address first keeps it. Every conflict is reported.
//
// It is used by the batch goroutine only.
type ipOwners struct {
	claims map[netip.Addr]map[podRef]ipClaim
	owner  map[netip.Addr]podRef
	byRef  map[podRef][]netip.Addr
	// dirty are pods whose owned addresses changed because of another
	// pod's claim; they are recompiled after the change at hand.
	dirty map[podRef]bool
	// onConflict reports a contested address (logging and status).
	onConflict func(addr netip.Addr, owner podRef, others []podRef)
}

type ipClaim struct {
	local   bool
	created time.Time
}

func newIPOwners(onConflict func(netip.Addr, podRef, []podRef)) *ipOwners {
	return &ipOwners{claims: map[netip.Addr]map[podRef]ipClaim{}, owner: map[netip.Addr]podRef{},
		byRef: map[podRef][]netip.Addr{}, dirty: map[podRef]bool{}, onConflict: onConflict}
}

// claim replaces ref's claims with addrs and returns the addresses ref
// owns. Pods that gain or lose an address by it are marked dirty.
func (o *ipOwners) claim(ref podRef, addrs []netip.Addr, local bool, created time.Time) []netip.Addr {
	touched := map[netip.Addr]bool{}
	for _, a := range o.byRef[ref] {
		delete(o.claims[a], ref)
		touched[a] = true
	}
	var norm []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		if o.claims[a] == nil {
			o.claims[a] = map[podRef]ipClaim{}
		}
		o.claims[a][ref] = ipClaim{local: local, created: created}
		touched[a] = true
		norm = append(norm, a)
	}
	if len(norm) == 0 {
		delete(o.byRef, ref)
	} else {
		o.byRef[ref] = norm
	}
	for a := range touched {
		o.decide(a, ref)
	}
	return o.owned(ref, norm)
}

// owned filters addrs to those ref owns.
func (o *ipOwners) owned(ref podRef, addrs []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if o.owner[a.Unmap()] == ref {
			out = append(out, a)
		}
	}
	return out
}

// decide picks the owner of a after a claim of by changed.
func (o *ipOwners) decide(a netip.Addr, by podRef) {
	cs := o.claims[a]
	prev, had := o.owner[a]
	if len(cs) == 0 {
		delete(o.claims, a)
		delete(o.owner, a)
		if had && prev != by {
			o.dirty[prev] = true
		}
		return
	}
	best, bestOK := podRef{}, false
	better := func(r podRef, c ipClaim) bool {
		if !bestOK {
			return true
		}
		b := cs[best]
		switch {
		case c.local != b.local:
			return c.local
		case c.local && !c.created.Equal(b.created):
			return c.created.After(b.created)
		case !c.local && had && (r == prev) != (best == prev):
			return r == prev // a store pod keeps what it owns
		}
		return cmpRef(r, best) < 0
	}
	for _, r := range slices.SortedFunc(maps.Keys(cs), cmpRef) {
		if better(r, cs[r]) {
			best, bestOK = r, true
		}
	}
	o.owner[a] = best
	if had && prev != best && prev != by {
		o.dirty[prev] = true
	}
	if (!had || prev != best) && best != by {
		o.dirty[best] = true
	}
	if _, claimed := cs[by]; claimed && len(cs) > 1 && o.onConflict != nil {
		var others []podRef
		for r := range cs {
			if r != best {
				others = append(others, r)
			}
		}
		slices.SortFunc(others, cmpRef)
		o.onConflict(a, best, others)
	}
}

// takeDirty returns and clears the pods to recompile.
func (o *ipOwners) takeDirty() []podRef {
	out := slices.SortedFunc(maps.Keys(o.dirty), cmpRef)
	clear(o.dirty)
	return out
}

// conflicts describes every contested address, for status.
func (o *ipOwners) conflicts() []string {
	var out []string
	for a, cs := range o.claims {
		if len(cs) < 2 {
			continue
		}
		others := ""
		for _, r := range slices.SortedFunc(maps.Keys(cs), cmpRef) {
			if r != o.owner[a] {
				others += " " + r.String()
			}
		}
		out = append(out, fmt.Sprintf("address %s is claimed by %s (owner) and%s", a, o.owner[a], others))
	}
	slices.Sort(out)
	return out
}

// reportIPConflict logs a contested address; status lists the current
// conflicts (refreshed after every batch by publishConflicts).
func (a *Agent) reportIPConflict(addr netip.Addr, owner podRef, others []podRef) {
	names := make([]string, len(others))
	for i, r := range others {
		names[i] = r.String()
	}
	a.log.Warn("address claimed by more than one pod; only its owner's identity is enforced for it",
		"address", addr, "owner", owner.String(), "others", names)
}

// publishConflicts copies the contested addresses for status. Called on
// the batch goroutine.
func (a *Agent) publishConflicts() {
	c := a.ipOwners.conflicts()
	a.mu.Lock()
	a.fc.conflicts = c
	a.mu.Unlock()
}
