package policy_test

import (
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// TestEnrolled: MapState.Enrolled holds the enrolled identities of the
// ipcache and of local endpoints, EndpointPolicy.Enrolled follows the pod,
// and an enrollment change is a change of the MapState with a new revision.
func TestEnrolled(t *testing.T) {
	on := map[string]string{identity.LabelMTLS: identity.MTLSEnabled}
	ip := netip.MustParseAddr
	s := &policy.Snapshot{
		Namespaces: []policy.Namespace{{Name: "shop"}, {Name: "bank", Labels: on}},
		Pods: []policy.Pod{
			{Namespace: "shop", Name: "db", Labels: map[string]string{"app": "db", identity.LabelMTLS: identity.MTLSEnabled}, Endpoint: 1, IPs: []netip.Addr{ip("10.0.0.1")}},
			{Namespace: "shop", Name: "web", Labels: map[string]string{"app": "web"}, Endpoint: 2, IPs: []netip.Addr{ip("10.0.0.2")}},
			// Enrolled by its namespace, on another node.
			{Namespace: "bank", Name: "vault", Labels: map[string]string{"app": "vault"}, IPs: []netip.Addr{ip("10.0.1.1"), ip("fd00::1:1")}},
			// Enrolled, local, without an address yet.
			{Namespace: "bank", Name: "new", Labels: map[string]string{"app": "new"}, Endpoint: 3},
			// Enrolled but neither local nor addressed: nothing can
			// reach it, so it is not listed.
			{Namespace: "bank", Name: "pending", Labels: map[string]string{"app": "pending"}},
		},
	}
	c := policy.NewCompiler(policy.Config{})
	ms, err := c.Reset(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := ms.Validate(); err != nil {
		t.Fatal(err)
	}
	want := map[identity.NumericID]bool{
		ms.ResolveIP(ip("10.0.0.1")):  true,
		ms.ResolveIP(ip("10.0.1.1")):  true,
		ms.ResolveIP(ip("fd00::1:1")): true,
		ms.Endpoints[3].Identity:      true,
	}
	if !maps.Equal(ms.Enrolled, want) {
		t.Fatalf("enrolled %v, want %v", ms.Enrolled, want)
	}
	if !ms.Endpoints[1].Enrolled || ms.Endpoints[2].Enrolled || !ms.Endpoints[3].Enrolled {
		t.Fatalf("endpoint enrollment: %v %v %v", ms.Endpoints[1].Enrolled, ms.Endpoints[2].Enrolled, ms.Endpoints[3].Enrolled)
	}

	// Enrolling a namespace moves its pods to enrolled identities.
	prev := ms
	ms, d, err := c.UpsertNamespace(policy.Namespace{Name: "shop", Labels: on})
	if err != nil {
		t.Fatal(err)
	}
	web := ms.ResolveIP(ip("10.0.0.2"))
	if !ms.Enrolled[web] || !ms.Endpoints[2].Enrolled || !slices.Contains(d.EnrolledAdded, web) {
		t.Fatalf("web not enrolled after its namespace was: %v, diff %+v", ms.Enrolled, d)
	}
	if ms.Revision == prev.Revision || d.Empty() {
		t.Fatalf("enrollment changed, revision %d -> %d, diff %+v", prev.Revision, ms.Revision, d)
	}
	if err := ms.Validate(); err != nil {
		t.Fatal(err)
	}
	if prev.Enrolled[web] || prev.Endpoints[2].Enrolled {
		t.Fatal("the previous MapState was modified")
	}

	// Taking the pod label off db leaves it enrolled by its namespace;
	// taking the namespace's off too ends it.
	db := s.Pods[0]
	db.Labels = map[string]string{"app": "db"}
	ms, _, err = c.UpsertPod(db)
	if err != nil {
		t.Fatal(err)
	}
	if !ms.Endpoints[1].Enrolled {
		t.Fatal("db lost enrollment though its namespace is enrolled")
	}
	prev = ms
	ms, d, err = c.UpsertNamespace(policy.Namespace{Name: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	if ms.Endpoints[1].Enrolled || ms.Enrolled[ms.ResolveIP(ip("10.0.0.1"))] || len(d.EnrolledRemoved) == 0 || ms.Revision == prev.Revision {
		t.Fatalf("shop still enrolled: %v, diff %+v", ms.Enrolled, d)
	}

	// A pod that goes leaves Enrolled.
	ms, d = c.DeletePod("bank", "vault")
	if len(ms.Enrolled) != 1 || !ms.Enrolled[ms.Endpoints[3].Identity] || len(d.EnrolledRemoved) != 1 {
		t.Fatalf("after vault left: %v, diff %+v", ms.Enrolled, d)
	}
	if err := ms.Validate(); err != nil {
		t.Fatal(err)
	}
}
