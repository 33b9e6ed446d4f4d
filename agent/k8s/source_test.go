package k8s

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"
)

// The cluster of these tests, as the dir store reads it: the Kubernetes
// store must build the same state from the same objects.
const clusterYAML = `apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  serviceAccountName: web-sa
  nodeName: node-a
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]}]
status: {phase: Running, podIPs: [{ip: 10.0.0.5}], hostIPs: [{ip: 192.0.2.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, containers: [{name: c, image: x}]}
status: {phase: Running, podIPs: [{ip: 10.0.1.7}], hostIPs: [{ip: 192.0.2.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: web-in, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: web}}}
  ingress: [{action: Allow, from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/*"}]}]
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: guard, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: web}}}
  detections: [{rule: BH-RT-007, action: Block}, {rule: BH-RT-001, action: Kill}]
`

// badBHP passes the CRD's schema but not the store's validation: a
// namespaced policy may not select another namespace's pods.
func badBHP(name string) *unstructured.Unstructured {
	return bhp(name, map[string]any{"selector": map[string]any{"spiffeID": "spiffe://cluster.local/ns/other/sa/x"}})
}

func bhp(name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.APIVersion, "kind": v1alpha1.Kind,
		"metadata": map[string]any{"name": name, "namespace": "shop"},
		"spec":     spec,
	}}
}

// clusterObjects decodes clusterYAML into typed objects for the fake
// clientset and unstructured ones for the fake dynamic client.
func clusterObjects(t *testing.T) (typed []runtime.Object, dyn []runtime.Object) {
	t.Helper()
	for doc := range strings.SplitSeq(clusterYAML, "\n---\n") {
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		var obj runtime.Object
		switch u.GetKind() {
		case "Namespace":
			obj = &corev1.Namespace{}
		case "Pod":
			obj = &corev1.Pod{}
		case "NetworkPolicy":
			obj = &networkingv1.NetworkPolicy{}
		default:
			dyn = append(dyn, &u)
			continue
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatal(err)
		}
		typed = append(typed, obj)
	}
	return typed, dyn
}

type fixture struct {
	client  *fake.Clientset
	dynamic *dynamicfake.FakeDynamicClient
	src     *Source
	updates chan *store.Result
	fails   chan []api.StoreError
	count   atomic.Int32
}

func newFixture(t *testing.T, cfg Config, typed, dyn []runtime.Object) *fixture {
	t.Helper()
	f := &fixture{
		client: fake.NewClientset(typed...),
		dynamic: dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
			map[schema.GroupVersionResource]string{BulkheadPolicies: "BulkheadPolicyList", RuntimePolicies: "BulkheadRuntimePolicyList"}, dyn...),
		updates: make(chan *store.Result, 100),
		fails:   make(chan []api.StoreError, 100),
	}
	cfg.Client, cfg.Dynamic = f.client, f.dynamic
	if cfg.ProbeInterval == 0 {
		cfg.ProbeInterval = 50 * time.Millisecond
	}
	f.src = New(cfg)
	return f
}

func (f *fixture) run(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		err := f.src.Run(ctx, func(r *store.Result) { f.count.Add(1); f.updates <- r }, func(e []api.StoreError) { f.fails <- e })
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// next waits for the next state; the bound only keeps a broken test from
// hanging (the store promises one within a second of an event).
func (f *fixture) next(t testing.TB) *store.Result {
	t.Helper()
	select {
	case r := <-f.updates:
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("no store state")
		return nil
	}
}

// until returns the first state for which ok holds.
func (f *fixture) until(t testing.TB, what string, ok func(*store.Result) bool) *store.Result {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case r := <-f.updates:
			if ok(r) {
				return r
			}
		case <-deadline:
			t.Fatalf("no store state with %s", what)
			return nil
		}
	}
}

func policyNames(r *store.Result) []string {
	var out []string
	for _, np := range r.Snapshot.NetworkPolicies {
		out = append(out, "np/"+np.Namespace+"/"+np.Name)
	}
	for _, bp := range r.Snapshot.BulkheadPolicies {
		out = append(out, "bhp/"+bp.Namespace+"/"+bp.Name)
	}
	return out
}

