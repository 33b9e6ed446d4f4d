package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/adopt"
	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/batch"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/agent/state"
	"github.com/bulkhead-io/bulkhead/agent/storeguard"
	"github.com/bulkhead-io/bulkhead/agent/svids"
	"github.com/bulkhead-io/bulkhead/agent/tunnel"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/vishvananda/netlink"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Agent is the node daemon.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	dp       *datapath.Datapath
	records  *state.Dir[endpointRecord]
	metrics  *metrics.Metrics
	hub      *flows.Hub
	enricher *flows.Enricher
	batch    *batch.Batcher[*change]
	source   Source
	started  time.Time
	// stopping is closed when Run begins to shut down.
	stopping chan struct{}
	// features are the kernel features probed at start.
	features []api.Feature
	// guard holds back store states that remove too much at once.
	guard *storeguard.Guard
	// svids holds local pods' SVIDs (nil with --identity-source none).
	svids *svids.Manager
	// tunnel is the node's mTLS tunnel endpoint (nil without svids).
	tunnel *tunnel.Tunnel
	// pipe is the flow pipeline while Run runs, for the tunnel's records.
	pipe atomic.Pointer[flowPipe]
	// sysmon is the runtime-detection component (nil without
	// --runtime-detection).
	sysmon *runtimeDetection
	// runtimeUnenforced are the store's BulkheadRuntimePolicies while
	// runtime detection is off, for `bulkhead status`.
	runtimeUnenforced atomic.Pointer[[]api.PolicyError]
	// adopter enforces on running pods no CNI ADD registered (nil with
	// Adopt off); localPods are the store's running pods of this node.
	adopter   *adopt.Adopter
	localPods atomic.Pointer[[]adopt.Pod]
	// issuedRefused remembers, per pod, the issued ID last refused (logged
	// once); owned by the batch goroutine.
	issuedRefused map[podRef]string

	// view is what readers use: replaced after every apply, never mutated.
	view atomic.Pointer[view]

	// mu guards the endpoint table and the store status. The batch
	// goroutine holds it only to publish, never across compile or apply.
	mu        sync.Mutex
	endpoints map[api.EndpointKey]*endpointRecord
	// adoptTombs are pods whose endpoint was removed a moment ago: they
	// are not adopted again while the store catches up.
	adoptTombs map[podRef]time.Time
	storeErrs  []api.StoreError
	ready      bool
	notReady   string
	// remoteIPs are the store's addresses of pods, for explain.
	remoteIPs map[podRef][]netip.Addr
	// attachMode is how new endpoints are attached: TCX unless configured
	// otherwise or the kernel lacks it.
	attachMode datapath.AttachMode

	// Owned by the batch goroutine (and by New before it starts).
	compiler    *policy.Compiler
	storePods   map[podRef]policy.Pod
	storeNS     map[string]policy.Namespace
	storePol    map[string]any // "Kind ns/name" → *NetworkPolicy | *BulkheadPolicy
	appliedPods map[podRef]policy.Pod
	// podRetry are pods whose last compile failed: every store state
	// tries them again.
	podRetry  map[podRef]bool
	haveStore bool
	// reattach holds restored endpoints whose programs are re-attached
	// (idempotently) after the first apply.
	reattach []*endpointRecord
	// applyPolicy is dp.Apply (tests put failures in front of it), and
	// applyRetry retries it when it fails.
	applyPolicy func(*policy.MapState) (datapath.ApplyStats, error)
	applyRetry  *applyRetry
	// numbers keeps identity numbers across restarts; fc and ipOwners
	// keep enforcement when records or addresses fall short.
	numbers  *numbering
	fc       failClosed
	ipOwners *ipOwners
	// budget reports the policies over their policy-trie budget.
	budget budgetReport
	// report is the store state to report to the source once enforced.
	report storeReport
	// nodeAddrs are this node's addresses as applyBatch last read them:
	// the tunnel endpoint accepts peers from them and from the store's
	// status.hostIPs.
	nodeAddrs []netip.Addr

	// flowCtx is the flow records' context last published (batch
	// goroutine); the next one keeps its unchanged identity views.
	flowCtx *flows.Context

	// quar numbers quarantines and names them in flow records.
	quar quarantines

	// attach is dp.Attach for ADDs (tests fail it, as late as an ADD can
	// fail).
	attach func(datapath.Endpoint) (datapath.AttachMode, error)
}

