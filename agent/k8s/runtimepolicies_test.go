package k8s

import (
	"bytes"
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	k8stesting "k8s.io/client-go/testing"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// runtimePolicy is a BulkheadRuntimePolicy in shop whose detections are
// rule: action pairs.
func runtimePolicy(name string, selector map[string]any, detections ...string) *unstructured.Unstructured {
	var ds []any
	for i := 0; i+1 < len(detections); i += 2 {
		ds = append(ds, map[string]any{"rule": detections[i], "action": detections[i+1]})
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.APIVersion, "kind": v1alpha1.RuntimePolicyKind,
		"metadata": map[string]any{"name": name, "namespace": "shop"},
		"spec":     map[string]any{"selector": selector, "detections": ds},
	}}
}

var cartSelector = map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"app": "cart"}}}

// runtimeActions lists a state's runtime policies as ns/name: rule=action.
func runtimeActions(r *store.Result) []string {
	var out []string
	for _, rp := range r.Snapshot.RuntimePolicies {
		for _, d := range rp.Spec.Detections {
			out = append(out, rp.Namespace+"/"+rp.Name+": "+d.Rule+"="+string(d.Action))
		}
	}
	return out
}

// TestRuntimePoliciesInTheState: the Kubernetes store reads
// BulkheadRuntimePolicies as the dir store does. Each change is in the
// next state; one the store rejects is named, and its last valid version
// stays; a deleted one is gone.
func TestRuntimePoliciesInTheState(t *testing.T) {
	typed, dyn := clusterObjects(t)
	f := newFixture(t, Config{Debounce: 10 * time.Millisecond}, typed, dyn)
	f.run(t)
	r := f.next(t)
	if got := runtimeActions(r); !slices.Equal(got, []string{"shop/guard: BH-RT-007=Block", "shop/guard: BH-RT-001=Kill"}) {
		t.Fatalf("runtime policies %v", got)
	}
	ctx := context.Background()
	res := f.dynamic.Resource(RuntimePolicies).Namespace("shop")
	if _, err := res.Update(ctx, runtimePolicy("guard", cartSelector, "BH-RT-007", "Block"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.until(t, "guard updated", func(r *store.Result) bool { return len(runtimeActions(r)) == 1 })

	// Kill on a rule only a cgroup hook sees: the apiserver's CEL rule
	// refuses it; here (a CRD that disagrees, or none of its rules) the
	// store does, and the last valid version stays.
	if _, err := res.Update(ctx, runtimePolicy("guard", cartSelector, "BH-RT-007", "Kill"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r = f.until(t, "guard rejected", func(r *store.Result) bool { return len(r.Rejected) == 1 })
	if msg := r.Rejected[0].Error(); !strings.HasPrefix(msg, "BulkheadRuntimePolicy shop/guard: spec.detections[0].action") ||
		!strings.Contains(msg, "BH-RT-007") || !strings.Contains(msg, "last valid version stays") {
		t.Errorf("rejected %q", msg)
	}
	if got := runtimeActions(r); !slices.Equal(got, []string{"shop/guard: BH-RT-007=Block"}) {
		t.Errorf("runtime policies %v, want guard's last valid version", got)
	}
	// A field the agent does not know is refused, never dropped.
	u := runtimePolicy("extra", cartSelector, "BH-RT-002", "Kill")
	u.Object["spec"].(map[string]any)["quarantineAfter"] = "1m"
	if _, err := res.Create(ctx, u, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	r = f.until(t, "extra rejected", func(r *store.Result) bool { return len(r.Rejected) == 2 })
	// In name order: extra before guard.
	if msg := r.Rejected[0].Error(); !strings.HasPrefix(msg, "BulkheadRuntimePolicy shop/extra: ") || !strings.Contains(msg, "quarantineAfter") {
		t.Errorf("rejected %q", msg)
	}
	for _, name := range []string{"guard", "extra"} {
		if err := res.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	r = f.until(t, "both deleted", func(r *store.Result) bool { return len(r.Rejected) == 0 && len(r.Snapshot.RuntimePolicies) == 0 })
	if got := policyNames(r); !slices.Equal(got, []string{"np/shop/db-in", "bhp/shop/web-in"}) {
		t.Errorf("network policies %v", got)
	}
}

// TestRuntimePolicyCRDMissing: a cluster without the BulkheadRuntimePolicy
// CRD (an install from before it, upgraded with helm) still gets its
// network policy enforced, and the log says why there are no runtime
// policies. Once the CRD is served, its objects are in the next state.
func TestRuntimePolicyCRDMissing(t *testing.T) {
	typed, dyn := clusterObjects(t)
	var logs syncBuf
	f := newFixture(t, Config{Debounce: 10 * time.Millisecond, CRDCheckInterval: 20 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}, typed, dyn)
	var served atomic.Bool
	notFound := apierrors.NewNotFound(RuntimePolicies.GroupResource(), "")
	f.dynamic.PrependReactor("list", "bulkheadruntimepolicies", func(k8stesting.Action) (bool, runtime.Object, error) {
		if !served.Load() {
			return true, nil, notFound
		}
		return false, nil, nil
	})
	f.dynamic.PrependWatchReactor("bulkheadruntimepolicies", func(k8stesting.Action) (bool, watch.Interface, error) {
		if !served.Load() {
			return true, nil, notFound
		}
		return false, nil, nil
	})
	f.run(t)
	r := f.next(t)
	if got := policyNames(r); len(got) != 2 || len(r.Snapshot.RuntimePolicies) != 0 || len(r.Rejected) != 0 {
		t.Fatalf("first state: policies %v, runtime %v, rejected %v", got, runtimeActions(r), r.Rejected)
	}
	if !strings.Contains(logs.String(), "the BulkheadRuntimePolicy CRD is not installed") {
		t.Errorf("log does not say the CRD is missing: %s", logs.String())
	}
	served.Store(true)
	if _, err := f.dynamic.Resource(RuntimePolicies).Namespace("shop").Create(context.Background(),
		runtimePolicy("lock", cartSelector, "BH-RT-008", "Block"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// clusterYAML's guard was there all along, unseen without the CRD.
	f.until(t, "guard and lock, once the CRD is served", func(r *store.Result) bool {
		return slices.Equal(runtimeActions(r), []string{"shop/guard: BH-RT-007=Block", "shop/guard: BH-RT-001=Kill", "shop/lock: BH-RT-008=Block"})
	})
	waitFor(t, "the log saying the CRD is installed", func() bool {
		return strings.Contains(logs.String(), "the BulkheadRuntimePolicy CRD is installed")
	})
}

// TestRuntimePoliciesAgainstAPIServer: the same against a real
// kube-apiserver, which starts without the BulkheadRuntimePolicy CRD. Its
// watch-list, list and watch answers for a resource it does not serve are
// what the store must take as "none"; then the CRD is applied, and a
// policy created right after it is in a state.
func TestRuntimePoliciesAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dyn := dynamic.NewForConfigOrDie(srv.Config())
	srv.InstallCRD(ctx, crdPath)
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var logs syncBuf
	src, err := NewForConfig(srv.Config(), Config{NodeName: "node-a", Debounce: 50 * time.Millisecond,
		CRDCheckInterval: 200 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{src: src, updates: make(chan *store.Result, 100), fails: make(chan []api.StoreError, 100)}
	f.run(t)
	if r := f.next(t); len(r.Snapshot.RuntimePolicies) != 0 {
		t.Fatalf("runtime policies %v before their CRD", runtimeActions(r))
	}
	if !strings.Contains(logs.String(), "the BulkheadRuntimePolicy CRD is not installed") {
		t.Errorf("log does not say the CRD is missing: %s", logs.String())
	}
	srv.InstallCRD(ctx, runtimeCRDPath)
	res := dyn.Resource(RuntimePolicies).Namespace("shop")
	if _, err := res.Create(ctx, runtimePolicy("guard", cartSelector, "BH-RT-007", "Block"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	f.until(t, "guard", func(r *store.Result) bool {
		return slices.Equal(runtimeActions(r), []string{"shop/guard: BH-RT-007=Block"})
	})
	t.Logf("guard in the store %v after its create", time.Since(start).Round(time.Millisecond))
	// The CRD's own rules refuse what the store would (Kill on a cgroup rule).
	if _, err := res.Create(ctx, runtimePolicy("bad", cartSelector, "BH-RT-008", "Kill"), metav1.CreateOptions{}); !apierrors.IsInvalid(err) {
		t.Errorf("Kill on BH-RT-008 at the apiserver: %v, want Invalid", err)
	}
	// A change and a delete.
	if _, err := res.Create(ctx, runtimePolicy("guard2", cartSelector, "BH-RT-001", "Kill"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.until(t, "guard2", func(r *store.Result) bool { return len(runtimeActions(r)) == 2 })
	if err := res.Delete(ctx, "guard", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	f.until(t, "guard deleted", func(r *store.Result) bool {
		return slices.Equal(runtimeActions(r), []string{"shop/guard2: BH-RT-001=Kill"})
	})
}
