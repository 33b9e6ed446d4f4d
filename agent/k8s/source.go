package k8s

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

const spiffeIDAnnotation = store.SPIFFEIDAnnotation

// BulkheadPolicies is the resource of the BulkheadPolicy CRD.
var BulkheadPolicies = schema.GroupVersionResource{Group: "bulkhead.io", Version: "v1alpha1", Resource: "bulkheadpolicies"}

// Config configures a Source.
type Config struct {
	Client  kubernetes.Interface
	Dynamic dynamic.Interface
	// NodeName is this node's name: spec.nodeName of its local pods.
	NodeName string
	// Debounce is how long the caches must be quiet before a new state is
	// built; a steady stream of events still yields a state every
	// MaxDelay.
	Debounce time.Duration
	MaxDelay time.Duration
	// ProbeInterval is how often the apiserver is asked for its version
	// while it is reachable (four times as often while it is not).
	ProbeInterval time.Duration
	// Probe asks for the version (default Client's discovery). It must not
	// wait for the apiserver: it is what says the apiserver is away.
	Probe discovery.ServerVersionInterfaceWithContext
	// ReconnectInterval is how often a read that cannot reach the
	// apiserver tries again (NewForConfig; default 250 ms; negative: not
	// at all, client-go's backoff alone).
	ReconnectInterval time.Duration
	// StatusQPS and StatusBurst are the token bucket of this node's
	// BulkheadPolicy status writes (default 2 per second, bursts of 10).
	StatusQPS   float64
	StatusBurst int
	// CRDCheckInterval is how often a BulkheadRuntimePolicy CRD that is
	// not installed is looked for again (default 30 s).
	CRDCheckInterval time.Duration
	Logger           *slog.Logger
}

// Source is the Kubernetes store. It implements the agent's Source.
type Source struct {
	cfg Config

	mu        sync.Mutex
	connected bool
	since     time.Time

	// status writes this node's entry of each BulkheadPolicy's status
	// (nil without a node name).
	status *statusWriter
	// handed are the states handed over and not yet reported, oldest
	// first, with what the status needs to know of their policies.
	hmu    sync.Mutex
	handed []handedState
	// reported and reportedRejected are what the last report said.
	reported         *store.Result
	reportedRejected map[store.PolicyRef]store.Rejection
}

// handedState is a state handed over, and its BulkheadPolicies.
type handedState struct {
	res      *store.Result
	policies map[types.NamespacedName]policyState
}

// New returns a Source on the given clients.
func New(cfg Config) *Source {
	if cfg.Debounce <= 0 {
		cfg.Debounce = 100 * time.Millisecond
	}
	if cfg.MaxDelay < cfg.Debounce {
		// A change is enforced within a second of its event, however
		// busy the cluster: a state at least every 500 ms of events.
		cfg.MaxDelay = max(cfg.Debounce, 500*time.Millisecond)
	}
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Probe == nil && cfg.Client != nil {
		cfg.Probe = cfg.Client.Discovery()
	}
	if cfg.StatusQPS <= 0 {
		cfg.StatusQPS = 2
	}
	if cfg.StatusBurst <= 0 {
		cfg.StatusBurst = 10
	}
	if cfg.CRDCheckInterval <= 0 {
		cfg.CRDCheckInterval = crdCheckEvery
	}
	s := &Source{cfg: cfg, since: time.Now()}
	if cfg.NodeName != "" && cfg.Dynamic != nil {
		s.status = newStatusWriter(cfg.Dynamic.Resource(BulkheadPolicies), cfg.NodeName,
			rate.NewLimiter(rate.Limit(cfg.StatusQPS), cfg.StatusBurst), cfg.Logger.With("component", "policy-status"))
	}
	return s
}

// RESTConfig is the client configuration of kubeconfig, or the in-cluster
// one (the pod's service account) when kubeconfig is empty.
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (set --kubeconfig outside a pod): %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	return c, nil
}

// NewForConfig returns a Source that talks to the apiserver of rc.
func NewForConfig(rc *rest.Config, cfg Config) (*Source, error) {
	rc = rest.CopyConfig(rc)
	rc.UserAgent = "bulkhead-agent"
	probe, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes discovery client: %w", err)
	}
	cfg.Probe = probe
	if cfg.ReconnectInterval == 0 {
		cfg.ReconnectInterval = 250 * time.Millisecond
	}
	var s *Source
	if cfg.ReconnectInterval > 0 {
		rc.Wrap(func(rt http.RoundTripper) http.RoundTripper {
			return &waitTransport{next: rt, interval: cfg.ReconnectInterval, waiting: func(err error) {
				if s != nil {
					s.setConnected(false, err)
				}
			}}
		})
	}
	if cfg.Client, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	if cfg.Dynamic, err = dynamic.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	s = New(cfg)
	return s, nil
}