// view is an immutable snapshot of the agent's state for readers.
type view struct {
	ms         *policy.MapState
	identities map[uint32]policy.IdentityInfo
	endpoints  map[policy.EndpointID]*endpointRecord
	pods       map[policy.EndpointID]podRef
	// mtls is what the tunnel endpoint reads (nil before the first apply).
	mtls *mtlsView
}

// change is one item of the batcher: an endpoint to add or delete, or a
// new store state.
type change struct {
	add   *endpointRecord
	del   *api.EndpointKey
	store *store.Result
	// resync recompiles these pods: their issued SPIFFE ID changed.
	resync []podRef
	// refresh asks for nothing but a recompile: the node's addresses
	// changed (applyBatch reads them on every batch).
	refresh bool
	// removed is, for del, the endpoint that was removed (nil: unknown).
	removed *endpointRecord
	// delIf, for del, removes only an endpoint it holds for; restore puts
	// an earlier registration back in its place (an ADD's rollback).
	delIf   func(*endpointRecord) bool
	restore *endpointRecord
	// batchStart and batchSize say when the batch holding the change
	// began and how many changes it held, for the ADD's timing log.
	batchStart time.Time
	batchSize  int
}

// New opens (or loads) the datapath, restores persisted endpoints, and
// loads the store. Enforcement that survived in pinned maps stays in place
// throughout: nothing is detached or emptied on the way.
func New(cfg Config) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger, started: time.Now(),
		endpoints:     map[api.EndpointKey]*endpointRecord{},
		storePods:     map[podRef]policy.Pod{},
		storeNS:       map[string]policy.Namespace{},
		storePol:      map[string]any{},
		appliedPods:   map[podRef]policy.Pod{},
		issuedRefused: map[podRef]string{},
		hub:           flows.NewHub(cfg.FlowRing, cfg.NodeName),
		enricher:      flows.NewEnricher(cfg.NodeName),
		notReady:      "starting",
		stopping:      make(chan struct{}),
	}
	a.ipOwners = newIPOwners(a.reportIPConflict)
	a.view.Store(&view{ms: &policy.MapState{}, identities: map[uint32]policy.IdentityInfo{},
		endpoints: map[policy.EndpointID]*endpointRecord{}, pods: map[policy.EndpointID]podRef{}})

	src, err := NewSource(cfg)
	if err != nil {
		return nil, err
	}
	a.source = src
	// A fresh node may have no bpffs: without it every pin fails.
	if err := datapath.EnsureBPFFS(cfg.BPFFS); err != nil {
		return nil, fmt.Errorf("bpffs: %w", err)
	}
	dpcfg := cfg.Datapath
	dpcfg.BPFFS = cfg.BPFFS
	dpcfg.TunnelMark, dpcfg.TunnelMask = cfg.TunnelMark, TunnelMarkMask
	dpcfg.Logger = cfg.Logger.With("component", "datapath")
	dp, err := datapath.New(dpcfg)
	if err != nil {
		return nil, fmt.Errorf("datapath: %w", err)
	}
	a.dp = dp
	a.compiler = policy.NewCompiler(policy.Config{Logger: cfg.Logger.With("component", "compiler"), Budget: a.trieBudget()})
	a.attachMode = datapath.ModeTCX
	if cfg.Datapath.ForceClsact {
		a.attachMode = datapath.ModeClsact
	}
	for _, f := range datapath.Features() {
		state := "yes"
		if f.Err != nil {
			state = "no (" + f.Err.Error() + ")"
			if f.Name == "tcx" {
				a.attachMode = datapath.ModeClsact
			}
		}
		a.features = append(a.features, api.Feature{Name: f.Name, State: state})
	}
	a.metrics = metrics.New(func() []metrics.MapStat {
		var out []metrics.MapStat
		for _, s := range dp.MapStats() {
			out = append(out, metrics.MapStat{Name: s.Name, Entries: s.Entries, MaxEntries: s.MaxEntries})
		}
		return out
	})
	if c, ok := src.(connectedSource); ok {
		a.metrics.StoreConnectedFunc(func() bool { up, _ := c.Connected(); return up })
	}
	if a.guard, err = newStoreGuard(cfg, a.metrics, dp.Restricts(), a.storeUpdated); err != nil {
		dp.Close()
		return nil, err
	}
	if w := a.guard.Warning(); w != "" {
		a.fc.warnings = append(a.fc.warnings, w)
	}
	if a.svids, err = openSVIDs(cfg, a.metrics); err != nil {
		dp.Close()
		return nil, err
	}
	if a.tunnel, err = a.openTunnel(); err != nil {
		a.closeOnFail()
		return nil, err
	}
	if a.tunnel != nil {
		a.metrics.RegisterTunnel(a.tunnelStat)
	}
	a.records, err = state.Open[endpointRecord](filepath.Join(cfg.StateDir, "endpoints"))
	if err != nil {
		a.closeOnFail()
		return nil, err
	}
	var warn string
	if a.numbers, warn, err = openNumbering(cfg.StateDir, cfg.IdentityGrace, a.compiler); err != nil {
		a.closeOnFail()
		return nil, err
	} else if warn != "" {
		a.log.Error(warn)
		a.fc.warnings = append(a.fc.warnings, warn)
	}
	if err := a.restoreEndpoints(); err != nil {
		a.closeOnFail()
		return nil, err
	}
	a.restoreQuarantines()
	if err := dp.SetQuarantineDNS(cfg.QuarantineDNS); err != nil {
		a.closeOnFail()
		return nil, fmt.Errorf("--quarantine-dns: %w", err)
	}
	a.applyPolicy = dp.Apply
	a.attach = dp.Attach
	a.applyRetry = newApplyRetry(a.log, a.metrics.PolicyApplyFailures, a.metrics.PolicyApplyLagging)
	if err := a.findOrphans(); err != nil {
		a.closeOnFail()
		return nil, err
	}
	a.batch = batch.New(a.applyBatch)
	if cfg.RuntimeDetection {
		if a.sysmon, err = openRuntimeDetection(a); err != nil {
			a.closeOnFail()
			return nil, err
		}
	}
	if cfg.Adopt {
		a.adopter = adopt.New(adopt.Config{
			Finder: adopt.Finder{NetnsDirs: cfg.NetnsDirs, CNICacheDir: cfg.CNICacheDir},
			Host:   adoptHost{a}, Logger: a.log.With("component", "adopt"),
		})
		a.metrics.AdoptionFuncs(func() int { n, _ := a.adopter.Stats(); return n },
			func() int { return len(a.adopter.Problems()) })
	}
	return a, nil
}

