package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// maxMessage bounds a condition's message (the API allows 32768 bytes):
// the status is read by people, and every agent's entry is in the object.
const maxMessage = 2048

// verdict is this node's entry of one BulkheadPolicy's status, as the
// writer wants it.
type verdict struct {
	uid                types.UID
	observed, enforced int64
	// keepEnforced asks set to keep the enforced generation it had (a
	// rejected update whose previous version stays in force).
	keepEnforced    bool
	accepted        bool
	reason, message string
	revision        int64
}

// sameJudgement says whether two verdicts differ only in their revision:
// the revision is the one that first enforced a judgement, and a later
// compile (a pod starting) does not change it.
func (v verdict) sameJudgement(o verdict) bool {
	v.revision, o.revision = 0, 0
	return v == o
}

// written is an entry as the apiserver has it.
type written struct {
	verdict
	since metav1.Time // the Accepted condition's lastTransitionTime
}

// waiter is a token bucket (rate.Limiter); tests put a gate in its place.
type waiter interface{ Wait(context.Context) error }

// statusWriter writes this node's entry of each BulkheadPolicy's status:
// one goroutine, one work queue keyed by policy (so a burst of changes to
// one policy is one write of the last), a token bucket before every write,
// and a write only when the entry differs from what the apiserver has. It
// writes by server-side apply on the status subresource with the field
// manager bulkhead-agent/<node>: status.nodes is a map keyed by nodeName,
// so each agent owns its own entry and never touches another's.
type statusWriter struct {
	res     dynamic.NamespaceableResourceInterface
	node    string
	manager string
	limit   waiter
	log     *slog.Logger
	queue   workqueue.TypedRateLimitingInterface[types.NamespacedName]
	writes  atomic.Int64

	mu sync.Mutex
	// cache is the BulkheadPolicy informer's store (status trimmed to this
	// node's entry): what the apiserver had when the agent started.
	cache   cache.Store
	desired map[types.NamespacedName]verdict
	written map[types.NamespacedName]written
}

func newStatusWriter(res dynamic.NamespaceableResourceInterface, node string, limit waiter, log *slog.Logger) *statusWriter {
	return &statusWriter{
		res: res, node: node, manager: "bulkhead-agent/" + node, limit: limit, log: log,
		// Failed writes come back with backoff (per policy, 500 ms to 5
		// min); changes are added without delay and wait for the bucket.
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[types.NamespacedName](500*time.Millisecond, 5*time.Minute),
			workqueue.TypedRateLimitingQueueConfig[types.NamespacedName]{}),
		desired: map[types.NamespacedName]verdict{},
		written: map[types.NamespacedName]written{},
	}
}

func (w *statusWriter) setCache(s cache.Store) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.cache = s
}

// set replaces the wanted entries: one per BulkheadPolicy of the state the
// agent enforces at revision. A policy missing from want was deleted:
// there is nothing to write.
func (w *statusWriter) set(want map[types.NamespacedName]verdict, revision uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for key, v := range want {
		base, ok := w.desired[key]
		if !ok || base.uid != v.uid {
			base, ok = w.seedLocked(key, v.uid)
		}
		if v.keepEnforced {
			v.enforced = 0
			if ok {
				v.enforced = base.enforced
			}
			v.keepEnforced = false
		}
		v.revision = int64(revision)
		if ok && base.sameJudgement(v) {
			v.revision = base.revision
		}
		if prev, had := w.desired[key]; !had || prev != v {
			w.desired[key] = v
			w.queue.Add(key)
		}
	}
	for key := range w.desired {
		if _, ok := want[key]; !ok {
			delete(w.desired, key)
			delete(w.written, key)
		}
	}
}

// seedLocked is what the apiserver has of this node's entry for the
// policy with this uid: what this writer wrote, or else the informer's
// copy (an agent that restarts rewrites nothing that is still true).
func (w *statusWriter) seedLocked(key types.NamespacedName, uid types.UID) (verdict, bool) {
	if wr, ok := w.written[key]; ok && wr.uid == uid {
		return wr.verdict, true
	}
	if w.cache == nil {
		return verdict{}, false
	}
	obj, ok, _ := w.cache.GetByKey(key.String())
	u, _ := obj.(*unstructured.Unstructured)
	if !ok || u == nil || u.GetUID() != uid {
		return verdict{}, false
	}
	wr, ok := w.entryOf(u)
	if !ok {
		return verdict{}, false
	}
	w.written[key] = wr
	return wr.verdict, true
}

// entryOf reads this node's entry from a BulkheadPolicy.
func (w *statusWriter) entryOf(u *unstructured.Unstructured) (written, bool) {
	raw, ok, _ := unstructured.NestedMap(u.Object, "status")
	if !ok {
		return written{}, false
	}
	var st v1alpha1.BulkheadPolicyStatus
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &st); err != nil {
		return written{}, false
	}
	for _, n := range st.Nodes {
		if n.NodeName != w.node {
			continue
		}
		wr := written{verdict: verdict{uid: u.GetUID(), observed: n.ObservedGeneration, enforced: n.EnforcedGeneration, revision: n.Revision}}
		for _, c := range n.Conditions {
			if c.Type == v1alpha1.ConditionAccepted {
				wr.accepted = c.Status == metav1.ConditionTrue
				wr.reason, wr.message, wr.since = c.Reason, c.Message, c.LastTransitionTime
			}
		}
		return wr, true
	}
	return written{}, false
}

