package k8s

import (
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func policyWithStatus(rv string, nodes ...string) *unstructured.Unstructured {
	var entries []any
	for _, n := range nodes {
		entries = append(entries, map[string]any{"nodeName": n, "observedGeneration": int64(1)})
	}
	u := bhp("p", map[string]any{"selector": map[string]any{"podSelector": map[string]any{}}})
	u.SetResourceVersion(rv)
	u.SetGeneration(1)
	if len(entries) > 0 {
		u.Object["status"] = map[string]any{"nodes": entries}
	}
	return u
}

// TestTrimPolicyStatus: the informer keeps this node's entry only, and no
// status at all when it has none.
func TestTrimPolicyStatus(t *testing.T) {
	obj, err := trimPolicyStatus("node-b")(policyWithStatus("1", "node-a", "node-b", "node-c"))
	if err != nil {
		t.Fatal(err)
	}
	nodes, _, _ := unstructured.NestedSlice(obj.(*unstructured.Unstructured).Object, "status", "nodes")
	if len(nodes) != 1 || nodes[0].(map[string]any)["nodeName"] != "node-b" {
		t.Errorf("kept %v, want node-b's entry only", nodes)
	}
	obj, _ = trimPolicyStatus("node-x")(policyWithStatus("1", "node-a"))
	if _, found, _ := unstructured.NestedFieldNoCopy(obj.(*unstructured.Unstructured).Object, "status"); found {
		t.Error("status kept for a node that has no entry")
	}
}

// TestStatusOnly: another node's status write starts no new state; a spec
// or label change does.
func TestStatusOnly(t *testing.T) {
	old := policyWithStatus("1", "node-a")
	if !statusOnly(old, policyWithStatus("2", "node-a", "node-b")) {
		t.Error("a status write counts as a change")
	}
	spec := policyWithStatus("2", "node-a")
	spec.Object["spec"] = map[string]any{"selector": map[string]any{"spiffeID": "spiffe://cluster.local/ns/shop/sa/x"}}
	labels := policyWithStatus("2", "node-a")
	labels.SetLabels(map[string]string{"a": "b"})
	for name, n := range map[string]any{"spec": spec, "labels": labels} {
		if statusOnly(old, n) {
			t.Errorf("a %s change is taken for a status write", name)
		}
	}
}