// closeOnFail releases what New opened when it fails part-way.
func (a *Agent) closeOnFail() {
	if a.sysmon != nil {
		_ = a.sysmon.mon.Close()
	}
	if a.svids != nil {
		_ = a.svids.Close()
	}
	a.dp.Close()
}

// restoreEndpoints reads the persisted records. Endpoints whose host veth
// is gone are forgotten (their pins removed); the rest are re-attached
// once the first policy is compiled.
func (a *Agent) restoreEndpoints() error {
	good, bad, err := a.records.LoadAll()
	if err != nil {
		return err
	}
	a.quarantineRecords(bad)
	for k, rec := range good {
		if !vethPresent(rec) {
			a.log.Info("endpoint gone while the agent was down", "container", rec.Key.ContainerID, "veth", rec.HostVeth)
			if err := a.dp.Forget(rec.dpEndpoint()); err != nil {
				a.log.Warn("forget gone endpoint", "container", rec.Key.ContainerID, "error", err)
			}
			_ = a.records.Delete(k)
			continue
		}
		r := rec
		// Records from before the MAC was kept: without it the re-attach
		// would fail, and the programs already attached keep enforcing
		// the old way (no source validation) until it succeeds. Records
		// from before the link-local addresses were kept: without them
		// the pod's neighbour discovery may claim any link-local address.
		if filled, err := r.ensureLink(); err != nil {
			a.log.Warn("read MAC and link-local addresses of restored endpoint", "container", rec.Key.ContainerID, "error", err)
		} else if filled {
			if err := a.records.Put(k, r); err != nil {
				a.log.Warn("persist MAC and link-local addresses of restored endpoint", "container", rec.Key.ContainerID, "error", err)
			}
		}
		a.endpoints[rec.Key] = &r
		a.reattach = append(a.reattach, &r)
	}
	a.log.Info("endpoints restored", "endpoints", len(a.endpoints), "dropped", len(good)+len(bad)-len(a.endpoints))
	return nil
}

