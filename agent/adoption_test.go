package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/adopt"
	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy"
)

// TestAdoptCandidates: the adopter is offered this node's running pods
// that no endpoint holds, and not a pod whose endpoint was removed a moment
// ago (the store still lists it, and its address may already lead to the
// next pod's sandbox).
func TestAdoptCandidates(t *testing.T) {
	ip := netip.MustParseAddr
	a := &Agent{cfg: Config{NodeName: "n1"}, endpoints: map[api.EndpointKey]*endpointRecord{}}
	a.setLocalPods([]policy.Pod{
		{Namespace: "shop", Name: "held", NodeName: "n1", IPs: []netip.Addr{ip("10.0.0.1")}},
		{Namespace: "shop", Name: "free", NodeName: "n1", IPs: []netip.Addr{ip("10.0.0.2")}},
		{Namespace: "shop", Name: "gone", NodeName: "n1", IPs: []netip.Addr{ip("10.0.0.3")}},
		{Namespace: "shop", Name: "pending", NodeName: "n1"},
		{Namespace: "shop", Name: "remote", NodeName: "n2", IPs: []netip.Addr{ip("10.0.1.1")}},
	})
	a.endpoints[api.EndpointKey{ContainerID: "c1", IfName: "eth0"}] = &endpointRecord{Pod: api.PodRef{Namespace: "shop", Name: "held"}}
	a.tombstoneLocked(&endpointRecord{Pod: api.PodRef{Namespace: "shop", Name: "gone"}})
	var got []string
	for _, p := range (adoptHost{a}).Candidates() {
		got = append(got, p.String())
	}
	if !slices.Equal(got, []string{"shop/free"}) {
		t.Fatalf("candidates = %v, want [shop/free]", got)
	}
	// Adopt refuses a veth an endpoint enforces already.
	a.endpoints[api.EndpointKey{ContainerID: "c1", IfName: "eth0"}].HostIfIndex = 7
	a.endpoints[api.EndpointKey{ContainerID: "c1", IfName: "eth0"}].HostVeth = "veth7"
	err := (adoptHost{a}).Adopt(t.Context(), api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: "adopted-x", IfName: "eth0"}, HostIfIndex: 7, HostVeth: "veth7",
		Pod: api.PodRef{Namespace: "shop", Name: "free"}})
	if err != adopt.ErrEnforced {
		t.Fatalf("adopting an enforced veth: %v, want ErrEnforced", err)
	}
}
