package v1alpha1_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
)

const runtimeCRDPath = "../../../manifests/crds/bulkhead.io_bulkheadruntimepolicies.yaml"

var runtimePolicies = schema.GroupVersionResource{Group: "bulkhead.io", Version: "v1alpha1", Resource: "bulkheadruntimepolicies"}

// runtimeCases: "" field is a good policy.
var runtimeCases = []struct{ name, field, msg, spec string }{
	{name: "block and kill", spec: `
selector: {podSelector: {matchLabels: {app: web}}}
detections: [{rule: BH-RT-007, action: Block}, {rule: BH-RT-005, action: Kill}, {rule: BH-RT-010, action: Alert}]`},
	{name: "quarantine", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-001, action: Quarantine}, {rule: BH-RT-007, action: Quarantine}]`},
	{name: "block a tracepoint rule", field: "spec.detections[0].action", msg: "Block is only possible for the rules a cgroup hook can deny", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-003, action: Block}]`},
	{name: "block the metadata service", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-017, action: Block}]`},
	{name: "kill a metadata connect", field: "spec.detections[0].action", msg: "Kill is only possible for the rules a tracepoint sees", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-017, action: Kill}]`},
	{name: "kill the agent's scan rule", field: "spec.detections[0].action", msg: "Kill is only possible for the rules a tracepoint sees", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-016, action: Kill}]`},
	{name: "block the agent's scan rule", field: "spec.detections[0].action", msg: "Block is only possible for the rules a cgroup hook can deny", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-016, action: Block}]`},
	{name: "kill a cgroup rule", field: "spec.detections[0].action", msg: "Kill is only possible for the rules a tracepoint sees", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-009, action: Kill}]`},
	{name: "unknown rule", field: "spec.detections[0].rule", msg: "Unsupported value", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-099, action: Alert}]`},
	{name: "unknown action", field: "spec.detections[0].action", msg: "Unsupported value", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-001, action: Pause}]`},
	{name: "duplicate rule", field: "spec.detections[1]", msg: "Duplicate value", spec: `
selector: {podSelector: {}}
detections: [{rule: BH-RT-001, action: Alert}, {rule: BH-RT-001, action: Kill}]`},
}

// TestRuntimeCRDAgainstAPIServer: the BulkheadRuntimePolicy CRD's schema
// and CEL rules refuse, at create, what policy.ValidateRuntimePolicy (the
// dir store's check) refuses, naming the field; every CEL rule has a case.
func TestRuntimeCRDAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx := context.Background()
	srv.InstallCRD(ctx, runtimeCRDPath)
	res := dynamic.NewForConfigOrDie(srv.Config()).Resource(runtimePolicies).Namespace("default")
	rules := crdRulesOf(t, runtimeCRDPath)
	covered := map[string]bool{}
	for i, tc := range runtimeCases {
		t.Run(tc.name, func(t *testing.T) {
			u := &unstructured.Unstructured{}
			u.SetAPIVersion(v1alpha1.APIVersion)
			u.SetKind(v1alpha1.RuntimePolicyKind)
			u.SetNamespace("default")
			u.SetName(fmt.Sprintf("case-%d", i))
			var spec map[string]any
			if err := yaml.Unmarshal([]byte(tc.spec), &spec); err != nil {
				t.Fatal(err)
			}
			u.Object["spec"] = spec
			var rp v1alpha1.BulkheadRuntimePolicy
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &rp); err != nil {
				t.Fatal(err)
			}
			goErr := policy.ValidateRuntimePolicy(&rp)
			_, err := res.Create(ctx, u, metav1.CreateOptions{})
			if tc.field == "" {
				if err != nil || goErr != nil {
					t.Fatalf("a good policy refused: apiserver %v, validator %v", err, goErr)
				}
				return
			}
			if !apierrors.IsInvalid(err) {
				t.Fatalf("create: %v, want invalid", err)
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
			if !errors.Is(goErr, policy.ErrInvalidPolicy) {
				t.Errorf("the apiserver refuses it (%v), the validator accepts it", err)
			} else if !strings.Contains(goErr.Error(), tc.field) {
				t.Errorf("the validator's error does not name %s: %v", tc.field, goErr)
			}
		})
	}
	if t.Failed() {
		return
	}
	for _, r := range rules {
		if !covered[r.key()] {
			t.Errorf("CEL rule at %s (%q) has no case", r.field, r.message)
		}
	}
}
