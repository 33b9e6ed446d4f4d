package v1alpha1_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"
)

var bulkheadPolicies = schema.GroupVersionResource{Group: "bulkhead.io", Version: "v1alpha1", Resource: "bulkheadpolicies"}

// celCase is a BulkheadPolicy spec and what the apiserver must say of it:
// field and message of the rejection, or nothing (accepted).
type celCase struct {
	name  string
	spec  string
	field string // the rejected field, e.g. spec.ingress[0].mtls ("" : accepted)
	msg   string // part of the apiserver's message for field
}

var celCases = []celCase{
	// Accepted, by the apiserver and by the compiler.
	{name: "ports of every kind", spec: `
selector: {podSelector: {matchLabels: {app: a}}}
ingress:
- from: [{podSelector: {}}]
  ports: [{port: 80}, {port: 8000, endPort: 8080, protocol: TCP}, {port: http}, {protocol: UDP}, {port: 9, protocol: SCTP}]`},
	{name: "mtls with a TCP port among others", spec: `
selector: {podSelector: {}}
ingress: [{from: [{spiffeID: "spiffe://cluster.local/ns/*/sa/web"}], mtls: Required, ports: [{port: 53, protocol: UDP}, {port: 443}]}]
egress: [{to: [{namespaceSelector: {}}], mtls: Required}]`},
	{name: "cidrs with except", spec: `
selector: {spiffeID: "spiffe://*/ns/default/sa/api"}
egress:
- to: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.4/32]}, {cidr: "fd00::/8", except: ["fd00:1::/32"]}]
  action: Deny`},
	{name: "path segments with dots", spec: `
selector: {spiffeID: "spiffe://example.org/.a/a.b/..c"}`},

	// Rejected: one rule each (and the schema's own checks).
	{name: "protocol", field: "spec.ingress[0].ports", msg: "protocol must be TCP, UDP or SCTP", spec: `
selector: {podSelector: {}}
ingress: [{ports: [{port: 80, protocol: ICMP}]}]`},
	{name: "protocol egress", field: "spec.egress[1].ports", msg: "protocol must be TCP, UDP or SCTP", spec: `
selector: {podSelector: {}}
egress: [{}, {ports: [{protocol: tcp}]}]`},
	{name: "port 0", field: "spec.egress[0].ports", msg: "a numeric port must be between 1 and 65535", spec: `
selector: {podSelector: {}}
egress: [{ports: [{port: 0}]}]`},
	{name: "port 65536", field: "spec.ingress[0].ports", msg: "a numeric port must be between 1 and 65535", spec: `
selector: {podSelector: {}}
ingress: [{ports: [{port: 65536}]}]`},
	{name: "named port too long", field: "spec.egress[0].ports", msg: "a named port must be at most 15 characters", spec: `
selector: {podSelector: {}}
egress: [{ports: [{port: abcdefghijklmnop}]}]`},
	{name: "named port too long ingress", field: "spec.ingress[0].ports", msg: "a named port must be at most 15 characters", spec: `
selector: {podSelector: {}}
ingress: [{ports: [{port: 1234567890abcdef}]}]`},
	{name: "endPort below port", field: "spec.ingress[0].ports", msg: "endPort needs a numeric port, and must be between port and 65535", spec: `
selector: {podSelector: {}}
ingress: [{ports: [{port: 8080, endPort: 80}]}]`},
	{name: "endPort without port", field: "spec.egress[0].ports", msg: "endPort needs a numeric port", spec: `
selector: {podSelector: {}}
egress: [{ports: [{endPort: 80}]}]`},
	{name: "endPort with a named port", field: "spec.egress[0].ports", msg: "endPort needs a numeric port", spec: `
selector: {podSelector: {}}
egress: [{ports: [{port: http, endPort: 80}]}]`},
	{name: "endPort above 65535", field: "spec.ingress[0].ports", msg: "endPort needs a numeric port", spec: `
selector: {podSelector: {}}
ingress: [{ports: [{port: 1, endPort: 70000}]}]`},
	{name: "deny with mtls", field: "spec.ingress[0].mtls", msg: "only Allow rules can require mTLS", spec: `
selector: {podSelector: {}}
ingress: [{action: Deny, mtls: Required}]`},
	{name: "deny with mtls egress", field: "spec.egress[0].mtls", msg: "only Allow rules can require mTLS", spec: `
selector: {podSelector: {}}
egress: [{action: Deny, mtls: Required, to: [{podSelector: {}}]}]`},
	{name: "mtls on UDP only", field: "spec.ingress[0].ports", msg: "mtls: Required matches TCP only", spec: `
selector: {podSelector: {}}
ingress: [{mtls: Required, ports: [{port: 53, protocol: UDP}, {protocol: SCTP}]}]`},
	{name: "mtls on UDP only egress", field: "spec.egress[0].ports", msg: "mtls: Required matches TCP only", spec: `
selector: {podSelector: {}}
egress: [{mtls: Required, ports: [{protocol: UDP}]}]`},
	{name: "mtls from a cidr", field: "spec.ingress[0].from", msg: "mtls: Required cannot be verified for an address", spec: `
selector: {podSelector: {}}
ingress: [{mtls: Required, from: [{podSelector: {}}, {cidr: 10.0.0.0/8}]}]`},
	{name: "mtls to a cidr", field: "spec.egress[0].to", msg: "mtls: Required cannot be verified for an address", spec: `
selector: {podSelector: {}}
egress: [{mtls: Required, to: [{cidr: "::/0"}]}]`},
	{name: "spiffeID and podSelector", field: "spec.ingress[0].from[0]", msg: "set exactly one of spiffeID, podSelector/namespaceSelector, or cidr", spec: `
selector: {podSelector: {}}
ingress: [{from: [{spiffeID: "spiffe://cluster.local/ns/a/sa/b", podSelector: {}}]}]`},
	{name: "cidr and namespaceSelector", field: "spec.egress[0].to[1]", msg: "set exactly one of spiffeID", spec: `
selector: {podSelector: {}}
egress: [{to: [{cidr: 10.0.0.0/8}, {cidr: 10.0.0.0/8, namespaceSelector: {}}]}]`},
	{name: "except without cidr", field: "spec.ingress[0].from[0].except", msg: "except is only valid with cidr", spec: `
selector: {podSelector: {}}
ingress: [{from: [{podSelector: {}, except: [10.0.0.0/8]}]}]`},
	{name: "except without cidr egress", field: "spec.egress[0].to[0].except", msg: "except is only valid with cidr", spec: `
selector: {podSelector: {}}
egress: [{to: [{spiffeID: "spiffe://cluster.local/ns/default/sa/x", except: [10.0.0.0/8]}]}]`},
	{name: "not a cidr", field: "spec.egress[0].to[0].cidr", msg: "cidr must be a CIDR", spec: `
selector: {podSelector: {}}
egress: [{to: [{cidr: 10.0.0.0}]}]`},
	{name: "IPv4-mapped cidr", field: "spec.ingress[0].from[0].cidr", msg: "cidr must be a CIDR", spec: `
selector: {podSelector: {}}
ingress: [{from: [{cidr: "::ffff:10.0.0.0/104"}]}]`},
	{name: "except outside cidr", field: "spec.egress[0].to[0].except", msg: "every except entry must be a CIDR strictly inside cidr", spec: `
selector: {podSelector: {}}
egress: [{to: [{cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.1.0.0/24]}]}]`},
	{name: "except equal to cidr", field: "spec.ingress[0].from[0].except", msg: "every except entry must be a CIDR strictly inside cidr", spec: `
selector: {podSelector: {}}
ingress: [{from: [{cidr: 10.0.0.0/16, except: [10.0.0.0/16]}]}]`},
	{name: "except of the other family", field: "spec.ingress[0].from[0].except", msg: "every except entry must be a CIDR strictly inside cidr", spec: `
selector: {podSelector: {}}
ingress: [{from: [{cidr: 0.0.0.0/0, except: ["fd00::/8"]}]}]`},
	{name: "except not a cidr", field: "spec.ingress[0].from[0].except", msg: "every except entry must be a CIDR strictly inside cidr", spec: `
selector: {podSelector: {}}
ingress: [{from: [{cidr: 10.0.0.0/8, except: [10.0.0.1]}]}]`},
	// The schema's patterns and enums, which have no rule of their own.
	{name: "glob inside a segment", field: "spec.selector.spiffeID", msg: "should match", spec: `
selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/web-*"}`},
	{name: "dot-dot segment", field: "spec.ingress[0].from[0].spiffeID", msg: "should match", spec: `
selector: {podSelector: {}}
ingress: [{from: [{spiffeID: "spiffe://cluster.local/ns/../sa/x"}]}]`},
	{name: "upper-case trust domain", field: "spec.selector.spiffeID", msg: "should match", spec: `
selector: {spiffeID: "spiffe://Cluster.local/ns/a/sa/b"}`},
	{name: "bad mode", field: "spec.mode", msg: "Unsupported value", spec: `
selector: {podSelector: {}}
mode: Warn`},
}

