package k8s

import (
	"context"
	"sync"
	"time"

	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
)

// RuntimePolicies is the resource of the BulkheadRuntimePolicy CRD.
var RuntimePolicies = schema.GroupVersionResource{Group: "bulkhead.io", Version: "v1alpha1", Resource: "bulkheadruntimepolicies"}

// crdCheckEvery is how often a kind whose CRD is not installed is asked
// for again (Config.CRDCheckInterval's default).
const crdCheckEvery = 30 * time.Second

type listFunc func(context.Context, metav1.ListOptions) (runtime.Object, error)

// optionalKind lists and watches a kind whose CRD may not be installed:
// BulkheadRuntimePolicy's, which the chart added after its first release
// (and `helm upgrade` never installs a chart's new CRDs). Without the CRD
// the cluster cannot hold such objects, so the kind is empty: the store
// hands over its states (runtime policies are not the ones that hold back
// network enforcement), says so in the log, and asks again every check
// interval. Once the CRD is served the informer lists the kind as any
// other, and the objects are in the next state.
//
// BulkheadPolicy is not optional: network policy missing from the state
// would open traffic that policy closes, so no state is handed over until
// it can be read.
type optionalKind struct {
	gvr   schema.GroupVersionResource
	kind  string
	every time.Duration
	list  listFunc
	watch watchFunc
	// report is told when the CRD goes missing (true) and comes back.
	report func(missing bool)

	mu      sync.Mutex
	missing bool
}

func (o *optionalKind) setMissing(m bool) {
	o.mu.Lock()
	changed := o.missing != m
	o.missing = m
	o.mu.Unlock()
	if changed {
		o.report(m)
	}
}

// List is the kind's list, and an empty one when its resource is not
// served. Its resourceVersion "0" makes the watch that follows start with
// every object that exists by the time the CRD is installed.
func (o *optionalKind) List(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	l, err := o.list(ctx, opts)
	if !apierrors.IsNotFound(err) {
		if err == nil {
			o.setMissing(false)
		}
		return l, err
	}
	o.setMissing(true)
	empty := &unstructured.UnstructuredList{}
	empty.SetAPIVersion(o.gvr.GroupVersion().String())
	empty.SetKind(o.kind + "List")
	empty.SetResourceVersion("0")
	return empty, nil
}

// Watch is the kind's watch; when the resource is not served, a watch with
// no events that ends with 410 Gone (the reflector lists again) once the
// resource is served. A watch-list request gets the NotFound itself: the
// reflector then falls back to List.
func (o *optionalKind) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	w, err := o.watch(ctx, opts)
	if !apierrors.IsNotFound(err) || opts.SendInitialEvents != nil && *opts.SendInitialEvents {
		return w, err
	}
	o.setMissing(true)
	q := &untilServed{out: make(chan watch.Event), stop: make(chan struct{})}
	go q.run(ctx, o)
	return q, nil
}

// untilServed is the watch of a kind that is not served yet.
type untilServed struct {
	out      chan watch.Event
	stop     chan struct{}
	stopOnce sync.Once
}

func (w *untilServed) ResultChan() <-chan watch.Event { return w.out }
func (w *untilServed) Stop()                          { w.stopOnce.Do(func() { close(w.stop) }) }

func (w *untilServed) run(ctx context.Context, o *optionalKind) {
	defer close(w.out)
	t := time.NewTicker(o.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.stop:
			return
		case <-t.C:
		}
		if _, err := o.list(ctx, metav1.ListOptions{Limit: 1}); apierrors.IsNotFound(err) || err != nil && ctx.Err() != nil {
			continue
		} else if err != nil {
			// Unreachable or refused: the reflector's error to handle.
			st := metav1.Status{Status: metav1.StatusFailure, Reason: metav1.StatusReasonInternalError, Message: err.Error()}
			if se, ok := err.(apierrors.APIStatus); ok {
				st = se.Status()
			}
			w.send(watch.Event{Type: watch.Error, Object: &st})
			return
		}
		w.send(watch.Event{Type: watch.Error, Object: &apierrors.NewResourceExpired(o.kind + " is served now: list it").ErrStatus})
		return
	}
}

func (w *untilServed) send(ev watch.Event) {
	select {
	case w.out <- ev:
	case <-w.stop:
	}
}

// runtimePolicyKind is the optionalKind of BulkheadRuntimePolicy.
func (s *Source) runtimePolicyKind() *optionalKind {
	res := s.cfg.Dynamic.Resource(RuntimePolicies)
	return &optionalKind{
		gvr: RuntimePolicies, kind: v1alpha1.RuntimePolicyKind, every: s.cfg.CRDCheckInterval,
		list:  func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return res.List(ctx, o) },
		watch: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) { return res.Watch(ctx, o) },
		report: func(missing bool) {
			if missing {
				s.cfg.Logger.Warn("the BulkheadRuntimePolicy CRD is not installed: there are no runtime policies, "+
					"and every pod gets the default rule set (Alert). Apply the chart's CRDs (helm upgrade does not)",
					"recheck", s.cfg.CRDCheckInterval)
			} else {
				s.cfg.Logger.Info("the BulkheadRuntimePolicy CRD is installed; runtime policies are read")
			}
		},
	}
}
