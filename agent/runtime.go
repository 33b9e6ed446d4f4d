package agent

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
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
}

func openRuntimeDetection(a *Agent) (*runtimeDetection, error) {
	// Attaching a tracepoint needs tracefs, which a fresh node may lack.
	if _, err := rtmon.EnsureTracefs(); err != nil {
		return nil, fmt.Errorf("runtime detection: %w", err)
	}
	log := a.log.With("component", "runtime")
	mon, err := rtmon.New(rtmon.Config{Logger: log})
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
	alerts := a.metrics.RegisterRuntime(func() (metrics.RuntimeEvents, error) {
		c, err := mon.Counters()
		return metrics.RuntimeEvents{Sent: c.Sent, Lost: c.Lost, Unwatched: c.Unwatched}, err
	})
	return &runtimeDetection{mon: mon, svc: svc, alerts: alerts}, nil
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
		out = append(out, ep)
	}
	return out
}

// emitAlert writes an alert to the flow log (one JSON line, event_kind
// "alert") and to the agent's log, so that an alert raised while the flow
// pipeline is down still leaves a trace.
func (a *Agent) emitAlert(al detect.Alert) {
	line, err := json.Marshal(al)
	if err != nil {
		a.log.Error("encode runtime alert", "rule", al.RuleID, "error", err)
		return
	}
	a.sysmon.alerts.WithLabelValues(al.RuleID, al.Technique, al.Action).Inc()
	a.log.Warn("runtime alert", "rule", al.RuleID, "technique", al.Technique, "pod", al.Pod.Namespace+"/"+al.Pod.Pod,
		"syscall", al.Syscall, "pid", al.PID, "comm", al.Comm)
	if p := a.pipe.Load(); p != nil {
		p.writeAlert(line)
	}
}

// writeAlert appends one alert line to the flow log and flushes it: alerts
// are rare, and one should not wait for the next tick.
func (p *flowPipe) writeAlert(line []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.flowLog == nil {
		return
	}
	if err := p.flowLog.WriteLine(line); err != nil {
		p.log.Warn("write alert to the flow log", "error", err)
		return
	}
	if err := p.flowLog.Flush(); err != nil {
		p.log.Warn("flush the flow log", "error", err)
	}
}