// run writes until ctx is done.
func (w *statusWriter) run(ctx context.Context) {
	go func() { <-ctx.Done(); w.queue.ShutDown() }()
	for {
		key, shutdown := w.queue.Get()
		if shutdown {
			return
		}
		if err := w.sync(ctx, key); err != nil && ctx.Err() == nil {
			w.log.Warn("write BulkheadPolicy status; retrying", "policy", key, "error", err)
			w.queue.AddRateLimited(key)
		} else {
			w.queue.Forget(key)
		}
		w.queue.Done(key)
	}
}

// pending says whether an entry waits to be written (for tests and
// status).
func (w *statusWriter) pending(key types.NamespacedName) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	d, ok := w.desired[key]
	wr, had := w.written[key]
	return ok && (!had || wr.verdict != d)
}

// sync writes the policy's entry if the apiserver's differs.
func (w *statusWriter) sync(ctx context.Context, key types.NamespacedName) error {
	if !w.pending(key) {
		return nil
	}
	if err := w.limit.Wait(ctx); err != nil {
		return err
	}
	// What was wanted may have changed during the wait: write the latest.
	w.mu.Lock()
	d, ok := w.desired[key]
	wr, had := w.written[key]
	var cachedUID types.UID
	if w.cache != nil {
		if obj, ok, _ := w.cache.GetByKey(key.String()); ok {
			if u, _ := obj.(*unstructured.Unstructured); u != nil {
				cachedUID = u.GetUID()
			}
		}
	}
	w.mu.Unlock()
	if !ok || (had && wr.verdict == d) {
		return nil
	}
	if cachedUID != "" && cachedUID != d.uid {
		// Deleted and created again: the next state judges the new one.
		return nil
	}
	since := metav1.Now()
	if had && wr.uid == d.uid && wr.accepted == d.accepted && !wr.since.IsZero() {
		since = wr.since
	}
	body, err := json.Marshal(w.applyConfig(key, d, since))
	if err != nil {
		return err
	}
	w.writes.Add(1)
	force := true
	_, err = w.res.Namespace(key.Namespace).Patch(ctx, key.Name, types.ApplyPatchType, body,
		metav1.PatchOptions{FieldManager: w.manager, Force: &force}, "status")
	if apierrors.IsNotFound(err) {
		return nil // deleted: nothing to write
	}
	if err != nil {
		// Read afresh what the apiserver has before the retry: the
		// policy may be gone or replaced, or hold the entry already.
		cur, gerr := w.res.Namespace(key.Namespace).Get(ctx, key.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(gerr) || (gerr == nil && cur.GetUID() != d.uid) {
			return nil
		}
		if gerr == nil {
			w.mu.Lock()
			if e, ok := w.entryOf(cur); ok {
				w.written[key] = e
			} else {
				delete(w.written, key)
			}
			w.mu.Unlock()
		}
		return fmt.Errorf("apply status of BulkheadPolicy %s: %w", key, err)
	}
	w.mu.Lock()
	w.written[key] = written{verdict: d, since: since}
	w.mu.Unlock()
	return nil
}

// statusApply is the server-side apply configuration of one node's entry:
// only the fields this agent owns.
type statusApply struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Status v1alpha1.BulkheadPolicyStatus `json:"status"`
}

func (w *statusWriter) applyConfig(key types.NamespacedName, d verdict, since metav1.Time) statusApply {
	c := metav1.Condition{Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionTrue, ObservedGeneration: d.observed,
		LastTransitionTime: since, Reason: v1alpha1.ReasonAccepted, Message: d.message}
	if !d.accepted {
		c.Status, c.Reason = metav1.ConditionFalse, d.reason
	}
	if len(c.Message) > maxMessage {
		c.Message = c.Message[:maxMessage-3] + "..."
	}
	a := statusApply{APIVersion: v1alpha1.APIVersion, Kind: v1alpha1.Kind}
	a.Metadata.Name, a.Metadata.Namespace = key.Name, key.Namespace
	a.Status.Nodes = []v1alpha1.NodeStatus{{NodeName: w.node, ObservedGeneration: d.observed,
		EnforcedGeneration: d.enforced, Revision: d.revision, Conditions: []metav1.Condition{c}}}
	return a
}

// trimPolicyStatus keeps, of a BulkheadPolicy's status, only this node's
// entry: the writer's starting point after a restart. Every other node's
// entry would cost memory on every node, for nothing.
func trimPolicyStatus(node string) cache.TransformFunc {
	return func(obj any) (any, error) {
		obj, _ = trimMeta(obj)
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return obj, nil
		}
		nodes, found, _ := unstructured.NestedSlice(u.Object, "status", "nodes")
		if !found {
			return u, nil
		}
		var mine []any
		for _, n := range nodes {
			if m, ok := n.(map[string]any); ok && m["nodeName"] == node && node != "" {
				mine = append(mine, n)
			}
		}
		if len(mine) == 0 {
			unstructured.RemoveNestedField(u.Object, "status")
		} else if err := unstructured.SetNestedSlice(u.Object, mine, "status", "nodes"); err != nil {
			return nil, err
		}
		return u, nil
	}
}

// statusOnly says whether a BulkheadPolicy update changed only its status
// (another node's entry, or this one's): no new state follows from it.
func statusOnly(oldObj, newObj any) bool {
	o, ok1 := oldObj.(*unstructured.Unstructured)
	n, ok2 := newObj.(*unstructured.Unstructured)
	if !ok1 || !ok2 {
		return false
	}
	strip := func(u *unstructured.Unstructured) map[string]any {
		c := u.DeepCopy()
		unstructured.RemoveNestedField(c.Object, "status")
		unstructured.RemoveNestedField(c.Object, "metadata", "resourceVersion")
		return c.Object
	}
	return reflect.DeepEqual(strip(o), strip(n))
}
