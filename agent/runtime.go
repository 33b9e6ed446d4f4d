package agent

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	rtmon "github.com/bulkhead-io/bulkhead/runtime"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// runtimeDetection wires the runtime package's monitor and service into
// the agent: the service owns its state; the agent gives it the endpoint
// view and takes its alerts.
type runtimeDetection struct {
	mon    *rtmon.Monitor
	svc    *rtmon.Service
	alerts *prometheus.CounterVec
	// hub keeps recent alerts for `bulkhead observe --alerts`.
	hub *flows.AlertHub
	// alertLog is the --alert-log file while Run runs (nil without it:
	// alerts then go to the flow log).
	alertLog atomic.Pointer[flowlog.Writer]
	// inputs are the store's runtime policies and its pods' labels, swapped
	// whole by foldStore and read by the service's reconcile.
	inputs atomic.Pointer[runtimeInputs]
	// warned remembers the "Block cannot be enforced" warnings given, so
	// that the reconcile loop says it once per pod and rule.
	warned sync.Map
}

type runtimeInputs struct {
	pols   []*policy.RuntimePolicy
	labels map[podRef]map[string]string
}

// foldRuntimePolicies hands the store's runtime policies to the runtime
// service. Without --runtime-detection nothing would enforce them: that is
// said, never silent.
func (a *Agent) foldRuntimePolicies(rps []*v1alpha1.BulkheadRuntimePolicy, pods map[podRef]policy.Pod) {
	if a.sysmon == nil {
		var unenforced []api.PolicyError
		for _, rp := range rps {
			unenforced = append(unenforced, api.PolicyError{Policy: v1alpha1.RuntimePolicyKind + " " + rp.Namespace + "/" + rp.Name,
				Message: v1alpha1.RuntimePolicyKind + " " + rp.Namespace + "/" + rp.Name +
					": not enforced: runtime detection is off (start the agent with --runtime-detection)"})
		}
		if len(rps) > 0 && len(unenforced) != len(ptrOrNil(a.runtimeUnenforced.Load())) {
			a.log.Warn("the store has BulkheadRuntimePolicies, and runtime detection is off (--runtime-detection): they are not enforced",
				"count", len(rps))
		}
		a.runtimeUnenforced.Store(&unenforced)
		return
	}
	in := &runtimeInputs{labels: make(map[podRef]map[string]string, len(pods))}
	for _, rp := range rps {
		// The store validated it already; compiling again cannot fail.
		if p, err := policy.CompileRuntimePolicy(rp); err == nil {
			in.pols = append(in.pols, p)
		} else {
			a.log.Error("runtime policy", "error", err)
		}
	}
	for r, p := range pods {
		in.labels[r] = p.Labels
	}
	a.sysmon.inputs.Store(in)
	a.sysmon.svc.Changed()
}

// cgroup2Root is where the node's cgroup v2 hierarchy is mounted, from
// /proc/self/mountinfo; "" when it has none (the blocking hooks then report
// themselves unavailable).
func cgroup2Root() string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(data)) {
		// ... mount-point ... - fstype source options
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		if f := strings.Fields(pre); len(f) >= 5 && f[3] == "/" {
			return f[4]
		}
	}
	return ""
}

