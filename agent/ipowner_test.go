package agent

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

func TestIPOwners(t *testing.T) {
	var conflicts []string
	o := newIPOwners(func(a netip.Addr, owner podRef, others []podRef) {
		conflicts = append(conflicts, a.String()+" "+owner.String())
	})
	x := netip.MustParseAddr("10.0.0.5")
	ips := []netip.Addr{x}
	stale, live, local, newer := podRef{"shop", "stale"}, podRef{"shop", "live"}, podRef{"shop", "local"}, podRef{"shop", "newer"}
	t0 := time.Unix(100, 0)

	if got := o.claim(stale, ips, false, time.Time{}); !slices.Equal(got, ips) {
		t.Fatalf("first claimant owns %v", got)
	}
	// A second store pod does not take the address over.
	if got := o.claim(live, ips, false, time.Time{}); len(got) != 0 {
		t.Fatalf("second store claimant got %v", got)
	}
	if len(conflicts) != 1 || len(o.conflicts()) != 1 {
		t.Fatalf("conflict not reported: %v %v", conflicts, o.conflicts())
	}
	o.takeDirty()
	// The stale pod goes: the address passes to the other claimant, which
	// is marked for recompiling, rather than vanishing.
	o.claim(stale, nil, false, time.Time{})
	if d := o.takeDirty(); !slices.Equal(d, []podRef{live}) {
		t.Fatalf("dirty after the owner left: %v", d)
	}
	if got := o.owned(live, ips); !slices.Equal(got, ips) {
		t.Fatalf("remaining claimant owns %v", got)
	}
	// A local endpoint outranks a store pod, and the newest local ADD
	// outranks an older one.
	if got := o.claim(local, ips, true, t0); !slices.Equal(got, ips) {
		t.Fatalf("local endpoint got %v", got)
	}
	if d := o.takeDirty(); !slices.Equal(d, []podRef{live}) {
		t.Fatalf("dirty after a local claim: %v", d)
	}
	if got := o.claim(newer, ips, true, t0.Add(time.Second)); !slices.Equal(got, ips) {
		t.Fatalf("newer local endpoint got %v", got)
	}
	if got := o.owned(local, ips); len(got) != 0 {
		t.Fatalf("older local endpoint still owns %v", got)
	}
	// Re-claiming the same thing changes nothing and marks nobody.
	o.takeDirty()
	o.claim(newer, ips, true, t0.Add(time.Second))
	if d := o.takeDirty(); len(d) != 0 {
		t.Fatalf("an unchanged claim marked %v", d)
	}
	for _, r := range []podRef{newer, local, live} {
		o.claim(r, nil, false, time.Time{})
	}
	if len(o.conflicts()) != 0 || len(o.owner) != 0 || len(o.claims) != 0 {
		t.Fatalf("state left after every claim went: %v %v", o.owner, o.claims)
	}
}
