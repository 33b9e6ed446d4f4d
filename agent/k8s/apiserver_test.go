package k8s

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

const (
	crdPath        = "../../manifests/crds/bulkhead.io_bulkheadpolicies.yaml"
	runtimeCRDPath = "../../manifests/crds/bulkhead.io_bulkheadruntimepolicies.yaml"
)

// TestAgainstAPIServer runs the store against a real kube-apiserver and
// etcd: every kind of change, a BulkheadPolicy that the CRD's schema
// rejects and one that only the store rejects, and an apiserver restart.
func TestAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	dyn := dynamic.NewForConfigOrDie(srv.Config())
	srv.InstallCRD(ctx, crdPath)

	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"team": "a"}}}, metav1.CreateOptions{}))
	for _, p := range []struct{ name, node, ip string }{{"web", "node-a", "10.0.0.5"}, {"db", "node-b", "10.0.1.7"}} {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "shop", Labels: map[string]string{"app": p.name}},
			Spec: corev1.PodSpec{NodeName: p.node, Containers: []corev1.Container{{Name: "c", Image: "x",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		}
		created, err := cs.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip, PodIPs: []corev1.PodIP{{IP: p.ip}}}
		must(cs.CoreV1().Pods("shop").UpdateStatus(ctx, created, metav1.UpdateOptions{}))
	}
	bhps := dyn.Resource(BulkheadPolicies).Namespace("shop")
	must(bhps.Create(ctx, bhp("web-in", map[string]any{
		"selector": map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"app": "web"}}},
		"ingress":  []any{map[string]any{"action": "Allow", "from": []any{map[string]any{"spiffeID": "spiffe://cluster.local/ns/shop/sa/*"}}}},
	}), metav1.CreateOptions{}))

	src, err := NewForConfig(srv.Config(), Config{NodeName: "node-a", Debounce: 100 * time.Millisecond, ProbeInterval: 400 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{src: src, updates: make(chan *store.Result, 100), fails: make(chan []api.StoreError, 100)}
	f.run(t)

	r := f.next(t)
	if len(r.Snapshot.Namespaces) < 1 || len(podsOf(r, "shop")) != 2 || !slices.Equal(policyNames(r), []string{"bhp/shop/web-in"}) {
		t.Fatalf("initial state: pods %v, policies %v", podsOf(r, "shop"), policyNames(r))
	}
	for _, p := range r.Snapshot.Pods {
		if p.Name == "web" && (len(p.IPs) != 1 || p.IPs[0].String() != "10.0.0.5" || len(p.Ports) != 1) {
			t.Errorf("web in the store: %+v", p)
		}
	}

	// step makes one change and waits for the state that shows it. The
	// time from the API call's return to the state is logged: the store
	// promises 1 s, but a test on a shared machine does not assert time.
	step := func(what string, change func() error, ok func(*store.Result) bool) *store.Result {
		t.Helper()
		start := time.Now()
		if err := change(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		r := f.until(t, what, ok)
		t.Logf("%s: in the store after %v", what, time.Since(start).Round(time.Millisecond))
		return r
	}
	nps := cs.NetworkingV1().NetworkPolicies("shop")
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "db-in", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}}}
	step("NetworkPolicy created", func() error { _, err := nps.Create(ctx, np, metav1.CreateOptions{}); return err },
		func(r *store.Result) bool { return slices.Contains(policyNames(r), "np/shop/db-in") })
	step("NetworkPolicy updated", func() error {
		cur, err := nps.Get(ctx, "db-in", metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Spec.PodSelector.MatchLabels = map[string]string{"app": "web"}
		_, err = nps.Update(ctx, cur, metav1.UpdateOptions{})
		return err
	}, func(r *store.Result) bool {
		return len(r.Snapshot.NetworkPolicies) == 1 && r.Snapshot.NetworkPolicies[0].Spec.PodSelector.MatchLabels["app"] == "web"
	})
	step("NetworkPolicy deleted", func() error { return nps.Delete(ctx, "db-in", metav1.DeleteOptions{}) },
		func(r *store.Result) bool { return len(r.Snapshot.NetworkPolicies) == 0 })
	step("pod relabelled", func() error {
		cur, err := cs.CoreV1().Pods("shop").Get(ctx, "db", metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Labels["tier"] = "data"
		_, err = cs.CoreV1().Pods("shop").Update(ctx, cur, metav1.UpdateOptions{})
		return err
	}, func(r *store.Result) bool {
		for _, p := range r.Snapshot.Pods {
			if p.Name == "db" && p.Labels["tier"] == "data" {
				return true
			}
		}
		return false
	})
	step("namespace relabelled", func() error {
		cur, err := cs.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Labels["team"] = "b"
		_, err = cs.CoreV1().Namespaces().Update(ctx, cur, metav1.UpdateOptions{})
		return err
	}, func(r *store.Result) bool {
		for _, n := range r.Snapshot.Namespaces {
			if n.Name == "shop" && n.Labels["team"] == "b" {
				return true
			}
		}
		return false
	})

	// The CRD's schema rejects what it can see.
	_, err = bhps.Create(ctx, bhp("no-spiffe", map[string]any{"selector": map[string]any{"spiffeID": "not-a-spiffe-id"}}), metav1.CreateOptions{})
	if !apierrors.IsInvalid(err) {
		t.Errorf("create of a BulkheadPolicy with a bad spiffeID: %v, want the apiserver to reject it as invalid", err)
	}
	// What only the store can judge is reported, and the rest applies.
	r = step("invalid BulkheadPolicy reported", func() error { _, err := bhps.Create(ctx, badBHP("bad"), metav1.CreateOptions{}); return err },
		func(r *store.Result) bool { return len(r.Rejected) == 1 })
	if msg := r.Rejected[0].Error(); !strings.HasPrefix(msg, "BulkheadPolicy shop/bad: ") {
		t.Errorf("rejected: %q", msg)
	}
	if !slices.Equal(policyNames(r), []string{"bhp/shop/web-in"}) {
		t.Errorf("policies with the invalid one: %v", policyNames(r))
	}
	step("invalid BulkheadPolicy deleted", func() error { return bhps.Delete(ctx, "bad", metav1.DeleteOptions{}) },
		func(r *store.Result) bool { return len(r.Rejected) == 0 })

	// The apiserver goes away: the last state stays, and nothing is handed
	// over until it is back.
	before := drain(f)
	srv.StopAPIServer()
	waitFor(t, "Connected() false", func() bool { up, _ := src.Connected(); return !up })
	if got := drain(f); got != nil {
		t.Errorf("state handed over while the apiserver was away: pods %v, policies %v", podsOf(got, "shop"), policyNames(got))
	}
	srv.StartAPIServer()
	waitFor(t, "Connected() true", func() bool { up, _ := src.Connected(); return up })
	r = step("NetworkPolicy created after the restart", func() error { _, err := nps.Create(ctx, np, metav1.CreateOptions{}); return err },
		func(r *store.Result) bool { return slices.Contains(policyNames(r), "np/shop/db-in") })
	if before != nil && !reflect.DeepEqual(r.Snapshot.Pods, before.Snapshot.Pods) {
		t.Errorf("pods changed across the restart:\n%+v\n%+v", before.Snapshot.Pods, r.Snapshot.Pods)
	}
	if len(r.Snapshot.Pods) < 2 || !slices.Contains(policyNames(r), "bhp/shop/web-in") {
		t.Errorf("after the restart: pods %v, policies %v", podsOf(r, "shop"), policyNames(r))
	}
}

// drain returns the last state waiting in f (nil: none).
func drain(f *fixture) *store.Result {
	var last *store.Result
	for {
		select {
		case r := <-f.updates:
			last = r
		default:
			return last
		}
	}
}

func podsOf(r *store.Result, ns string) []string {
	var out []string
	for _, p := range r.Snapshot.Pods {
		if p.Namespace == ns {
			out = append(out, p.Name)
		}
	}
	return out
}