// Run serves the API and metrics, watches the store and the flow events,
// until ctx is done. On return enforcement stays in place: programs and
// maps are pinned, and nothing is detached.
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	ln, err := api.Listen(a.cfg.Socket)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", a.cfg.Socket, err)
	}
	srv := &http.Server{Handler: api.NewHandler(a, a.log.With("component", "api")), ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	errc := make(chan error, 5)
	wg.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api server: %w", err)
		}
	})
	if a.cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", a.cfg.MetricsAddr)
		if err != nil {
			srv.Close()
			return fmt.Errorf("metrics listen on %s: %w", a.cfg.MetricsAddr, err)
		}
		msrv := &http.Server{Handler: a.metricsHandler(), ReadHeaderTimeout: 10 * time.Second}
		wg.Go(func() { _ = msrv.Serve(mln) })
		// Closed when ctx ends, before wg.Wait below waits for Serve.
		wg.Go(func() { <-ctx.Done(); _ = msrv.Close() })
	}
	pipe, err := a.startFlows(ctx, &wg)
	if err != nil {
		srv.Close()
		return err
	}
	a.pipe.Store(pipe)
	if err := a.openAlertLog(); err != nil {
		a.pipe.Store(nil)
		pipe.close()
		srv.Close()
		return err
	}
	wg.Go(func() {
		defer a.guard.Stop()
		err := a.source.Run(ctx, func(r *store.Result) { a.guard.Offer(ctx, r) },
			func(serrs []api.StoreError) { a.guard.Fail(); a.storeFailed(serrs) })
		if err != nil {
			errc <- fmt.Errorf("store: %w", err)
		}
	})
	wg.Go(func() { a.watchHostAddrs(ctx) })
	wg.Go(func() {
		a.applyRetry.run(ctx, func(ctx context.Context) error { return a.batch.Submit(ctx, &change{refresh: true}) })
	})
	wg.Go(func() { a.reconcileVeths(ctx, a.cfg.ReconcileInterval) })
	if a.adopter != nil {
		wg.Go(func() { a.adopter.Run(ctx) })
	}
	if a.svids != nil {
		wg.Go(func() { a.runSVIDs(ctx) })
	}
	// The runtime service writes its last aggregated alerts as it stops,
	// to the flow log (or the alert log): it is waited for before either
	// closes.
	var runtimeDone sync.WaitGroup
	if a.sysmon != nil {
		runtimeDone.Go(func() {
			if err := a.sysmon.svc.Run(ctx); err != nil {
				errc <- fmt.Errorf("runtime detection: %w", err)
			}
		})
	}
	if a.tunnel != nil {
		// Entries left by an agent that was killed name sockets that are
		// gone; left there, they would fill the map.
		if err := a.dp.ClearTunnelSockets(); err != nil {
			a.log.Warn("clear the tunnel's delivery sockets", "error", err)
		}
		wg.Go(func() {
			if err := a.tunnel.Run(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("mtls tunnel: %w", err)
			}
		})
	}
	a.log.Info("agent running", "socket", a.cfg.Socket, "store", a.cfg.Store, "bpffs", a.cfg.BPFFS, "node", a.cfg.NodeName)

	select {
	case <-ctx.Done():
	case err = <-errc:
		a.log.Error("agent stopping", "error", err)
	}
	// Stop serving first: a CNI call that arrives now gets "unavailable"
	// and retries against the next agent, rather than a half answer. Flow
	// streams never go idle by themselves, so they are ended first.
	close(a.stopping)
	shutdownCtx, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	_ = srv.Shutdown(shutdownCtx)
	ln.Close()
	cancel()
	a.batch.Close()
	runtimeDone.Wait()
	a.pipe.Store(nil)
	pipe.close()
	wg.Wait()
	a.closeAlertLog()
	if a.svids != nil {
		_ = a.svids.Close()
	}
	if a.sysmon != nil {
		_ = a.sysmon.mon.Close()
	}
	a.dp.Close()
	a.log.Info("agent stopped; enforcement stays pinned")
	return err
}

// storeFailed records a rejected store state: the last good state stays
// enforced, and the problems are reported with file and line in the log and
// in status.
func (a *Agent) storeFailed(serrs []api.StoreError) {
	a.mu.Lock()
	a.storeErrs = serrs
	if !a.ready {
		a.notReady = fmt.Sprintf("store has errors and no earlier good state: %s:%d: %s", serrs[0].File, serrs[0].Line, serrs[0].Message)
	}
	a.mu.Unlock()
	for _, e := range serrs {
		a.log.Error("store state rejected; last good state stays", "file", e.File, "line", e.Line, "error", e.Message)
	}
}