func TestInitialSyncMatchesDirStore(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(clusterYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	want, err := store.Load(dir, store.Options{})
	if err != nil {
		t.Fatalf("dir store: %v", err)
	}
	typed, dyn := clusterObjects(t)
	f := newFixture(t, Config{NodeName: "node-a"}, typed, dyn)
	f.run(t)
	got := f.next(t)

	if !reflect.DeepEqual(got.Snapshot.Namespaces, want.Snapshot.Namespaces) {
		t.Errorf("namespaces\n got %+v\nwant %+v", got.Snapshot.Namespaces, want.Snapshot.Namespaces)
	}
	// The dir store keeps file order, the Kubernetes store name order.
	wantPods := map[string]any{}
	for _, p := range want.Snapshot.Pods {
		wantPods[p.Namespace+"/"+p.Name] = p
	}
	gotPods := map[string]any{}
	for _, p := range got.Snapshot.Pods {
		gotPods[p.Namespace+"/"+p.Name] = p
	}
	if !reflect.DeepEqual(gotPods, wantPods) {
		t.Errorf("pods\n got %+v\nwant %+v", gotPods, wantPods)
	}
	if len(got.Snapshot.NetworkPolicies) != 1 || len(got.Snapshot.BulkheadPolicies) != 1 {
		t.Fatalf("policies %v", policyNames(got))
	}
	if g, w := got.Snapshot.NetworkPolicies[0].Spec, want.Snapshot.NetworkPolicies[0].Spec; !reflect.DeepEqual(g, w) {
		t.Errorf("NetworkPolicy spec\n got %+v\nwant %+v", g, w)
	}
	if g, w := got.Snapshot.BulkheadPolicies[0].Spec, want.Snapshot.BulkheadPolicies[0].Spec; !reflect.DeepEqual(g, w) {
		t.Errorf("BulkheadPolicy spec\n got %+v\nwant %+v", g, w)
	}
	if len(got.Snapshot.RuntimePolicies) != 1 || !reflect.DeepEqual(got.Snapshot.RuntimePolicies[0].Spec, want.Snapshot.RuntimePolicies[0].Spec) {
		t.Errorf("BulkheadRuntimePolicies\n got %+v\nwant %+v", got.Snapshot.RuntimePolicies, want.Snapshot.RuntimePolicies)
	}
	if len(got.Objects) != len(want.Objects) || len(got.Rejected) != 0 {
		t.Errorf("%d objects, rejected %v; want %d and none", len(got.Objects), got.Rejected, len(want.Objects))
	}
	if up, _ := f.src.Connected(); !up {
		t.Error("Connected() = false after the initial sync")
	}
}

func TestNoStateBeforeEveryInformerSynced(t *testing.T) {
	typed, dyn := clusterObjects(t)
	f := newFixture(t, Config{}, typed, dyn)
	// BulkheadPolicies cannot be listed yet: no state may be handed
	// over, not even one without them.
	var blocked atomic.Bool
	blocked.Store(true)
	f.dynamic.PrependReactor("list", "bulkheadpolicies", func(k8stesting.Action) (bool, runtime.Object, error) {
		if blocked.Load() {
			return true, nil, errors.New("the server is currently unable to handle the request")
		}
		return false, nil, nil
	})
	f.run(t)
	// The pods' informer has synced once the first pod list happened.
	waitFor(t, "the pods' list", func() bool { return hasAction(f.client.Actions(), "list", "pods") })
	select {
	case r := <-f.updates:
		t.Fatalf("state handed over before the BulkheadPolicies synced: %v", policyNames(r))
	case <-time.After(300 * time.Millisecond):
	}
	blocked.Store(false)
	if r := f.next(t); len(r.Snapshot.BulkheadPolicies) != 1 {
		t.Errorf("first state has policies %v", policyNames(r))
	}
}

func TestBurstIsCoalesced(t *testing.T) {
	typed, dyn := clusterObjects(t)
	// A long quiet period: the burst below is one however slow the machine.
	f := newFixture(t, Config{Debounce: time.Second, MaxDelay: time.Minute}, typed, dyn)
	f.run(t)
	f.next(t)
	ctx := context.Background()
	const n = 40
	for i := range n {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("np-%02d", i), Namespace: "shop"}}
		if _, err := f.client.NetworkingV1().NetworkPolicies("shop").Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	r := f.next(t)
	if len(r.Snapshot.NetworkPolicies) != n+1 {
		t.Fatalf("first state after the burst has %d NetworkPolicies, want %d in one state", len(r.Snapshot.NetworkPolicies), n+1)
	}
	if c := f.count.Load(); c != 2 {
		t.Errorf("%d states handed over, want 2 (the initial one and the burst)", c)
	}
}

