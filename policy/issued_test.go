package policy_test

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A SPIFFE ID that an SVID source issued (SPIRE's, other than the derived
// ns/<ns>/sa/<sa>) is the ID policies match: subject selection and peers
// follow it, and a pod whose issued ID goes away is matched by its derived
// ID again.
func TestIssuedSPIFFEIDDrivesMatching(t *testing.T) {
	const web, client = "spiffe://cluster.local/workload/web", "spiffe://cluster.local/workload/client"
	bp := &v1alpha1.BulkheadPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "web"},
		Spec: v1alpha1.BulkheadPolicySpec{
			Selector: v1alpha1.Selector{SPIFFEID: web},
			Ingress:  []v1alpha1.IngressRule{{From: []v1alpha1.Peer{{SPIFFEID: client}}}},
		}}
	pods := []policy.Pod{
		{Namespace: "x", Name: "web", Endpoint: 1, SPIFFEID: web, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
		{Namespace: "x", Name: "client", SPIFFEID: client, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		// Same labels and service account as client, but no issued ID.
		{Namespace: "x", Name: "other", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.3")}},
	}
	c := policy.NewCompiler(policy.Config{})
	ms, err := c.Reset(&policy.Snapshot{Pods: pods, BulkheadPolicies: []*v1alpha1.BulkheadPolicy{bp}})
	if err != nil {
		t.Fatal(err)
	}
	passes := func(ms *policy.MapState, from string) bool {
		id := ms.ResolveIP(netip.MustParseAddr(from))
		return ms.Lookup(1, policy.Ingress, id, policy.ProtoTCP, 80).Verdict.Passes()
	}
	if !passes(ms, "10.0.0.2") {
		t.Error("the pod issued the allowed SPIFFE ID is denied")
	}
	if passes(ms, "10.0.0.3") {
		t.Error("a pod with the same labels but no issued ID is allowed: the issued ID is not part of the identity")
	}
	if got := ms.ResolveIP(netip.MustParseAddr("10.0.0.2")); got == ms.ResolveIP(netip.MustParseAddr("10.0.0.3")) {
		t.Errorf("client and other share identity %d", got)
	}
	// The client's entry is deleted: it falls back to its derived ID.
	pods[1].SPIFFEID = ""
	if ms, _, err = c.UpsertPod(pods[1]); err != nil {
		t.Fatal(err)
	}
	if passes(ms, "10.0.0.2") {
		t.Error("the client is still allowed after losing its issued ID")
	}
	// web loses its ID: the policy no longer selects it, so it is open.
	pods[0].SPIFFEID = ""
	if ms, _, err = c.UpsertPod(pods[0]); err != nil {
		t.Fatal(err)
	}
	if !passes(ms, "10.0.0.3") {
		t.Error("web is still selected by a policy for an ID it no longer holds")
	}
	for _, id := range []string{"not a spiffe id", "spiffe://other.domain/workload/web", "spiffe://cluster.local/ns/prod/sa/admin"} {
		bad := pods[2]
		bad.SPIFFEID = id
		if _, _, err := c.UpsertPod(bad); err == nil {
			t.Errorf("issued SPIFFE ID %q accepted for a pod of namespace x", id)
		}
	}
}
