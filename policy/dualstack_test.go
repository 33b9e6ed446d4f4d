package policy_test

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// dualStackSnapshot: x/a has 10.0.0.5 and fd00::5; x/b (10.0.0.6, fd00::6)
// admits ingress, and x/a admits egress, only to and from 10.0.0.0/24, which
// covers a's and b's IPv4 addresses and neither IPv6 one.
func dualStackSnapshot() *policy.Snapshot {
	v4only := []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/24", Except: []string{"10.0.0.128/25"}}}}
	return &policy.Snapshot{
		Pods: []policy.Pod{
			{Namespace: "x", Name: "a", Labels: map[string]string{"app": "a"}, Endpoint: 1,
				IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}},
			{Namespace: "x", Name: "b", Labels: map[string]string{"app": "b"}, Endpoint: 2,
				IPs: []netip.Addr{netip.MustParseAddr("10.0.0.6"), netip.MustParseAddr("fd00::6")}},
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
	}
}

// TestDualStackIPBlockFollowsAddress: an ipBlock that covers only the IPv4
// address of a dual-stack pod matches that address and not the pod's IPv6
// one, as Kubernetes matches ipBlocks by IP.
func TestDualStackIPBlockFollowsAddress(t *testing.T) {
	s := dualStackSnapshot()
	check := func(t *testing.T, ms *policy.MapState) {
		t.Helper()
		a, b := s.Pods[0], s.Pods[1]
		for i, want := range []bool{true, false} {
			src := explain.PeerOfEndpoint(ms, "x/a", a.Endpoint, a.IPs[i:i+1])
			dst := explain.PeerOfEndpoint(ms, "x/b", b.Endpoint, b.IPs[i:i+1])
			r := explain.Verdict(ms, src, dst, policy.ProtoTCP, 80)
			if r.IngressPasses() != want || r.EgressPasses() != want {
				t.Errorf("%s -> %s: ingress passes %v, egress passes %v, want %v (identities %d -> %d)",
					a.IPs[i], b.IPs[i], r.IngressPasses(), r.EgressPasses(), want, src.Identity, dst.Identity)
			}
			// The reference model itself, with the ipcache's answer.
			srcID, dstID := ms.ResolveIP(a.IPs[i]), ms.ResolveIP(b.IPs[i])
			if got := ms.Lookup(b.Endpoint, policy.Ingress, srcID, policy.ProtoTCP, 80).Verdict.Passes(); got != want {
				t.Errorf("Lookup ingress at b from %s (identity %d): passes %v, want %v", a.IPs[i], srcID, got, want)
			}
			if got := ms.Lookup(a.Endpoint, policy.Egress, dstID, policy.ProtoTCP, 80).Verdict.Passes(); got != want {
				t.Errorf("Lookup egress at a to %s (identity %d): passes %v, want %v", b.IPs[i], dstID, got, want)
			}
		}
	}
	t.Run("full compile", func(t *testing.T) {
		ms, err := policy.Compile(s)
		if err != nil {
			t.Fatal(err)
		}
		check(t, ms)
		// explain given whole address lists judges by the family of the
		// source's first address, on both ends, whatever order the
		// destination lists its addresses in.
		a, b := s.Pods[0], s.Pods[1]
		for _, tc := range []struct {
			src, dst []netip.Addr
			want     bool
		}{
			{a.IPs, []netip.Addr{b.IPs[1], b.IPs[0]}, true},
			{[]netip.Addr{a.IPs[1], a.IPs[0]}, b.IPs, false},
		} {
			src := explain.PeerOfEndpoint(ms, "x/a", a.Endpoint, tc.src)
			dst := explain.PeerOfEndpoint(ms, "x/b", b.Endpoint, tc.dst)
			r := explain.Verdict(ms, src, dst, policy.ProtoTCP, 80)
			if r.Passes() != tc.want || r.FromIdentity != ms.ResolveIP(tc.src[0]) {
				t.Errorf("explain %v -> %v: passes %v, want %v; from identity %d, want %s's %d",
					tc.src, tc.dst, r.Passes(), tc.want, r.FromIdentity, tc.src[0], ms.ResolveIP(tc.src[0]))
			}
		}
	})
	t.Run("incremental", func(t *testing.T) {
		// Pods first, then the policies: the ipBlock's prefixes appear after
		// the pods have their identities and must split them.
		c := policy.NewCompiler(policy.Config{})
		if _, err := c.Reset(&policy.Snapshot{Pods: s.Pods}); err != nil {
			t.Fatal(err)
		}
		for _, np := range s.NetworkPolicies {
			if _, _, err := c.UpsertNetworkPolicy(np); err != nil {
				t.Fatal(err)
			}
		}
		check(t, c.MapState())
		// Deleting the policies merges the identities again.
		for _, np := range s.NetworkPolicies {
			if _, _, err := c.DeletePolicy(policy.KindNetworkPolicy, np.Namespace, np.Name); err != nil {
				t.Fatal(err)
			}
		}
		ms := c.MapState()
		if a4, a6 := ms.ResolveIP(s.Pods[0].IPs[0]), ms.ResolveIP(s.Pods[0].IPs[1]); a4 != a6 || a4 == identity.IDWorld {
			t.Errorf("without ipBlocks, a's addresses resolve to %d and %d, want one workload identity", a4, a6)
		}
	})
}