// storeUpdated applies a new good store state. It returns nil only when
// the state compiled without rejected objects and the datapath enforces it.
func (a *Agent) storeUpdated(ctx context.Context, res *store.Result) error {
	var rejected []api.StoreError
	if len(res.Rejected) > 0 {
		rejected = storeErrors(errors.Join(res.Rejected...))
	}
	a.mu.Lock()
	a.storeErrs = rejected
	a.mu.Unlock()
	for _, e := range rejected {
		a.log.Error("store object rejected", "object", e.File, "error", e.Message)
	}
	err := a.batch.Submit(ctx, &change{store: res})
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, batch.ErrClosed) {
		a.log.Error("apply store", "error", err)
	}
	if a.adopter != nil {
		// The state is enforced: its local pods that no endpoint holds
		// are adopted now.
		a.adopter.Kick()
	}
	return err
}

// applyBatch runs on the batcher's goroutine: it folds every change into
// the compiler and applies the resulting MapState to the datapath once.
// Attaching and detaching programs happen outside, in the API handlers:
// a TCX attach waits for an RCU grace period under the RTNL lock, and a
// batch must not make every ADD in it wait for every other's attach.
func (a *Agent) applyBatch(changes []*change) []error {
	// SVID subscriptions follow the endpoints folded in, whether or not
	// the apply succeeds: a deleted pod's ends, a new pod's starts.
	defer a.syncSVIDs()
	start := time.Now()
	for _, c := range changes {
		c.batchStart, c.batchSize = start, len(changes)
	}
	errs := make([]error, len(changes))
	var added, deleted int
	for i, c := range changes {
		switch {
		case c.store != nil:
			errs[i] = a.foldStore(c.store)
		case c.add != nil:
			if err := a.foldAdd(c.add); err != nil {
				errs[i] = err
				continue
			}
			added++
		case c.del != nil:
			c.removed = a.foldDel(c)
			if c.removed != nil {
				deleted++
			}
		case c.resync != nil:
			for _, r := range c.resync {
				if err := a.syncPod(r); err != nil {
					errs[i] = err
				}
			}
		}
	}
	if !a.haveStore {
		// Nothing is compiled before the first good store state: the
		// pinned maps keep enforcing what the last agent applied.
		for i, c := range changes {
			if c.add != nil && errs[i] == nil {
				errs[i] = api.Errorf(api.CodeNotReady, "no valid store state yet; see `bulkhead status`")
				a.dropEndpoint(c.add, c.restore)
			}
		}
		return errs
	}
	// Primary CNIs give host-side veths and bridges addresses as pods come
	// and go; traffic from them is the node's (kubelet probes), not world.
	if ips, err := hostAddrs(); err != nil {
		a.log.Warn("list host addresses", "error", err)
	} else {
		a.compiler.SetHostIPs(ips)
		a.nodeAddrs = ips
	}
	compiled := time.Now()
	ms := a.compiler.MapState()
	// The rejections of what was just compiled, whether or not its apply
	// succeeds: status says separately when the apply is failing.
	a.budget.update(a.compiler.BudgetStatus(), a.log, a.metrics)
	live, err := a.prepareApply(ms)
	var st datapath.ApplyStats
	if err == nil {
		st, err = a.applyPolicy(live)
	}
	a.reportStore(changes, errs, ms.Revision, err)
	if err != nil {
		a.applyRetry.failed(fmt.Errorf("apply policy revision %d: %w", ms.Revision, err))
		for i := range errs {
			if errs[i] == nil {
				errs[i] = fmt.Errorf("apply policy: %w", err)
			}
		}
		return errs
	}
	applied := time.Now()
	a.applyRetry.succeeded()
	a.publishConflicts()
	for _, rec := range a.reattach {
		if _, err := a.dp.Attach(rec.dpEndpoint()); err != nil {
			a.log.Error("re-attach restored endpoint", "container", rec.Key.ContainerID, "veth", rec.HostVeth, "error", err)
		}
	}
	a.reattach = nil
	a.publish(ms)
	a.metrics.CompileSeconds.Observe(compiled.Sub(start).Seconds())
	a.metrics.ApplySeconds.Observe(applied.Sub(compiled).Seconds())
	a.metrics.PolicyRevision.Set(float64(ms.Revision))
	level := slog.LevelInfo
	if st.PolicyWrites+st.PolicyDeletes+st.IPCacheWrites+st.IPCacheDeletes+st.Flipped+st.Removed == 0 && added+deleted == 0 {
		level = slog.LevelDebug // a refresh that changed nothing
	}
	a.log.Log(context.Background(), level, "policy applied", "revision", ms.Revision, "changes", len(changes),
		"added", added, "deleted", deleted, "endpoints", len(ms.Endpoints),
		"policyWrites", st.PolicyWrites, "policyDeletes", st.PolicyDeletes,
		"ipcacheWrites", st.IPCacheWrites, "ipcacheDeletes", st.IPCacheDeletes,
		"compile", compiled.Sub(start), "apply", applied.Sub(compiled))
	return errs
}