func openRuntimeDetection(a *Agent) (*runtimeDetection, error) {
	// Attaching a tracepoint needs tracefs, which a fresh node may lack.
	if _, err := rtmon.EnsureTracefs(); err != nil {
		return nil, fmt.Errorf("runtime detection: %w", err)
	}
	log := a.log.With("component", "runtime")
	// The blocking hooks go on the cgroup2 root, multi-attached: the agent
	// may not know a pod's cgroup (the dir store knows only its netns), and
	// a process that moves to another cgroup is still under the root. The
	// netns filter makes them act for pods only.
	mon, err := rtmon.New(rtmon.Config{Logger: log, Cgroup: cgroup2Root()})
	if err != nil {
		return nil, fmt.Errorf("runtime detection: %w", err)
	}
	resync := a.cfg.RuntimeResync
	if resync <= 0 {
		resync = time.Second
	}
	svc := rtmon.NewService(rtmon.ServiceConfig{
		Monitor: mon, Endpoints: runtimeEndpoints{a}, Emit: a.emitAlert, Resync: resync, Logger: log,
	})
	// What the kernel offers runtime detection, for `bulkhead status`.
	feats := rtmon.ProbeFeatures()
	names := make([]string, 0, 8)
	avail := feats.Available()
	for n := range avail {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		state := "yes"
		if err := avail[n]; err != nil {
			state = "no (" + err.Error() + ")"
		}
		a.features = append(a.features, api.Feature{Name: "runtime-" + n, State: state})
	}
	a.features = append(a.features, api.Feature{Name: "runtime-module-hook", State: string(mon.ModulePath())})
	hooks := mon.CgroupHooks()
	for _, h := range slices.Sorted(maps.Keys(hooks)) {
		state := "attached"
		if err := hooks[h]; err != nil {
			state = "no (" + err.Error() + "): Block cannot be enforced for its rule"
		}
		a.features = append(a.features, api.Feature{Name: "runtime-" + h, State: state})
	}
	// The tracepoints of later rules, which a kernel may lack: where one is
	// missing, its rule does not see that syscall, and a Kill asked for it
	// is not enforced.
	optional := mon.OptionalHooks()
	for _, h := range slices.Sorted(maps.Keys(optional)) {
		state := "attached"
		if err := optional[h]; err != nil {
			state = "no (" + err.Error() + "): its rule does not see this syscall"
		}
		a.features = append(a.features, api.Feature{Name: "runtime-" + h, State: state})
	}
	alerts := a.metrics.RegisterRuntime(func() (metrics.RuntimeEvents, error) {
		c, err := mon.Counters()
		return metrics.RuntimeEvents{Sent: c.Sent, Lost: c.Lost, Unwatched: c.Unwatched, Blocked: c.Blocked}, err
	})
	return &runtimeDetection{mon: mon, svc: svc, alerts: alerts, hub: flows.NewAlertHub(alertRing, a.cfg.NodeName)}, nil
}

// runtimeEndpoints lists the published endpoints with their netns inodes.
type runtimeEndpoints struct{ a *Agent }

func (r runtimeEndpoints) RuntimeEndpoints() []detect.Endpoint {
	v := r.a.view.Load()
	if v == nil {
		return nil
	}
	out := make([]detect.Endpoint, 0, len(v.endpoints))
	for id, rec := range v.endpoints {
		var st unix.Stat_t
		if err := unix.Stat(rec.Netns, &st); err != nil {
			continue // the netns is gone: nothing left to watch
		}
		ep := detect.Endpoint{ID: rec.Key.ContainerID, Namespace: rec.Pod.Namespace, Pod: rec.Pod.Name, Netns: uint32(st.Ino)}
		if p := v.ms.Endpoints[id]; p != nil {
			ep.SPIFFEID = v.identities[uint32(p.Identity)].SPIFFEID
		}
		ep.Actions = r.actions(ep)
		out = append(out, ep)
	}
	return out
}

// actions are the kernel masks of ep's answers under the runtime policies.
func (r runtimeEndpoints) actions(ep detect.Endpoint) detect.Actions {
	d := r.a.sysmon
	in := d.inputs.Load()
	if in == nil {
		return detect.Actions{}
	}
	var out detect.Actions
	want := policy.RuntimeActions(in.pols, ep.Namespace, in.labels[podRef{ep.Namespace, ep.Pod}], ep.SPIFFEID)
	for rule, act := range want {
		bit := detect.Bit(rule)
		switch act {
		case v1alpha1.RuntimeBlock:
			if err := d.mon.CgroupHooks()[rtmon.HookOf(rule)]; err != nil {
				key := ep.Namespace + "/" + ep.Pod + " " + rule
				if _, seen := d.warned.LoadOrStore(key, true); !seen {
					r.a.log.Error("runtime policy asks Block, which this node cannot enforce: the rule's hook is unavailable",
						"pod", ep.Namespace+"/"+ep.Pod, "rule", rule, "hook", rtmon.HookOf(rule), "error", err)
				}
				continue
			}
			out.Block |= bit
		case v1alpha1.RuntimeKill:
			out.Kill |= bit
		}
	}
	return out
}

func ptrOrNil[T any](p *[]T) []T {
	if p == nil {
		return nil
	}
	return *p
}
