package datapath

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestProgDualStackIPBlock: an ipBlock that covers only the IPv4 addresses
// of two dual-stack pods admits their IPv4 traffic and not their IPv6
// traffic, in the kernel, at the receiver's ingress and the sender's egress.
// The compiler gives each address region its own identity; this checks that
// what the kernel resolves from the ipcache follows the address too.
func TestProgDualStackIPBlock(t *testing.T) {
	const epA, epB = policy.EndpointID(21), policy.EndpointID(22)
	a4, a6 := netip.MustParseAddr("10.213.1.5"), netip.MustParseAddr("fd00:213:1::5")
	b4, b6 := netip.MustParseAddr("10.213.1.6"), netip.MustParseAddr("fd00:213:1::6")
	v4only := []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.213.1.0/24"}}}
	ms, err := policy.Compile(&policy.Snapshot{
		Pods: []policy.Pod{
			{Namespace: "x", Name: "a", Labels: map[string]string{"app": "a"}, Endpoint: epA, IPs: []netip.Addr{a4, a6}},
			{Namespace: "x", Name: "b", Labels: map[string]string{"app": "b"}, Endpoint: epB, IPs: []netip.Addr{b4, b6}},
		},
		NetworkPolicies: []*networkingv1.NetworkPolicy{
			{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "b-in"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: v4only}},
			}},
			{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "a-out"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress:      []networkingv1.NetworkPolicyEgressRule{{To: v4only}},
			}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	d := newTestDatapath(t, Config{})
	if _, err := d.Apply(ms); err != nil {
		t.Fatalf("apply: %v", err)
	}
	for _, tc := range []struct {
		src, dst netip.Addr
		want     uint32
	}{
		{a4, b4, retPass},
		{a6, b6, retShot},
	} {
		syn := tcpSyn(tc.src, tc.dst, 40000, 80)
		bindTestEndpoint(t, d, uint32(epA))
		// a may send from its own addresses, as Attach registers them:
		// a drop here must be the policy's, not source validation's.
		addrs, err := encodeAddrs(Endpoint{ID: epA, MAC: testPodMAC, Addrs: []netip.Addr{a4, a6}})
		if err != nil {
			t.Fatal(err)
		}
		if err := d.setAddrs(epA, addrs); err != nil {
			t.Fatal(err)
		}
		before := dropCount(t, d, DropPolicy)
		if got := run(t, d.objs.BulkheadFromPod, syn.build()); got != tc.want {
			t.Errorf("egress at a, %s -> %s: got %#x, want %#x (a's policy sees %s as identity %d)",
				tc.src, tc.dst, got, tc.want, tc.dst, ms.ResolveIP(tc.dst))
		}
		if n := dropCount(t, d, DropPolicy) - before; tc.want == retShot && n != 1 {
			t.Errorf("egress at a, %s -> %s: %d policy drops counted, want 1", tc.src, tc.dst, n)
		}
		bindTestEndpoint(t, d, uint32(epB))
		if got := run(t, d.objs.BulkheadToPod, syn.build()); got != tc.want {
			t.Errorf("ingress at b, %s -> %s: got %#x, want %#x (b's policy sees %s as identity %d)",
				tc.src, tc.dst, got, tc.want, tc.src, ms.ResolveIP(tc.src))
		}
	}
}

// dropCount is the datapath's packet count for drop reason r.
func dropCount(t *testing.T, d *Datapath, r DropReason) uint64 {
	t.Helper()
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c.ByDrop[r].Packets
}