// foldAdd registers an endpoint and compiles its pod.
func (a *Agent) foldAdd(rec *endpointRecord) error {
	a.mu.Lock()
	if old := a.endpoints[rec.Key]; old != nil && old != rec {
		// A repeated ADD for the same attachment: keep the ID.
		rec.ID = old.ID
		rec.CreatedAt = old.CreatedAt
	}
	if rec.ID == 0 {
		rec.ID = a.freeIDLocked()
	}
	a.endpoints[rec.Key] = rec
	a.mu.Unlock()
	return a.syncPod(podRefOf(rec))
}

// dropEndpoint undoes foldAdd: an earlier registration of the key (prior)
// comes back.
func (a *Agent) dropEndpoint(rec, prior *endpointRecord) {
	a.mu.Lock()
	if a.endpoints[rec.Key] == rec {
		delete(a.endpoints, rec.Key)
		if prior != nil {
			a.endpoints[rec.Key] = prior
		}
	}
	a.mu.Unlock()
	_ = a.syncPod(podRefOf(rec))
	if prior != nil && podRefOf(prior) != podRefOf(rec) {
		_ = a.syncPod(podRefOf(prior))
	}
}

// foldDel forgets an endpoint (or puts c.restore back in its place); it
// returns nil when it was unknown or c.delIf refused it.
func (a *Agent) foldDel(c *change) *endpointRecord {
	k := *c.del
	a.mu.Lock()
	rec := a.endpoints[k]
	if rec == nil || (c.delIf != nil && !c.delIf(rec)) {
		a.mu.Unlock()
		return nil
	}
	delete(a.endpoints, k)
	if c.restore != nil {
		a.endpoints[k] = c.restore
	}
	a.mu.Unlock()
	if err := a.syncPod(podRefOf(rec)); err != nil {
		a.log.Warn("recompile after delete", "pod", podRefOf(rec), "error", err)
	}
	if c.restore != nil && podRefOf(c.restore) != podRefOf(rec) {
		if err := a.syncPod(podRefOf(c.restore)); err != nil {
			a.log.Warn("recompile after rollback", "pod", podRefOf(c.restore), "error", err)
		}
	}
	return rec
}

// freeIDLocked returns the lowest endpoint ID not in use.
func (a *Agent) freeIDLocked() policy.EndpointID {
	used := make(map[policy.EndpointID]bool, len(a.endpoints))
	for _, e := range a.endpoints {
		used[e.ID] = true
	}
	for id := policy.EndpointID(1); ; id++ {
		if !used[id] && !a.idReservedLocked(id) {
			return id
		}
	}
}

// localEndpoint returns the endpoint of a pod on this node, if any. With
// several (a sandbox being replaced), the newest wins.
func (a *Agent) localEndpoint(ref podRef) *endpointRecord {
	a.mu.Lock()
	defer a.mu.Unlock()
	var best *endpointRecord
	for _, e := range a.endpoints {
		if podRefOf(e) == ref && (best == nil || e.CreatedAt.After(best.CreatedAt)) {
			best = e
		}
	}
	return best
}

// desiredPod is the compiler's view of a pod: the store's workload
// metadata, with the addresses and endpoint ID of the local endpoint.
//
// A pod gets only the addresses it owns (ipOwners): another pod claiming
// the same address neither takes it over nor removes it.
func (a *Agent) desiredPod(ref podRef) (policy.Pod, bool) {
	sp, inStore := a.storePods[ref]
	ep := a.localEndpoint(ref)
	if ep == nil {
		sp.IPs = a.ipOwners.claim(ref, sp.IPs, false, time.Time{})
		return sp, inStore
	}
	p := policy.Pod{Namespace: ref.ns, Name: ref.name}
	if inStore {
		p = sp
	}
	p.IPs = a.ipOwners.claim(ref, ep.addrs(), true, ep.CreatedAt)
	p.Endpoint = ep.ID
	// On its own node a pod's SPIFFE ID is what its SVID source issued
	// (an annotation in the store does not decide it).
	p.SPIFFEID = a.issuedID(ref, p.ServiceAccount)
	return p, true
}

