package manifests_test

import (
	"context"
	"os"
	"regexp"
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"
)

// TestInstallYAMLServerDryRun sends every object of install.yaml to a real
// kube-apiserver with dryRun=All, as `kubectl apply --dry-run=server -f
// manifests/install.yaml` does: the apiserver decodes, defaults, validates
// and admits each one (the CRD's schema and CEL rules, the DaemonSet's pod
// spec, the RBAC objects) without storing it.
func TestInstallYAMLServerDryRun(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx := context.Background()
	cfg := srv.Config()
	dyn := dynamic.NewForConfigOrDie(cfg)
	cs := kubernetes.NewForConfigOrDie(cfg)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(cfg)))

	b, err := os.ReadFile(installYAML)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		if len(u.Object) == 0 {
			continue // comments only
		}
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s %s: %v", gvk.Kind, u.GetName(), err)
		}
		ri := dynamic.ResourceInterface(dyn.Resource(m.Resource))
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ns := u.GetNamespace()
			if ns == "" {
				t.Fatalf("%s %s: no namespace in install.yaml", gvk.Kind, u.GetName())
			}
			// The apiserver makes kube-system itself; any other namespace
			// is the user's to create first.
			if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				t.Fatal(err)
			}
			ri = dyn.Resource(m.Resource).Namespace(ns)
		}
		if _, err := ri.Create(ctx, &u, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: metav1.FieldValidationStrict}); err != nil {
			t.Errorf("server dry-run of %s %s: %v", gvk.Kind, u.GetName(), err)
		}
		n++
		// Dry run stores nothing.
		if _, err := ri.Get(ctx, u.GetName(), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("%s %s after a dry run: %v, want not found", gvk.Kind, u.GetName(), err)
		}
	}
	if n < 5 {
		t.Fatalf("%d objects in %s, want the CRD, RBAC and the DaemonSet", n, installYAML)
	}
}