func (s *Source) String() string { return "kubernetes" }

// Connected says whether the apiserver answered the last probe and every
// watch since, and since when that has been so.
func (s *Source) Connected() (bool, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.connected, s.since
}

func (s *Source) setConnected(ok bool, why error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.connected == ok {
		return
	}
	s.connected, s.since = ok, time.Now()
	if ok {
		s.cfg.Logger.Info("apiserver reachable; caches resync")
	} else {
		s.cfg.Logger.Warn("apiserver unreachable; the last state stays enforced", "error", why)
	}
}

// caches are the informers' stores.
type caches struct {
	namespaces, pods, netpols, bhps, runtimePolicies cache.Store
}

// Run starts the informers, hands over the first state once all of them
// have synced, and then a new state after each burst of changes, until ctx
// is done. States are built from the caches alone: while the apiserver is
// away they do not change, so the last state stays enforced, and when it
// returns the informers relist and the difference is handed over.
func (s *Source) Run(ctx context.Context, update func(*store.Result), fail func([]api.StoreError)) error {
	if s.cfg.Client == nil || s.cfg.Dynamic == nil {
		return errors.New("kubernetes store: no client")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	log := s.cfg.Logger

	changed := make(chan struct{}, 1)
	poke := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke() },
		UpdateFunc: func(any, any) { poke() },
		DeleteFunc: func(any) { poke() },
	}
	onWatchErr := func(name string, err error) {
		switch {
		case ctx.Err() != nil:
		case apierrors.IsResourceExpired(err) || apierrors.IsGone(err):
			// The apiserver answering: the reflector lists again, and
			// nothing is lost.
		case apierrors.IsNotFound(err) || apierrors.IsForbidden(err):
			// Reachable, but this resource is not served to us: no
			// state is handed over until it is.
			log.Warn("cannot list or watch; no state until it can (is the CRD installed, and the RBAC applied?)", "resource", name, "error", err)
		default:
			s.setConnected(false, err)
		}
	}

	type inf struct {
		name      string
		informer  cache.SharedIndexInformer
		transform cache.TransformFunc
	}
	cs, bhps, rps := s.cfg.Client, s.cfg.Dynamic.Resource(BulkheadPolicies), s.runtimePolicyKind()
	infs := []inf{
		{"namespaces", s.informer(cs, &corev1.Namespace{},
			func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return cs.CoreV1().Namespaces().List(ctx, o)
			},
			func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return cs.CoreV1().Namespaces().Watch(ctx, o)
			}),
			trimMeta},
		{"pods", s.informer(cs, &corev1.Pod{},
			func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return cs.CoreV1().Pods("").List(ctx, o)
			},
			func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return cs.CoreV1().Pods("").Watch(ctx, o)
			}),
			TrimPod},
		{"networkpolicies", s.informer(cs, &networkingv1.NetworkPolicy{},
			func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				return cs.NetworkingV1().NetworkPolicies("").List(ctx, o)
			},
			func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				return cs.NetworkingV1().NetworkPolicies("").Watch(ctx, o)
			}),
			trimMeta},
		{"bulkheadpolicies", s.informer(s.cfg.Dynamic, &unstructured.Unstructured{},
			func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return bhps.List(ctx, o) },
			func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) { return bhps.Watch(ctx, o) }),
			trimPolicyStatus(s.cfg.NodeName)},
		{"bulkheadruntimepolicies", s.informer(s.cfg.Dynamic, &unstructured.Unstructured{}, rps.List, rps.Watch), trimMeta},
	}
	var synced []cache.InformerSynced
	for _, i := range infs {
		// Both must be set before the informer starts.
		if err := i.informer.SetTransform(i.transform); err != nil {
			return fmt.Errorf("%s informer: %w", i.name, err)
		}
		name := i.name
		if err := i.informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) { onWatchErr(name, err) }); err != nil {
			return fmt.Errorf("%s informer: %w", i.name, err)
		}
		h := handler
		if i.name == "bulkheadpolicies" {
			// Status writes (every node's) change no state.
			h.UpdateFunc = func(o, n any) {
				if !statusOnly(o, n) {
					poke()
				}
			}
		}
		if _, err := i.informer.AddEventHandler(h); err != nil {
			return fmt.Errorf("%s informer: %w", i.name, err)
		}
		synced = append(synced, i.informer.HasSynced)
	}
	c := caches{infs[0].informer.GetStore(), infs[1].informer.GetStore(), infs[2].informer.GetStore(),
		infs[3].informer.GetStore(), infs[4].informer.GetStore()}

	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: the informers and the probe stop
	for _, i := range infs {
		wg.Go(func() { i.informer.RunWithContext(ctx) })
	}
	wg.Go(func() { s.probe(ctx) })
	if s.status != nil {
		s.status.setCache(c.bhps)
		wg.Go(func() { s.status.run(ctx) })
	}

	log.Info("waiting for the informers' initial sync")
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx is done
	}
	s.setConnected(true, nil)
	b := &builder{lastGood: map[string]*store.Object{}}
	var last *store.Result
	var lastPolicies map[types.NamespacedName]policyState
	hand := func() {
		res, policies := b.build(c)
		if last != nil && reflect.DeepEqual(last.Snapshot, res.Snapshot) && sameErrors(last.Rejected, res.Rejected) &&
			maps.Equal(lastPolicies, policies) {
			return
		}
		last, lastPolicies = res, policies
		s.handedOver(res, policies)
		update(res)
	}
	// Events of the initial sync are in the caches already.
	select {
	case <-changed:
	default:
	}
	hand()

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
		// Coalesce: wait until the events stop for Debounce, and no
		// longer than MaxDelay after the first.
		deadline := time.NewTimer(s.cfg.MaxDelay)
		quiet := time.NewTimer(s.cfg.Debounce)
	burst:
		for {
			select {
			case <-ctx.Done():
				deadline.Stop()
				quiet.Stop()
				return nil
			case <-changed:
				quiet.Reset(s.cfg.Debounce)
			case <-quiet.C:
				break burst
			case <-deadline.C:
				break burst
			}
		}
		deadline.Stop()
		quiet.Stop()
		hand()
	}
}

