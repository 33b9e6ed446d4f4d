package v1alpha1_test

import (
	"os"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"sigs.k8s.io/yaml"
)

const crdPath = "../../../manifests/crds/bulkhead.io_bulkheadpolicies.yaml"

// TestCRDSchema validates objects against the generated CRD's OpenAPI
// schema, with the API server's own validator: the example must be
// accepted, and malformed objects rejected before they reach the agent.
func TestCRDSchema(t *testing.T) {
	raw, err := os.ReadFile(crdPath)
	if err != nil {
		t.Fatal(err)
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(raw, &crd); err != nil {
		t.Fatal(err)
	}
	var internal apiextensions.JSONSchemaProps
	if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(crd.Spec.Versions[0].Schema.OpenAPIV3Schema, &internal, nil); err != nil {
		t.Fatal(err)
	}
	v, _, err := validation.NewSchemaValidator(&internal)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		doc  string
		ok   bool
	}{
		{"issue example", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/api"}
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/frontend"}]
    ports: [{port: 8080, protocol: TCP}]
  - from: [{spiffeID: "spiffe://cluster.local/ns/*/sa/*"}]
    action: Deny
  egress:
  - to: [{cidr: 10.96.0.0/12}]
    ports: [{port: 53, protocol: UDP}]`, true},
		{"mtls and audit", `
spec:
  selector: {podSelector: {matchLabels: {app: a}}}
  mode: Audit
  ingress: [{from: [{podSelector: {}, namespaceSelector: {}}], mtls: Required}]`, true},
		{"no selector", `
spec:
  selector: {}`, false},
		{"two selectors", `
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/a/sa/b", podSelector: {}}`, false},
		{"bad action", `
spec:
  selector: {podSelector: {}}
  egress: [{action: Drop}]`, false},
		{"bad mtls", `
spec:
  selector: {podSelector: {}}
  egress: [{mtls: Optional}]`, false},
		{"not a spiffe id", `
spec:
  selector: {spiffeID: "https://example.com/x"}`, false},
		{"empty peer", `
spec:
  selector: {podSelector: {}}
  ingress: [{from: [{}]}]`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var obj map[string]any
			if err := yaml.Unmarshal([]byte(tt.doc), &obj); err != nil {
				t.Fatal(err)
			}
			errs := validation.ValidateCustomResource(nil, obj, v)
			if (len(errs) == 0) != tt.ok {
				t.Fatalf("valid=%v, want %v: %v", len(errs) == 0, tt.ok, errs)
			}
		})
	}
}
