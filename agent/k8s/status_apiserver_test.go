package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// gate stands in for the status writer's token bucket: while held, no
// write can start.
type gate struct {
	mu sync.Mutex
	ch chan struct{} // nil: open
}

func (g *gate) Wait(ctx context.Context) error {
	g.mu.Lock()
	ch := g.ch
	g.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (g *gate) hold() { g.mu.Lock(); g.ch = make(chan struct{}); g.mu.Unlock() }
func (g *gate) release() {
	g.mu.Lock()
	close(g.ch)
	g.ch = nil
	g.mu.Unlock()
}

// node is one agent's store, reporting each state back as the agent does
// after applying it (agent/storestatus.go), at revisions 1, 2, 3, ...
type node struct {
	src      *Source
	gate     *gate
	rejected atomic.Pointer[map[store.PolicyRef]store.Rejection]
	revision atomic.Uint64
}

func startNode(ctx context.Context, t *testing.T, srv *kubeapi.Server, name string) *node {
	t.Helper()
	src, err := NewForConfig(srv.Config(), Config{NodeName: name, Debounce: 20 * time.Millisecond, ProbeInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{src: src, gate: &gate{}}
	src.status.limit = n.gate
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		err := src.Run(ctx, func(r *store.Result) {
			a := store.Applied{Revision: n.revision.Add(1)}
			if m := n.rejected.Load(); m != nil {
				a.Rejected = *m
			}
			src.ReportApplied(r, a)
		}, func([]api.StoreError) {})
		if err != nil {
			t.Errorf("%s: Run: %v", name, err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	return n
}

// wanted is the writer's wanted entry for a policy (ok false: none).
func (n *node) wanted(key types.NamespacedName) (verdict, bool) {
	n.src.status.mu.Lock()
	defer n.src.status.mu.Unlock()
	v, ok := n.src.status.desired[key]
	return v, ok
}

// nodeStatus reads a node's entry of a policy's status from the apiserver.
func nodeStatus(ctx context.Context, t *testing.T, dyn dynamic.Interface, name, nodeName string) (*v1alpha1.NodeStatus, *metav1.Condition) {
	t.Helper()
	u, err := dyn.Resource(BulkheadPolicies).Namespace("shop").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var bp v1alpha1.BulkheadPolicy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &bp); err != nil {
		t.Fatal(err)
	}
	for i, n := range bp.Status.Nodes {
		if n.NodeName == nodeName {
			for j, c := range n.Conditions {
				if c.Type == v1alpha1.ConditionAccepted {
					return &bp.Status.Nodes[i], &n.Conditions[j]
				}
			}
			return &bp.Status.Nodes[i], nil
		}
	}
	return nil, nil
}

// TestPolicyStatusAgainstAPIServer runs two nodes' stores against a real
// kube-apiserver, each reporting its states back as the agent does, and
// checks the status they write: both entries side by side, an invalid
// policy and one over budget on one node only, the generation and the
// revision following an update, a burst of 100 updates while the writer
// is held coming out as one write, nothing written for a deleted policy,
// and nothing rewritten by a restarted agent.
func TestPolicyStatusAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv.InstallCRD(ctx, crdPath)
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	dyn := dynamic.NewForConfigOrDie(srv.Config())
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	bhps := dyn.Resource(BulkheadPolicies).Namespace("shop")
	webSpec := func(port int) map[string]any {
		return map[string]any{
			"selector": map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"app": "web"}}},
			"ingress":  []any{map[string]any{"ports": []any{map[string]any{"port": int64(port)}}}},
		}
	}
	if _, err := bhps.Create(ctx, bhp("web-in", webSpec(80)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := bhps.Create(ctx, badBHP("bad"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	update := func(port int) int64 {
		t.Helper()
		// A merge patch: the agents' status writes change the
		// resourceVersion all along, and an update would conflict.
		patch, err := json.Marshal(map[string]any{"spec": webSpec(port)})
		if err != nil {
			t.Fatal(err)
		}
		u, err := bhps.Patch(ctx, "web-in", types.MergePatchType, patch, metav1.PatchOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return u.GetGeneration()
	}
	web := types.NamespacedName{Namespace: "shop", Name: "web-in"}

	a := startNode(ctx, t, srv, "node-a")
	b := startNode(ctx, t, srv, "node-b")

	// Both entries, side by side: neither agent overwrites the other's.
	var revA int64
	for _, n := range []string{"node-a", "node-b"} {
		waitFor(t, n+" accepts web-in", func() bool {
			s, c := nodeStatus(ctx, t, dyn, "web-in", n)
			return s != nil && c != nil && c.Status == metav1.ConditionTrue && s.ObservedGeneration == 1 && s.EnforcedGeneration == 1 && s.Revision > 0
		})
		waitFor(t, n+" rejects bad", func() bool {
			s, c := nodeStatus(ctx, t, dyn, "bad", n)
			return s != nil && c != nil && c.Status == metav1.ConditionFalse
		})
		s, c := nodeStatus(ctx, t, dyn, "bad", n)
		if c.Reason != v1alpha1.ReasonInvalid || !strings.Contains(c.Message, "selects namespace other, but the policy is in shop") || s.EnforcedGeneration != 0 {
			t.Errorf("%s's entry for bad: %+v %+v, want Invalid with the compiler's reason and nothing enforced", n, s, c)
		}
	}
	s, _ := nodeStatus(ctx, t, dyn, "web-in", "node-a")
	revA = s.Revision
	u, err := bhps.Get(ctx, "web-in", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	managers := map[string]bool{}
	for _, m := range u.GetManagedFields() {
		if m.Subresource == "status" {
			managers[m.Manager] = true
		}
	}
	if !managers["bulkhead-agent/node-a"] || !managers["bulkhead-agent/node-b"] {
		t.Errorf("status field managers %v, want bulkhead-agent/node-a and bulkhead-agent/node-b", managers)
	}

	// An update: generation and revision follow.
	gen := update(81)
	waitFor(t, "node-a enforces generation 2", func() bool {
		s, c := nodeStatus(ctx, t, dyn, "web-in", "node-a")
		return s != nil && c != nil && c.Status == metav1.ConditionTrue && s.ObservedGeneration == gen && s.EnforcedGeneration == gen && c.ObservedGeneration == gen
	})
	s, _ = nodeStatus(ctx, t, dyn, "web-in", "node-a")
	if s.Revision <= revA {
		t.Errorf("revision %d after the update, want more than %d", s.Revision, revA)
	}
	prevGen := gen

	// Over budget on node-a only: the previous version stays in force
	// there, node-b enforces the new one.
	a.rejected.Store(&map[store.PolicyRef]store.Rejection{
		{Kind: policy.KindBulkheadPolicy, Namespace: "shop", Name: "web-in"}: {
			Reason: store.ReasonOverBudget, Message: "over its trie budget", KeptPrevious: true}})
	gen = update(82)
	waitFor(t, "node-a reports web-in over budget", func() bool {
		s, c := nodeStatus(ctx, t, dyn, "web-in", "node-a")
		return s != nil && c != nil && c.Status == metav1.ConditionFalse && s.ObservedGeneration == gen
	})
	s, c := nodeStatus(ctx, t, dyn, "web-in", "node-a")
	if c.Reason != store.ReasonOverBudget || c.Message != "over its trie budget" || s.EnforcedGeneration != prevGen {
		t.Errorf("node-a: %+v %+v, want OverBudget with generation %d still enforced", s, c, prevGen)
	}
	waitFor(t, "node-b accepts the new generation", func() bool {
		s, c := nodeStatus(ctx, t, dyn, "web-in", "node-b")
		return s != nil && c != nil && c.Status == metav1.ConditionTrue && s.EnforcedGeneration == gen
	})
	// Reports follow applies; here, applies follow states: a new one.
	a.rejected.Store(nil)
	gen = update(83)

	// A burst of 100 updates while node-a's writer is held: each is a new
	// wanted entry (the test waits for each to be wanted), and the writer
	// writes only the last.
	waitFor(t, "node-a accepts again", func() bool {
		s, c := nodeStatus(ctx, t, dyn, "web-in", "node-a")
		return s != nil && c != nil && c.Status == metav1.ConditionTrue && s.EnforcedGeneration == gen
	})
	a.gate.hold()
	before := a.src.StatusWrites()
	beforeB := b.src.StatusWrites()
	for i := range 100 {
		gen = update(1000 + i)
		waitFor(t, fmt.Sprintf("node-a wants generation %d", gen), func() bool {
			v, ok := a.wanted(web)
			return ok && v.observed == gen
		})
	}
	a.gate.release()
	waitFor(t, "node-a's entry shows the last generation", func() bool {
		s, _ := nodeStatus(ctx, t, dyn, "web-in", "node-a")
		return s != nil && s.ObservedGeneration == gen && s.EnforcedGeneration == gen
	})
	waitFor(t, "node-b's entry shows the last generation", func() bool {
		s, _ := nodeStatus(ctx, t, dyn, "web-in", "node-b")
		return s != nil && s.ObservedGeneration == gen
	})
	waitFor(t, "node-a has nothing left to write", func() bool { return !a.src.status.pending(web) })
	if got := a.src.StatusWrites() - before; got != 1 {
		t.Errorf("%d status writes for 100 updates while the writer was held, want 1", got)
	}
	t.Logf("node-b (not held, token bucket only) wrote %d times for the 100 updates", b.src.StatusWrites()-beforeB)

	// Deleted: nothing to write.
	before = a.src.StatusWrites()
	if err := bhps.Delete(ctx, "web-in", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "node-a forgets web-in", func() bool { _, ok := a.wanted(web); return !ok })
	if got := a.src.StatusWrites() - before; got != 0 {
		t.Errorf("%d status writes after the policy was deleted, want 0", got)
	}

	// A restarted agent finds its entries as it would write them, and
	// writes nothing.
	a2 := startNode(ctx, t, srv, "node-a")
	bad := types.NamespacedName{Namespace: "shop", Name: "bad"}
	waitFor(t, "the restarted node-a judges bad", func() bool { _, ok := a2.wanted(bad); return ok })
	if a2.src.status.pending(bad) || a2.src.StatusWrites() != 0 {
		t.Errorf("the restarted agent rewrites an unchanged entry: %d writes", a2.src.StatusWrites())
	}
}

// TestPolicyStatusRBACAgainstAPIServer runs the store as the agent's
// service account, bound to the ClusterRole of manifests/install.yaml, in
// an apiserver that authorizes by RBAC: it reads everything it needs and
// writes its status entry, and the same account cannot change a policy.
func TestPolicyStatusRBACAgainstAPIServer(t *testing.T) {
	srv := kubeapi.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv.InstallCRD(ctx, crdPath)
	admin := dynamic.NewForConfigOrDie(srv.Config())

	raw, err := os.ReadFile("../../manifests/install.yaml")
	if err != nil {
		t.Fatal(err)
	}
	gvrs := map[string]schema.GroupVersionResource{
		"ServiceAccount":     {Version: "v1", Resource: "serviceaccounts"},
		"ClusterRole":        {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"},
		"ClusterRoleBinding": {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
	}
	var user string
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(raw), -1) {
		var u unstructured.Unstructured
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		gvr, ok := gvrs[u.GetKind()]
		if !ok {
			continue
		}
		ri := dynamic.ResourceInterface(admin.Resource(gvr))
		if u.GetNamespace() != "" {
			ri = admin.Resource(gvr).Namespace(u.GetNamespace())
		}
		if _, err := ri.Create(ctx, &u, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s %s: %v", u.GetKind(), u.GetName(), err)
		}
		if u.GetKind() == "ServiceAccount" {
			user = "system:serviceaccount:" + u.GetNamespace() + ":" + u.GetName()
		}
	}
	if user == "" {
		t.Fatal("no ServiceAccount in install.yaml")
	}
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Resource(BulkheadPolicies).Namespace("shop").Create(ctx, bhp("web-in", map[string]any{
		"selector": map[string]any{"podSelector": map[string]any{}}}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	agentCfg := srv.Config()
	agentCfg.Impersonate = rest.ImpersonationConfig{UserName: user}
	src, err := NewForConfig(agentCfg, Config{NodeName: "node-a", Debounce: 20 * time.Millisecond, ProbeInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	runCtx, stop := context.WithCancel(ctx)
	defer func() { stop(); wg.Wait() }()
	var rev atomic.Uint64
	wg.Go(func() {
		if err := src.Run(runCtx, func(r *store.Result) { src.ReportApplied(r, store.Applied{Revision: rev.Add(1)}) }, func([]api.StoreError) {}); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	waitFor(t, "node-a's entry, written as the agent's service account", func() bool {
		s, c := nodeStatus(ctx, t, admin, "web-in", "node-a")
		return s != nil && c != nil && c.Status == metav1.ConditionTrue
	})

	// Status only: the same account cannot touch the spec.
	as := dynamic.NewForConfigOrDie(agentCfg).Resource(BulkheadPolicies).Namespace("shop")
	_, err = as.Patch(ctx, "web-in", types.MergePatchType, []byte(`{"spec":{"mode":"Audit"}}`), metav1.PatchOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("a spec patch as %s: %v, want forbidden", user, err)
	}
}
