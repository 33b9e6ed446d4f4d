package identity

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

func TestLabelsKey(t *testing.T) {
	// Keys of label sets without an issued ID are what persisted
	// numberings hold: they must not change.
	if got, want := (Labels{Namespace: "a"}).Key(), "1:a7:default0{}0{}"; got != want {
		t.Errorf("key %q, want %q", got, want)
	}
	a := Labels{Namespace: "shop", PodLabels: map[string]string{"app": "api", "tier": "1"}}
	b := Labels{Namespace: "shop", PodLabels: map[string]string{"tier": "1", "app": "api"}, ServiceAccount: "default"}
	if a.Key() != b.Key() {
		t.Fatal("equal label sets (and the defaulted service account) must share a key")
	}
	for _, c := range []Labels{
		{Namespace: "shop", PodLabels: map[string]string{"app": "api"}},
		{Namespace: "shop", PodLabels: map[string]string{"app": "api", "tier": "1"}, ServiceAccount: "api"},
		{Namespace: "shop", PodLabels: map[string]string{"app": "api", "tier": "1"}, NamespaceLabels: map[string]string{"x": "y"}},
		{Namespace: "shop", PodLabels: map[string]string{"app": "api", "tier": "1"}, Issued: "spiffe://cluster.local/workload/api"},
		// A value that looks like an encoded second label must not collide.
		{Namespace: "shop", PodLabels: map[string]string{"app": "api4:tier1:1"}},
	} {
		if c.Key() == a.Key() {
			t.Errorf("%+v collides with %+v", c, a)
		}
	}
}

func TestAllocator(t *testing.T) {
	a := NewAllocator(256, 258)
	x, _ := a.Acquire("x")
	y, _ := a.Acquire("y")
	if x != 256 || y != 257 {
		t.Fatalf("got %d %d, want 256 257", x, y)
	}
	if again, _ := a.Acquire("x"); again != x {
		t.Fatal("an ID must be stable while in use")
	}
	a.Release("x")
	if id, ok := a.Lookup("x"); !ok || id != x {
		t.Fatal("x still has a reference")
	}
	a.Release("x")
	if _, ok := a.Lookup("x"); ok {
		t.Fatal("x should be released")
	}
	z, _ := a.Acquire("z")
	if z != 258 {
		t.Fatalf("a released ID is reused only after the range wraps: got %d", z)
	}
	w, _ := a.Acquire("w")
	if w != 256 {
		t.Fatalf("after wrapping, the free ID: got %d", w)
	}
	if _, err := a.Acquire("v"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("want ErrExhausted, got %v", err)
	}
}

func TestSPIFFE(t *testing.T) {
	id, err := Labels{Namespace: "shop"}.SPIFFEID("cluster.local")
	if err != nil || id.String() != "spiffe://cluster.local/ns/shop/sa/default" {
		t.Fatalf("got %v %v", id, err)
	}
	if _, err := (Labels{Namespace: "shop"}).SPIFFEID("Bad Domain"); err == nil {
		t.Fatal("invalid trust domain accepted")
	}
	api, _ := Labels{Namespace: "shop", ServiceAccount: "api"}.SPIFFEID("cluster.local")
	tests := []struct {
		pattern string
		ok      bool
		match   bool
	}{
		{"spiffe://cluster.local/ns/shop/sa/api", true, true},
		{"spiffe://cluster.local/ns/shop/sa/*", true, true},
		{"spiffe://cluster.local/ns/*/sa/*", true, true},
		{"spiffe://*/ns/shop/sa/api", true, true},
		{"spiffe://cluster.local/ns/shop", true, false},
		{"spiffe://cluster.local/ns/other/sa/*", true, false},
		{"spiffe://other.local/ns/shop/sa/api", true, false},
		{"spiffe://cluster.local/ns/sh*/sa/api", false, false},
		{"spiffe://cluster.local", false, false},
		{"https://cluster.local/ns/a", false, false},
		{"spiffe://cluster.local/ns//sa/a", false, false},
	}
	for _, tt := range tests {
		p, err := ParseSPIFFEPattern(tt.pattern)
		if (err == nil) != tt.ok {
			t.Errorf("%s: err %v, want ok=%v", tt.pattern, err, tt.ok)
			continue
		}
		if err == nil && p.Match(api) != tt.match {
			t.Errorf("%s: match %v, want %v", tt.pattern, !tt.match, tt.match)
		}
	}
}

