package policy_test

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/mattfenwick/cyclonus/pkg/matcher"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// TestOracleDeviations pins the two places where cyclonus v0.5.6 and
// Kubernetes disagree, found by the differential test. In both, the
// Kubernetes answer comes from apimachinery's own selector (what the API
// server and every CNI use), our compiler agrees with it, and cyclonus is
// the one that is wrong:
//
//  1. `NotIn` on a key the pod lacks: Kubernetes matches ("environment notin
//     (frontend)" selects objects without the label, as the labels docs
//     say); cyclonus' IsMatchExpressionMatchForLabels returns false.
//  2. matchLabels {k: ""} on a pod without k: Kubernetes requires the key;
//     cyclonus compares labels[k] == "" and matches.
//
// If a cyclonus upgrade fixes either, this test fails, and the generator's
// restrictions in differential_test.go can go.
func TestOracleDeviations(t *testing.T) {
	pod := map[string]string{"app": "a"} // no "env" key
	tests := []struct {
		name string
		sel  metav1.LabelSelector
		k8s  bool
	}{
		{"NotIn on a missing key", metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "env", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"prod"}}}}, true},
		{"empty matchLabels value on a missing key", metav1.LabelSelector{MatchLabels: map[string]string{"env": ""}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sel, err := metav1.LabelSelectorAsSelector(&tt.sel)
			if err != nil {
				t.Fatal(err)
			}
			if got := sel.Matches(labels.Set(pod)); got != tt.k8s {
				t.Fatalf("apimachinery says %v, the test says Kubernetes does %v", got, tt.k8s)
			}
			// A policy selecting the pod by tt.sel with no ingress rules
			// denies ingress exactly when the selector matches.
			np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "x"},
				Spec: networkingv1.NetworkPolicySpec{PodSelector: tt.sel, PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
			snap := &policy.Snapshot{
				Pods:            []policy.Pod{{Namespace: "x", Name: "p", Labels: pod, Endpoint: 1, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}},
				NetworkPolicies: []*networkingv1.NetworkPolicy{np},
			}
			ms, err := policy.Compile(snap)
			if err != nil {
				t.Fatal(err)
			}
			dst := explain.PeerOfEndpoint(ms, "x/p", 1, snap.Pods[0].IPs)
			ours := explain.Verdict(ms, explain.PeerOfAddr(ms, netip.MustParseAddr("192.0.2.1")), dst, policy.ProtoTCP, 80)
			if ours.IngressPasses() == tt.k8s {
				t.Fatalf("ours: ingress passes=%v, Kubernetes selects=%v", ours.IngressPasses(), tt.k8s)
			}
			oracle := matcher.BuildNetworkPolicies(false, []*networkingv1.NetworkPolicy{np}).IsTrafficAllowed(&matcher.Traffic{
				Source:       &matcher.TrafficPeer{IP: "192.0.2.1"},
				Destination:  &matcher.TrafficPeer{IP: "10.0.0.1", Internal: &matcher.InternalPeer{PodLabels: pod, NamespaceLabels: map[string]string{}, Namespace: "x"}},
				ResolvedPort: 80, Protocol: "TCP",
			})
			if oracle.Ingress.IsAllowed() != tt.k8s {
				t.Fatalf("cyclonus now agrees with Kubernetes here (allowed=%v): lift the generator restriction", oracle.Ingress.IsAllowed())
			}
		})
	}
}
