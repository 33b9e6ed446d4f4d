package policy_test

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	networkingv1 "k8s.io/api/networking/v1"
)

func fuzzSnapshot() *policy.Snapshot {
	return &policy.Snapshot{
		Namespaces: []policy.Namespace{{Name: "default", Labels: map[string]string{"a": "b"}}},
		Pods: []policy.Pod{
			{Namespace: "default", Name: "p1", Labels: map[string]string{"a": "b"}, Endpoint: 1,
				Ports: []policy.NamedPort{{Name: "http", Port: 80, Proto: policy.ProtoTCP}}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "other", Name: "p2", Labels: map[string]string{"c": "d"}, Endpoint: 2, IPs: []netip.Addr{netip.MustParseAddr("10.1.0.1")}},
		},
	}
}

// FuzzNetworkPolicyJSON: validation never panics, and whatever it accepts
// compiles into a MapState that satisfies its invariants.
func FuzzNetworkPolicyJSON(f *testing.F) {
	for _, s := range []string{
		`{"metadata":{"name":"x"},"spec":{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.0.0.0/16"]}}],"ports":[{"port":80,"endPort":90},{"port":"http"}]}]}}`,
		`{"metadata":{"name":"x"},"spec":{"podSelector":{"matchExpressions":[{"key":"a","operator":"NotIn","values":["b"]}]},"egress":[{"to":[{"namespaceSelector":{},"podSelector":{"matchLabels":{"c":"d"}}}]}],"policyTypes":["Egress"]}}`,
		`{"metadata":{"name":"x"},"spec":{"podSelector":{},"egress":[{"ports":[{"protocol":"SCTP"}]},{}]}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var np networkingv1.NetworkPolicy
		if json.Unmarshal(data, &np) != nil {
			return
		}
		if policy.ValidateNetworkPolicy(&np) != nil {
			return
		}
		s := fuzzSnapshot()
		s.NetworkPolicies = append(s.NetworkPolicies, &np)
		ms, err := policy.Compile(s)
		if err != nil {
			t.Fatalf("valid policy rejected by the compiler: %v", err)
		}
		if err := ms.Validate(); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzBulkheadPolicyJSON is FuzzNetworkPolicyJSON for our CRD.
func FuzzBulkheadPolicyJSON(f *testing.F) {
	for _, s := range []string{
		`{"metadata":{"name":"x"},"spec":{"selector":{"spiffeID":"spiffe://cluster.local/ns/default/sa/*"},"ingress":[{"from":[{"spiffeID":"spiffe://cluster.local/ns/*/sa/*"}],"action":"Deny"}],"egress":[{"to":[{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}],"ports":[{"port":53,"protocol":"UDP"}]},{"to":[{"spiffeID":"spiffe://cluster.local/ns/*/sa/*"}],"ports":[{"port":5432}],"mtls":"Required"}]}}`,
		// Invalid since mTLS: a cidr peer and UDP only.
		`{"metadata":{"name":"x"},"spec":{"selector":{"podSelector":{}},"egress":[{"to":[{"cidr":"10.0.0.0/8"}],"ports":[{"port":53,"protocol":"UDP"}],"mtls":"Required"}]}}`,
		`{"metadata":{"name":"x"},"spec":{"selector":{"podSelector":{}},"mode":"Audit","ingress":[{"from":[{"podSelector":{},"namespaceSelector":{}}]}]}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var bp v1alpha1.BulkheadPolicy
		if json.Unmarshal(data, &bp) != nil {
			return
		}
		if policy.ValidateBulkheadPolicy(&bp) != nil {
			return
		}
		s := fuzzSnapshot()
		s.BulkheadPolicies = append(s.BulkheadPolicies, &bp)
		ms, err := policy.Compile(s)
		if err != nil {
			t.Fatalf("valid policy rejected by the compiler: %v", err)
		}
		if err := ms.Validate(); err != nil {
			t.Fatal(err)
		}
	})
}