func TestLongestMatch(t *testing.T) {
	c := map[netip.Prefix]NumericID{
		netip.MustParsePrefix("10.0.0.0/8"):   MinCIDRID,
		netip.MustParsePrefix("10.1.0.0/16"):  MinCIDRID + 1,
		Host(netip.MustParseAddr("10.1.0.5")): 300,
	}
	for ip, want := range map[string]NumericID{"10.1.0.5": 300, "10.1.0.6": MinCIDRID + 1, "10.2.0.1": MinCIDRID, "192.0.2.1": IDWorld, "::ffff:10.1.0.5": 300, "fd00::1": IDWorld} {
		if got := LongestMatch(c, netip.MustParseAddr(ip)); got != want {
			t.Errorf("%s: got %v want %v", ip, got, want)
		}
	}
}

func TestAllocatorRetainRestore(t *testing.T) {
	now := time.Unix(100, 0)
	a := NewAllocator(256, 1000)
	a.Retain(func() time.Time { return now })
	x, _ := a.Acquire("x")
	y, _ := a.Acquire("y")
	a.Release("x")
	if again, _ := a.Acquire("x"); again != x {
		t.Fatalf("a retired key came back as %d, want %d", again, x)
	}
	a.Release("y")
	st := a.State()
	b := NewAllocator(256, 1000)
	b.Retain(func() time.Time { return now })
	if err := b.Restore(st); err != nil {
		t.Fatal(err)
	}
	// Restored in the other order: numbers follow the keys, not the order.
	if got, _ := b.Acquire("y"); got != y {
		t.Fatalf("restored y = %d, want %d", got, y)
	}
	if got, _ := b.Acquire("x"); got != x {
		t.Fatalf("restored x = %d, want %d", got, x)
	}
	z, _ := b.Acquire("z")
	if z == x || z == y {
		t.Fatalf("new key got a restored number %d", z)
	}
	b.Release("z")
	if n := b.Expire(now.Add(time.Second)); n != 1 {
		t.Fatalf("expired %d, want 1 (z)", n)
	}
	if w, _ := b.Acquire("w"); w == z {
		t.Fatal("an expired number was reused before the range wrapped")
	}
	if err := b.Restore(st); err == nil {
		t.Fatal("restore into a used allocator succeeded")
	}
	bad := AllocatorState{Next: 256, Keys: map[string]KeyRecord{"p": {ID: 300}, "q": {ID: 300}}}
	if err := NewAllocator(256, 1000).Restore(bad); err == nil {
		t.Fatal("restore with a duplicate ID succeeded")
	}
}

func TestLabelsEnrolled(t *testing.T) {
	on := map[string]string{LabelMTLS: MTLSEnabled}
	for _, tc := range []struct {
		name string
		l    Labels
		want bool
	}{
		{"none", Labels{Namespace: "a"}, false},
		{"pod label", Labels{Namespace: "a", PodLabels: on}, true},
		{"namespace label", Labels{Namespace: "a", NamespaceLabels: on}, true},
		{"other value", Labels{Namespace: "a", PodLabels: map[string]string{LabelMTLS: "Enabled"}}, false},
		{"pod says disabled, namespace enables", Labels{Namespace: "a", PodLabels: map[string]string{LabelMTLS: "disabled"}, NamespaceLabels: on}, true},
		{"label on another key", Labels{Namespace: "a", PodLabels: map[string]string{"mtls": MTLSEnabled}}, false},
	} {
		if got := tc.l.Enrolled(); got != tc.want {
			t.Errorf("%s: Enrolled() = %v, want %v", tc.name, got, tc.want)
		}
	}
	// Enrollment is part of the key, so a relabel moves the workload to
	// another identity.
	if (Labels{Namespace: "a"}).Key() == (Labels{Namespace: "a", PodLabels: on}).Key() {
		t.Fatal("enrolled and not enrolled label sets share a key")
	}
}