// informer is a shared informer of one kind, from its list and watch
// calls on client. Its watches resume across an apiserver restart unless
// ReconnectInterval is negative (see resuming).
func (s *Source) informer(client any, obj runtime.Object,
	list func(context.Context, metav1.ListOptions) (runtime.Object, error), w watchFunc) cache.SharedIndexInformer {
	if s.cfg.ReconnectInterval > 0 {
		w = resuming(w, s.cfg.ReconnectInterval)
	}
	lw := &cache.ListWatch{ListWithContextFunc: list, WatchFuncWithContext: cache.WatchFuncWithContext(w)}
	return cache.NewSharedIndexInformerWithOptions(cache.ToListWatcherWithWatchListSemantics(lw, client), obj,
		cache.SharedIndexInformerOptions{})
}

// probe asks the apiserver for its version now and then: a watch that
// fails says the apiserver went away, but only an answer says it is back.
func (s *Source) probe(ctx context.Context) {
	for {
		ok, _ := s.Connected()
		wait := s.cfg.ProbeInterval
		if !ok {
			wait /= 4
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		pctx, cancel := context.WithTimeout(ctx, wait)
		_, err := s.cfg.Probe.ServerVersionWithContext(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.setConnected(err == nil, err)
	}
}

// builder turns the caches into a store state.
type builder struct {
	// lastGood is each object's last version that was valid, by
	// store.Object.Ref: an update to an invalid version keeps enforcing
	// the valid one, as the dir store keeps its last good state.
	lastGood map[string]*store.Object
}

// policyState is what a state says of one BulkheadPolicy, for its status.
type policyState struct {
	uid        types.UID
	generation int64
	// enforced is the generation in the state: generation, an earlier
	// one (the last valid), or 0 (none).
	enforced int64
	// invalid says why the store rejected the policy ("": it did not).
	invalid string
}

func (b *builder) build(c caches) (*store.Result, map[types.NamespacedName]policyState) {
	var objs []*store.Object
	var rejected []error
	seen := map[string]bool{}
	// add returns the object's own error, nil when it is in the state.
	add := func(ref, where string, o *store.Object, err error) error {
		if err == nil {
			err = o.Validate()
		}
		if err == nil {
			o.File = where
			objs = append(objs, o)
			b.lastGood[ref] = o
			seen[ref] = true
			return nil
		}
		own := err
		if prev, ok := b.lastGood[ref]; ok {
			objs = append(objs, prev)
			seen[ref] = true
			err = fmt.Errorf("%w (its last valid version stays enforced)", err)
		}
		rejected = append(rejected, &store.Error{File: where, Err: err})
		return own
	}
	policies := map[types.NamespacedName]policyState{}
	for _, obj := range sorted(c.namespaces) {
		n := obj.(*corev1.Namespace)
		o, err := store.NamespaceObject(n)
		add("Namespace "+n.Name, "Namespace "+n.Name, o, err)
	}
	for _, obj := range sorted(c.pods) {
		p := obj.(*corev1.Pod)
		o, err := store.PodObject(p)
		add("Pod "+p.Namespace+"/"+p.Name, "Pod "+p.Namespace+"/"+p.Name, o, err)
	}
	for _, obj := range sorted(c.netpols) {
		np := obj.(*networkingv1.NetworkPolicy)
		where := "NetworkPolicy " + np.Namespace + "/" + np.Name
		add(where, where, store.NetworkPolicyObject(np), nil)
	}
	for _, obj := range sorted(c.bhps) {
		u := obj.(*unstructured.Unstructured)
		where := v1alpha1.Kind + " " + u.GetNamespace() + "/" + u.GetName()
		var bp v1alpha1.BulkheadPolicy
		// Strict: a field the Go type does not know would otherwise be
		// dropped silently, widening or narrowing the policy. The CRD's
		// schema prunes unknown fields, so this only fires when the CRD
		// and the agent disagree on the version.
		err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &bp, true)
		var o *store.Object
		if err == nil {
			// The agents' status writes change neither: left in, each
			// would be a new state and a compile on every node.
			bp.Status = v1alpha1.BulkheadPolicyStatus{}
			bp.ResourceVersion = ""
			o = store.BulkheadPolicyObject(&bp)
		}
		st := policyState{uid: u.GetUID(), generation: u.GetGeneration()}
		if err := add(where, where, o, err); err == nil {
			st.enforced = st.generation
		} else {
			st.invalid = err.Error()
			if prev := b.lastGood[where]; prev != nil && prev.BulkheadPolicy != nil {
				st.enforced = prev.BulkheadPolicy.Generation
			}
		}
		policies[types.NamespacedName{Namespace: u.GetNamespace(), Name: u.GetName()}] = st
	}
	for _, obj := range sorted(c.runtimePolicies) {
		u := obj.(*unstructured.Unstructured)
		where := v1alpha1.RuntimePolicyKind + " " + u.GetNamespace() + "/" + u.GetName()
		var rp v1alpha1.BulkheadRuntimePolicy
		// Strict, as for BulkheadPolicy above.
		err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &rp, true)
		var o *store.Object
		if err == nil {
			rp.ResourceVersion = ""
			o = store.RuntimePolicyObject(&rp)
		}
		add(where, where, o, err)
	}
	// Objects deleted from the cluster lose their last good version.
	for ref := range b.lastGood {
		if !seen[ref] {
			delete(b.lastGood, ref)
		}
	}
	res, err := store.Build(objs, store.Options{})
	if err != nil {
		// Every object was validated above; Build can only find what
		// the apiserver does not allow (two objects of one name).
		rejected = append(rejected, err)
	}
	res.Rejected = rejected
	return res, policies
}

// sorted lists a cache in namespace/name order, for a stable state.
// Each key is made once: made in the comparison, the keys of 10,000 pods
// were a quarter of a state's build.
func sorted(s cache.Store) []any {
	type keyed struct {
		key string
		obj any
	}
	objs := s.List()
	ks := make([]keyed, len(objs))
	for i, o := range objs {
		k, _ := cache.MetaNamespaceKeyFunc(o)
		ks[i] = keyed{k, o}
	}
	slices.SortFunc(ks, func(a, b keyed) int { return cmp.Compare(a.key, b.key) })
	for i := range ks {
		objs[i] = ks[i].obj
	}
	return objs
}

func sameErrors(a, b []error) bool {
	return slices.EqualFunc(a, b, func(x, y error) bool { return x.Error() == y.Error() })
}
