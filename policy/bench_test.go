package policy_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// benchSnapshot is a cluster shaped like real ones: namespaces of ten apps
// with ten replicas each, every app with one policy that allows its caller
// app, a monitoring namespace, DNS and the internet except the cluster.
func benchSnapshot(namespaces, appsPerNS, replicas int) *policy.Snapshot {
	s := &policy.Snapshot{}
	n := 0
	for i := range namespaces {
		ns := fmt.Sprintf("ns%03d", i)
		team := "product"
		if i == 0 {
			team = "monitoring"
		}
		s.Namespaces = append(s.Namespaces, policy.Namespace{Name: ns, Labels: map[string]string{"team": team}})
		for a := range appsPerNS {
			for r := range replicas {
				n++
				s.Pods = append(s.Pods, policy.Pod{
					Namespace: ns, Name: fmt.Sprintf("app%d-%d", a, r),
					Labels:         map[string]string{"app": fmt.Sprintf("app%d", a), "tier": fmt.Sprintf("t%d", a%3)},
					ServiceAccount: fmt.Sprintf("app%d", a),
					Ports:          []policy.NamedPort{{Name: "http", Port: 8080, Proto: policy.ProtoTCP}, {Name: "metrics", Port: 9090, Proto: policy.ProtoTCP}},
					IPs:            []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)})},
					Endpoint:       policy.EndpointID(n),
				})
			}
			s.NetworkPolicies = append(s.NetworkPolicies, benchPolicy(ns, a, appsPerNS, 8090))
		}
	}
	return s
}

func benchPolicy(ns string, a, apps int, hi int32) *networkingv1.NetworkPolicy {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	http, metrics, dns, https := intstr.FromString("http"), intstr.FromString("metrics"), intstr.FromInt32(53), intstr.FromInt32(443)
	lo := intstr.FromInt32(8080)
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("app%d", a)},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", a)}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{
				{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", (a+apps-1)%apps)}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &http}}},
				{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "monitoring"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &metrics}}},
			},
			Egress: []networkingv1.NetworkPolicyEgressRule{
				{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "app", Operator: metav1.LabelSelectorOpIn, Values: []string{fmt.Sprintf("app%d", (a+1)%apps)}}}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &lo, EndPort: &hi}}},
				{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.96.0.0/12"}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &dns}}},
				{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0", Except: []string{"10.0.0.0/8"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &https}}},
			},
		},
	}
}

// BenchmarkCompile: 10,000 pods in 100 namespaces with 1,000 policies.
func BenchmarkCompile(b *testing.B) {
	s := benchSnapshot(100, 10, 10)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := policy.Compile(s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCompileBudget is BenchmarkCompile with the agent's default trie
// budget (a 262,144-key trie), which measures every endpoint and policy.
func BenchmarkCompileBudget(b *testing.B) {
	s := benchSnapshot(100, 10, 10)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := policy.NewCompiler(policy.Config{Budget: defaultBudget}).Reset(s); err != nil {
			b.Fatal(err)
		}
	}
}

// defaultBudget is the agent's per-endpoint and per-policy default. Its node
// budget is left out: the benchmark's 10,000 local pods take more than any
// node's trie holds (every pod is local, as in the offline CLI).
var defaultBudget = policy.Budget{Endpoint: 262144 / 16, Policy: 262144 / 8}

// BenchmarkCompileIncremental: one change against the same cluster.
func BenchmarkCompileIncremental(b *testing.B) { benchIncremental(b, policy.Config{}) }

// BenchmarkCompileIncrementalBudget: the same with the default budget.
func BenchmarkCompileIncrementalBudget(b *testing.B) {
	benchIncremental(b, policy.Config{Budget: defaultBudget})
}

func benchIncremental(b *testing.B, cfg policy.Config) {
	s := benchSnapshot(100, 10, 10)
	c := policy.NewCompiler(cfg)
	if _, err := c.Reset(s); err != nil {
		b.Fatal(err)
	}
	// The counters live outside the sub-benchmarks: the framework runs each
	// several times, and every iteration must be a real change.
	relabels, changes := 0, 0
	b.Run("relabel-pod", func(b *testing.B) {
		p := s.Pods[4321]
		b.ReportAllocs()
		for b.Loop() {
			relabels++
			i := relabels
			p.Labels = map[string]string{"app": fmt.Sprintf("app%d", i%10), "tier": "t1"}
			if _, d, err := c.UpsertPod(p); err != nil || d.Empty() {
				b.Fatalf("relabel: %v (empty diff %v)", err, d.Empty())
			}
		}
	})
	b.Run("change-policy", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			changes++
			i := changes
			np := benchPolicy("ns042", 3, 10, 8090+int32(i%2+1))
			if _, d, err := c.UpsertNetworkPolicy(np); err != nil || d.Empty() {
				b.Fatalf("change policy: %v (empty diff %v)", err, d.Empty())
			}
		}
	})
}