func TestUnchangedStateIsNotHandedOverAgain(t *testing.T) {
	typed, dyn := clusterObjects(t)
	f := newFixture(t, Config{Debounce: 10 * time.Millisecond}, typed, dyn)
	f.run(t)
	f.next(t)
	ctx := context.Background()
	// A status change the store does not read (conditions), then one it
	// does (the pod's IP): only the second is a new state.
	pods := f.client.CoreV1().Pods("shop")
	p, err := pods.Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if p, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	p.Status.PodIPs = []corev1.PodIP{{IP: "10.0.0.6"}}
	if _, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r := f.next(t)
	for _, p := range r.Snapshot.Pods {
		if p.Name == "web" && (len(p.IPs) != 1 || p.IPs[0].String() != "10.0.0.6") {
			t.Errorf("first state after the updates has web's IPs %v, want the new one", p.IPs)
		}
	}
}

func TestInvalidBulkheadPolicyIsReportedAndTheRestApplied(t *testing.T) {
	typed, dyn := clusterObjects(t)
	dyn = append(dyn, badBHP("bad"))
	f := newFixture(t, Config{Debounce: 10 * time.Millisecond}, typed, dyn)
	f.run(t)
	r := f.next(t)
	if got := policyNames(r); !reflect.DeepEqual(got, []string{"np/shop/db-in", "bhp/shop/web-in"}) {
		t.Errorf("policies %v, want the valid two", got)
	}
	if len(r.Rejected) != 1 || !strings.HasPrefix(r.Rejected[0].Error(), "BulkheadPolicy shop/bad: ") {
		t.Fatalf("rejected %v, want BulkheadPolicy shop/bad", r.Rejected)
	}
	var se *store.Error
	if !errors.As(r.Rejected[0], &se) || se.File != "BulkheadPolicy shop/bad" || se.Line != 0 {
		t.Errorf("rejected %#v, want a *store.Error naming the object", r.Rejected[0])
	}

	// An update to an invalid version keeps the valid one enforced.
	ctx := context.Background()
	res := f.dynamic.Resource(BulkheadPolicies).Namespace("shop")
	if _, err := res.Update(ctx, badBHP("web-in"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r = f.until(t, "web-in rejected", func(r *store.Result) bool { return len(r.Rejected) == 2 })
	if len(r.Snapshot.BulkheadPolicies) != 1 || r.Snapshot.BulkheadPolicies[0].Spec.Selector.PodSelector == nil {
		t.Errorf("BulkheadPolicies %+v, want web-in's last valid version", r.Snapshot.BulkheadPolicies)
	}
	if msg := r.Rejected[1].Error(); !strings.Contains(msg, "web-in") || !strings.Contains(msg, "last valid version stays") {
		t.Errorf("rejected %q", msg)
	}
	// Deleted, it is gone, its last valid version too.
	if err := res.Delete(ctx, "web-in", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	r = f.until(t, "web-in deleted", func(r *store.Result) bool { return len(r.Rejected) == 1 })
	if got := policyNames(r); !reflect.DeepEqual(got, []string{"np/shop/db-in"}) {
		t.Errorf("policies %v after the delete", got)
	}
	// Fixed, the bad one applies.
	if _, err := res.Update(ctx, bhp("bad", map[string]any{"selector": map[string]any{"spiffeID": "spiffe://cluster.local/ns/shop/sa/x"}}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r = f.until(t, "bad fixed", func(r *store.Result) bool { return len(r.Rejected) == 0 })
	if got := policyNames(r); !reflect.DeepEqual(got, []string{"np/shop/db-in", "bhp/shop/bad"}) {
		t.Errorf("policies %v after the fix", got)
	}
	select {
	case e := <-f.fails:
		t.Errorf("fail(%v): per-object problems go in Result.Rejected", e)
	default:
	}
}

func TestTrimPod(t *testing.T) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web", Namespace: "shop", UID: "u1", ResourceVersion: "7", Labels: map[string]string{"app": "web"},
			Annotations:     map[string]string{"big": strings.Repeat("x", 4096), store.SPIFFEIDAnnotation: "spiffe://td/x"},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubelet"}},
			OwnerReferences: []metav1.OwnerReference{{Name: "rs"}},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: "sa", NodeName: "node-a",
			Volumes: []corev1.Volume{{Name: "v"}},
			Containers: []corev1.Container{
				{Name: "c", Image: "img", Env: []corev1.EnvVar{{Name: "A", Value: "b"}},
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP}, {ContainerPort: 9}}},
				{Name: "sidecar", Image: "img"},
			},
			InitContainers: []corev1.Container{{Name: "init", Ports: []corev1.ContainerPort{{Name: "x", ContainerPort: 1}}}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}},
			HostIP: "192.0.2.1", HostIPs: []corev1.HostIP{{IP: "192.0.2.1"}},
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "c"}},
		},
	}
	got, err := TrimPod(p)
	if err != nil {
		t.Fatal(err)
	}
	want := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web", Namespace: "shop", UID: "u1", ResourceVersion: "7", Labels: map[string]string{"app": "web"},
			Annotations: map[string]string{store.SPIFFEIDAnnotation: "spiffe://td/x"},
		},
		Spec: corev1.PodSpec{ServiceAccountName: "sa", NodeName: "node-a",
			Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}},
			HostIP: "192.0.2.1", HostIPs: []corev1.HostIP{{IP: "192.0.2.1"}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TrimPod\n got %+v\nwant %+v", got, want)
	}
	// The store reads the same pod from both.
	a, err1 := store.PodObject(p)
	b, err2 := store.PodObject(got.(*corev1.Pod))
	if err1 != nil || err2 != nil || !reflect.DeepEqual(a.Pod, b.Pod) {
		t.Errorf("the store reads the trimmed pod differently: %+v (%v) vs %+v (%v)", a, err1, b, err2)
	}
	// Tombstones pass through untouched.
	if _, err := TrimPod("not a pod"); err != nil {
		t.Error(err)
	}
}