// TestCRDValidationAgainstAPIServer installs the generated CRD in a real
// kube-apiserver and creates each case: a bad object must be refused at
// create, naming the field and saying why, and a good one accepted. The
// compiler's validator (policy.ValidateBulkheadPolicy, which the dir store
// has instead of an apiserver) must agree on every case, and every CEL rule
// of the CRD must be exercised by a case: a rule added to the types without
// a case here, or a rule that the Go validator does not share, fails.
func TestCRDValidationAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx := context.Background()
	srv.InstallCRD(ctx, crdPath)
	bhps := dynamic.NewForConfigOrDie(srv.Config()).Resource(bulkheadPolicies).Namespace("default")

	// Each (schema location, message) of a rule; a case that draws the
	// message at that location covers it.
	rules := crdRules(t)
	covered := map[string]bool{}
	for i, tc := range celCases {
		t.Run(tc.name, func(t *testing.T) {
			u := &unstructured.Unstructured{}
			u.SetAPIVersion(v1alpha1.APIVersion)
			u.SetKind(v1alpha1.Kind)
			u.SetNamespace("default")
			u.SetName(fmt.Sprintf("case-%d", i))
			var spec map[string]any
			if err := yaml.Unmarshal([]byte(tc.spec), &spec); err != nil {
				t.Fatal(err)
			}
			u.Object["spec"] = spec

			// The compiler's verdict on the same object.
			var bp v1alpha1.BulkheadPolicy
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &bp); err != nil {
				t.Fatal(err)
			}
			goErr := policy.ValidateBulkheadPolicy(&bp)

			_, err := bhps.Create(ctx, u, metav1.CreateOptions{})
			if tc.field == "" {
				if err != nil {
					t.Fatalf("the apiserver refused a good policy: %v", err)
				}
				if goErr != nil {
					t.Fatalf("the compiler refused a good policy: %v", goErr)
				}
				return
			}
			if !apierrors.IsInvalid(err) {
				t.Fatalf("create: %v, want the apiserver to refuse it as invalid", err)
			}
			var se *apierrors.StatusError
			if !errors.As(err, &se) || se.ErrStatus.Details == nil {
				t.Fatalf("no details in %v", err)
			}
			found := false
			for _, c := range se.ErrStatus.Details.Causes {
				if c.Field == tc.field && strings.Contains(c.Message, tc.msg) {
					found = true
				}
				for _, r := range rules {
					if unindexed(c.Field) == r.field && strings.Contains(c.Message, r.message) {
						covered[r.key()] = true
					}
				}
			}
			if !found {
				t.Errorf("want %s: %q among the causes of %v", tc.field, tc.msg, err)
			}
			// The whole message is what kubectl prints: it names the field.
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("the message does not name %s: %v", tc.field, err)
			}
			if !errors.Is(goErr, policy.ErrInvalidPolicy) {
				t.Errorf("the apiserver refuses it (%v), but the compiler accepts it: the CRD and policy/ have drifted", err)
			}
		})
	}
	if t.Failed() {
		return
	}
	for _, r := range rules {
		if !covered[r.key()] {
			t.Errorf("CEL rule at %s (%q) has no case here that draws it", r.field, r.message)
		}
	}
}