// syncPod brings the compiler's pod ref in line with the desired state.
func (a *Agent) syncPod(ref podRef) error {
	want, ok := a.desiredPod(ref)
	have, had := a.appliedPods[ref]
	switch {
	case !ok && had:
		a.compiler.DeletePod(ref.ns, ref.name)
		delete(a.appliedPods, ref)
	case ok && (!had || !want.Equal(have)):
		if _, _, err := a.compiler.UpsertPod(want); err != nil {
			if a.podRetry == nil {
				a.podRetry = map[podRef]bool{}
			}
			a.podRetry[ref] = true
			return fmt.Errorf("compile pod %s: %w", ref, err)
		}
		delete(a.podRetry, ref)
		a.appliedPods[ref] = want
	}
	// Pods that gained or lost an address by this claim follow.
	var errs []error
	for _, r := range a.ipOwners.takeDirty() {
		errs = append(errs, a.syncPod(r))
	}
	return errors.Join(errs...)
}

// foldStore folds a new store state into the compiler. The first one is a
// full compile; later ones change only the objects that differ.
func (a *Agent) foldStore(res *store.Result) error {
	s := res.Snapshot
	a.setLocalPods(s.Pods)
	pods := make(map[podRef]policy.Pod, len(s.Pods))
	remote := make(map[podRef][]netip.Addr, len(s.Pods))
	for _, p := range s.Pods {
		pods[podRef{p.Namespace, p.Name}] = p
		remote[podRef{p.Namespace, p.Name}] = p.IPs
	}
	a.foldRuntimePolicies(s.RuntimePolicies, pods)
	a.mu.Lock()
	a.remoteIPs = remote
	a.mu.Unlock()
	nss := make(map[string]policy.Namespace, len(s.Namespaces))
	for _, n := range s.Namespaces {
		nss[n.Name] = n
	}
	pols := map[string]any{}
	for _, np := range s.NetworkPolicies {
		pols[policy.KindNetworkPolicy+" "+np.Namespace+"/"+np.Name] = np
	}
	for _, bp := range s.BulkheadPolicies {
		pols[policy.KindBulkheadPolicy+" "+bp.Namespace+"/"+bp.Name] = bp
	}

	if !a.haveStore {
		a.storePods, a.storeNS, a.storePol = pods, nss, pols
		full := &policy.Snapshot{TrustDomain: a.cfg.TrustDomain, DenyHostIngress: a.cfg.DenyHostIngress,
			Namespaces: s.Namespaces, NetworkPolicies: s.NetworkPolicies, BulkheadPolicies: s.BulkheadPolicies}
		refs := map[podRef]bool{}
		for r := range pods {
			refs[r] = true
		}
		a.mu.Lock()
		for _, e := range a.endpoints {
			refs[podRefOf(e)] = true
		}
		a.mu.Unlock()
		a.appliedPods = map[podRef]policy.Pod{}
		// Every address claim first, so each pod below gets only what
		// it owns among all of them.
		for r := range refs {
			a.desiredPod(r)
		}
		a.ipOwners.takeDirty()
		for _, r := range slices.SortedFunc(maps.Keys(refs), func(x, y podRef) int {
			return cmpRef(x, y)
		}) {
			if p, ok := a.desiredPod(r); ok {
				full.Pods = append(full.Pods, p)
				a.appliedPods[r] = p
			}
		}
		_, err := a.compiler.Reset(full)
		a.haveStore = true
		if err != nil {
			a.log.Warn("store compiled with rejected objects", "error", err)
		}
		return err
	}

	var errs []error
	for name, n := range nss {
		if old, ok := a.storeNS[name]; !ok || !reflect.DeepEqual(old, n) {
			if _, _, err := a.compiler.UpsertNamespace(n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for name := range a.storeNS {
		if _, ok := nss[name]; !ok {
			if _, _, err := a.compiler.DeleteNamespace(name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	a.storeNS = nss
	for key, p := range pols {
		if old, ok := a.storePol[key]; ok && reflect.DeepEqual(old, p) {
			continue
		}
		var err error
		switch p := p.(type) {
		case *networkingv1.NetworkPolicy:
			_, _, err = a.compiler.UpsertNetworkPolicy(p)
		case *v1alpha1.BulkheadPolicy:
			_, _, err = a.compiler.UpsertBulkheadPolicy(p)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	for key, p := range a.storePol {
		if _, ok := pols[key]; ok {
			continue
		}
		kind := policy.KindNetworkPolicy
		if _, ok := p.(*v1alpha1.BulkheadPolicy); ok {
			kind = policy.KindBulkheadPolicy
		}
		meta := p.(metav1.Object)
		if _, _, err := a.compiler.DeletePolicy(kind, meta.GetNamespace(), meta.GetName()); err != nil {
			errs = append(errs, err)
		}
	}
	a.storePol = pols
	// Only the pods the store changed: every other input of a pod (its
	// endpoint, its issued ID, the address claims) syncs it when it
	// changes.
	refs := map[podRef]bool{}
	for r, p := range pods {
		if old, ok := a.storePods[r]; !ok || !old.Equal(p) {
			refs[r] = true
		}
	}
	for r := range a.storePods {
		if _, ok := pods[r]; !ok {
			refs[r] = true
		}
	}
	for r := range a.podRetry {
		refs[r] = true
	}
	a.storePods = pods
	for r := range refs {
		if err := a.syncPod(r); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func cmpRef(x, y podRef) int {
	if x.ns != y.ns {
		if x.ns < y.ns {
			return -1
		}
		return 1
	}
	switch {
	case x.name < y.name:
		return -1
	case x.name > y.name:
		return 1
	}
	return 0
}

// publish makes the applied state visible to readers.
func (a *Agent) publish(ms *policy.MapState) {
	infos := a.compiler.Identities()
	ids := map[uint32]policy.IdentityInfo{}
	for _, ii := range infos {
		ids[uint32(ii.ID)] = ii
	}
	a.mu.Lock()
	v := &view{ms: ms, identities: ids, endpoints: map[policy.EndpointID]*endpointRecord{}, pods: map[policy.EndpointID]podRef{}}
	for _, e := range a.endpoints {
		c := *e
		v.endpoints[e.ID] = &c
		v.pods[e.ID] = podRefOf(e)
	}
	if !a.ready {
		a.ready, a.notReady = true, ""
	}
	remote := a.remoteIPs
	a.mu.Unlock()
	v.mtls = a.buildMTLSView(ms, ids, v, a.nodeAddrs)
	a.view.Store(v)
	fc := flows.NewContextFrom(a.flowCtx, ms, infos, v.podAddrs(remote))
	fc.Quarantine = a.quar.lookup
	a.flowCtx = fc
	fc.Endpoints = v.endpointPods()
	fc.IsolatedBy = v.isolatedBy(ms, a.compiler)
	a.enricher.SetContext(fc)
	a.metrics.Endpoints.Set(float64(len(v.endpoints)))
	if a.sysmon != nil {
		a.sysmon.svc.Changed()
	}
}

// vethPresent reports whether the record's host veth still exists with the
// same index and name. One RTM_GETLINK by index, not a dump of every link.
// Only a definite answer makes it gone: an error other than "no such
// device" keeps the endpoint (and its enforcement) for the next look.
func vethPresent(rec endpointRecord) bool {
	l, err := netlink.LinkByIndex(rec.HostIfIndex)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return false
	}
	return err != nil || l.Attrs().Name == rec.HostVeth
}

// datapathMode says how endpoints are attached, and how many are attached
// the other way (a fallback, or a change of --attach-mode since they were
// added). Called with a.mu held.
func (a *Agent) datapathMode() string {
	other := 0
	for _, e := range a.endpoints {
		if e.Mode != "" && e.Mode != a.attachMode {
			other++
		}
	}
	if other == 0 {
		return string(a.attachMode)
	}
	return fmt.Sprintf("%s (%d endpoints attached otherwise)", a.attachMode, other)
}

// hostAddrs lists the addresses of this network namespace: the node's.
func hostAddrs() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// watchHostAddrs recompiles when the node's addresses change: a primary CNI
// gives each new host-side veth an address (and the kernel a link-local one
// a moment later), and traffic from them must be host, not world, from the
// first packet on.
func (a *Agent) watchHostAddrs(ctx context.Context) {
	updates := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(updates, ctx.Done(), netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) {
			// Closing the subscription at a stop ends its receive with an
			// error (EAGAIN): that is the stop, not a problem.
			if ctx.Err() == nil {
				a.log.Warn("address updates", "error", err)
			}
		},
	}); err != nil {
		a.log.Warn("cannot watch the node's addresses; they refresh with endpoint changes only", "error", err)
		return
	}
	const settle = 50 * time.Millisecond
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-updates:
			if !ok {
				return
			}
			timer.Reset(settle)
		case <-timer.C:
			if err := a.batch.Submit(ctx, &change{refresh: true}); err != nil && ctx.Err() == nil {
				a.log.Warn("refresh host addresses", "error", err)
			}
		}
	}
}