func TestOutageKeepsTheLastState(t *testing.T) {
	typed, dyn := clusterObjects(t)
	f := newFixture(t, Config{Debounce: 10 * time.Millisecond}, typed, dyn)
	var down atomic.Bool
	var mu sync.Mutex
	var watches []watch.Interface
	outage := func(action k8stesting.Action) (bool, runtime.Object, error) {
		if down.Load() {
			return true, nil, errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
		}
		return false, nil, nil
	}
	f.client.PrependReactor("*", "*", outage)
	f.client.Discovery().(interface {
		PrependReactor(string, string, k8stesting.ReactionFunc)
	}).PrependReactor("*", "*", outage)
	tracker := f.client.Tracker()
	f.client.PrependWatchReactor("*", func(action k8stesting.Action) (bool, watch.Interface, error) {
		if down.Load() {
			return true, nil, errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
		}
		wa := action.(k8stesting.WatchActionImpl)
		w, err := tracker.Watch(wa.Resource, wa.Namespace)
		mu.Lock()
		watches = append(watches, w)
		mu.Unlock()
		return true, w, err
	})
	f.run(t)
	first := f.next(t)

	// The apiserver goes away: every watch ends, lists and the probe fail.
	down.Store(true)
	mu.Lock()
	for _, w := range watches {
		w.Stop()
	}
	watches = nil
	mu.Unlock()
	waitFor(t, "Connected() false", func() bool { up, _ := f.src.Connected(); return !up })
	// While it is away, objects change there (seen only on the relist).
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "during-outage", Namespace: "shop"}}
	if err := tracker.Add(np); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-f.updates:
		t.Fatalf("state handed over during the outage: %v", policyNames(r))
	case <-time.After(300 * time.Millisecond):
	}
	if len(first.Snapshot.Pods) != 2 || len(policyNames(first)) != 2 {
		t.Fatalf("the last state changed: %v", policyNames(first))
	}

	// It returns: the informers relist and the difference is handed over.
	down.Store(false)
	r := f.until(t, "the policy created during the outage", func(r *store.Result) bool {
		return len(r.Snapshot.NetworkPolicies) == 2
	})
	if len(r.Snapshot.Pods) != 2 || len(r.Snapshot.BulkheadPolicies) != 1 {
		t.Errorf("after the outage: %d pods, policies %v", len(r.Snapshot.Pods), policyNames(r))
	}
	waitFor(t, "Connected() true", func() bool { up, _ := f.src.Connected(); return up })
}

func waitFor(t testing.TB, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func hasAction(actions []k8stesting.Action, verb, resource string) bool {
	for _, a := range actions {
		if a.GetVerb() == verb && a.GetResource().Resource == resource {
			return true
		}
	}
	return false
}