// celRule is one x-kubernetes-validations entry: field is where its
// message lands (the node, plus fieldPath), indexes as [].
type celRule struct{ field, message string }

func (r celRule) key() string { return r.field + " " + r.message }

var indexRE = regexp.MustCompile(`\[\d+\]`)

func unindexed(field string) string { return indexRE.ReplaceAllString(field, "[]") }

// crdRules lists every CEL rule of the generated CRD.
func crdRules(t *testing.T) []celRule { return crdRulesOf(t, crdPath) }

func crdRulesOf(t *testing.T, path string) []celRule {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(raw, &crd); err != nil {
		t.Fatal(err)
	}
	var out []celRule
	var walk func(path string, s *apiextensionsv1.JSONSchemaProps)
	walk = func(path string, s *apiextensionsv1.JSONSchemaProps) {
		for _, v := range s.XValidations {
			out = append(out, celRule{field: path + v.FieldPath, message: v.Message})
		}
		for _, name := range slices.Sorted(maps.Keys(s.Properties)) {
			p := s.Properties[name]
			walk(strings.TrimPrefix(path+"."+name, "."), &p)
		}
		if s.Items != nil && s.Items.Schema != nil {
			walk(path+"[]", s.Items.Schema)
		}
	}
	for _, v := range crd.Spec.Versions {
		if v.Schema != nil && v.Schema.OpenAPIV3Schema != nil {
			walk("", v.Schema.OpenAPIV3Schema)
		}
	}
	if len(out) == 0 {
		t.Fatal("the CRD has no CEL rules")
	}
	return out
}
