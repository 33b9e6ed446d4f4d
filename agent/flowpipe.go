package agent

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// eventSource is where flow events come from: the datapath's ring buffer
// reader, or recorded events in tests and benchmarks.
type eventSource interface {
	// Read blocks until the next event; datapath.ErrClosed ends the loop.
	Read() (datapath.FlowEvent, error)
	Close() error
}

// flowDatapath is what the pipeline asks of the datapath besides events.
type flowDatapath interface {
	Counters() (datapath.Counters, error)
	GC() (deleted int, ended []datapath.FlowEvent, err error)
}

// flowPipeConfig is everything a flowPipe uses, so that tests can build one
// without an Agent.
type flowPipeConfig struct {
	Log      *slog.Logger
	Datapath flowDatapath
	Events   eventSource
	Enricher *flows.Enricher
	Hub      *flows.Hub
	Metrics  *metrics.Metrics
	NodeName string
	// Format is "json" or "ocsf".
	Format string
	// FlowLog is nil without --flow-log. The pipe closes it.
	FlowLog *flowlog.Writer
	// LogFilter decides which records reach the flow log (the stream and
	// metrics see every record), as Hubble's exporter allow and deny lists.
	LogFilter flows.Selector
	// OnEvent, when set, sees every event before it is recorded (the
	// scan detection); it must be quick.
	OnEvent func(*datapath.FlowEvent)
}

// flowPipe moves datapath events to the flow log, the hub and metrics.
type flowPipe struct {
	log      *slog.Logger
	dp       flowDatapath
	events   eventSource
	enricher *flows.Enricher
	hub      *flows.Hub
	nodeName string
	ocsf     bool
	flowLog  *flowlog.Writer // nil without --flow-log
	logSel   flows.Selector
	onEvent  func(*datapath.FlowEvent)

	// readDone is closed when the read loop started by startFlows ends.
	readDone chan struct{}

	mu         sync.Mutex // serialises emitters: the log, the hub, the counter caches
	closed     bool       // set by close: late emitters (the tunnel's handlers) are dropped
	buf        []byte
	kernelLost uint64
	metrics    flowMetrics
}

// flowMetrics caches the counters emit increments for every event:
// CounterVec.WithLabelValues hashes the label values and takes a lock on
// every call, which cost more than the rest of a metric update.
type flowMetrics struct {
	m *metrics.Metrics
	// flows is indexed by verdictIndex and directionIndex.
	flows      [3][2]prometheus.Counter
	drops      map[string]prometheus.Counter
	policies   map[policyLabels]*[3]prometheus.Counter
	lostKernel prometheus.Counter
	lostUser   prometheus.Counter
}

type policyLabels struct{ kind, namespace, name string }

var verdicts = [3]string{flows.VerdictForwarded, flows.VerdictDropped, flows.VerdictAudit}

func verdictIndex(v string) int {
	switch v {
	case flows.VerdictForwarded:
		return 0
	case flows.VerdictDropped:
		return 1
	case flows.VerdictAudit:
		return 2
	}
	return -1
}

func newFlowMetrics(m *metrics.Metrics) flowMetrics {
	fm := flowMetrics{m: m, drops: map[string]prometheus.Counter{}, policies: map[policyLabels]*[3]prometheus.Counter{},
		lostKernel: m.LostEvents.WithLabelValues("kernel"), lostUser: m.LostEvents.WithLabelValues("userspace")}
	for i, v := range verdicts {
		for j, d := range [2]string{flows.DirectionIngress, flows.DirectionEgress} {
			fm.flows[i][j] = m.Flows.WithLabelValues(v, d)
		}
	}
	return fm
}

// count updates the flow metrics of f. The caches grow with the label
// values seen, as the CounterVecs themselves do.
func (fm *flowMetrics) count(f *flows.Flow) {
	vi := verdictIndex(f.Verdict)
	di := 0
	if f.TrafficDirection == flows.DirectionEgress {
		di = 1
	}
	if vi >= 0 && (di == 1 || f.TrafficDirection == flows.DirectionIngress) {
		fm.flows[vi][di].Inc()
	} else {
		fm.m.Flows.WithLabelValues(f.Verdict, f.TrafficDirection).Inc()
	}
	if r := f.DropReasonDesc; r != "" {
		c, ok := fm.drops[r]
		if !ok {
			c = fm.m.Drops.WithLabelValues(r)
			fm.drops[r] = c
		}
		c.Inc()
	}
	if by := f.DecidingPolicy(); by != nil {
		if vi < 0 {
			fm.m.PolicyVerdicts.WithLabelValues(by.Kind, by.Namespace, by.Name, f.Verdict).Inc()
			return
		}
		k := policyLabels{by.Kind, by.Namespace, by.Name}
		cs := fm.policies[k]
		if cs == nil {
			cs = new([3]prometheus.Counter)
			fm.policies[k] = cs
		}
		if cs[vi] == nil {
			cs[vi] = fm.m.PolicyVerdicts.WithLabelValues(by.Kind, by.Namespace, by.Name, verdicts[vi])
		}
		cs[vi].Inc()
	}
}

func newFlowPipe(cfg flowPipeConfig) *flowPipe {
	p := &flowPipe{
		log: cfg.Log, dp: cfg.Datapath, events: cfg.Events, enricher: cfg.Enricher, hub: cfg.Hub,
		nodeName: cfg.NodeName, ocsf: cfg.Format == "ocsf", flowLog: cfg.FlowLog, logSel: cfg.LogFilter,
		buf: make([]byte, 0, 4096), metrics: newFlowMetrics(cfg.Metrics), onEvent: cfg.OnEvent,
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	// The counter runs from when the datapath was loaded, and an earlier
	// agent reported what it saw; only later losses are ours to report.
	// (Those while no agent ran stay in the counter and in status only.)
	if c, err := p.dp.Counters(); err == nil {
		p.kernelLost = c.EventsLost
	}
	return p
}

// startFlows opens the event ring and starts the reader, the conntrack GC
// and the loss watcher.
func (a *Agent) startFlows(ctx context.Context, wg *sync.WaitGroup) (*flowPipe, error) {
	rd, err := a.dp.Events()
	if err != nil {
		return nil, err
	}
	var fl *flowlog.Writer
	if a.cfg.FlowLog != "" {
		fl, err = flowlog.Open(flowlog.Config{Path: a.cfg.FlowLog, MaxSize: a.cfg.FlowLogMaxSize, MaxFiles: a.cfg.FlowLogMaxFiles})
		if err != nil {
			rd.Close()
			return nil, err
		}
	}
	p := newFlowPipe(flowPipeConfig{
		Log: a.log, Datapath: a.dp, Events: rd, Enricher: a.enricher, Hub: a.hub, Metrics: a.metrics,
		NodeName: a.cfg.NodeName, Format: a.cfg.FlowFormat, FlowLog: fl, LogFilter: a.cfg.FlowLogFilter,
		OnEvent: a.scanHook(),
	})
	p.readDone = make(chan struct{})
	wg.Go(func() { defer close(p.readDone); p.readLoop() })
	wg.Go(func() { p.tick(ctx) })
	return p, nil
}

func (p *flowPipe) readLoop() {
	for {
		ev, err := p.events.Read()
		if errors.Is(err, datapath.ErrClosed) {
			return
		}
		if err != nil {
			if errors.Is(err, datapath.ErrShortEvent) {
				// The record was consumed but cannot be reported: a loss.
				p.metrics.lostUser.Inc()
			}
			p.log.Warn("read flow event", "error", err)
			continue
		}
		p.emit(&ev)
	}
}

// tick runs conntrack GC (flows that timed out end here), flushes the log,
// and turns kernel-side losses into lost_events records.
func (p *flowPipe) tick(ctx context.Context) {
	flush := time.NewTicker(250 * time.Millisecond)
	gc := time.NewTicker(5 * time.Second)
	defer flush.Stop()
	defer gc.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gc.C:
			_, ended, err := p.dp.GC()
			if err != nil {
				p.log.Warn("conntrack gc", "error", err)
			}
			for i := range ended {
				p.emit(&ended[i])
			}
		case <-flush.C:
			p.checkKernelLoss()
			p.flush()
		}
	}
}

func (p *flowPipe) flush() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.flowLog != nil {
		if err := p.flowLog.Flush(); err != nil {
			p.log.Warn("flush flow log", "error", err)
		}
	}
}

// checkKernelLoss reports events the full ring refused since the last
// check: in the metric, as a marker in every stream, and as a record in the
// flow log where the gap is.
func (p *flowPipe) checkKernelLoss() {
	c, err := p.dp.Counters()
	if err != nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.EventsLost == p.kernelLost {
		return
	}
	n := c.EventsLost - p.kernelLost
	if c.EventsLost < p.kernelLost {
		// The counter restarted (the datapath was loaded afresh): all it
		// holds now is new.
		n = c.EventsLost
	}
	p.kernelLost = c.EventsLost
	p.metrics.lostKernel.Add(float64(n))
	lost := &flows.LostEvents{Time: time.Now(), Source: "kernel", NumEventsLost: n, NodeName: p.nodeName}
	p.hub.PublishLost(lost)
	if p.flowLog != nil {
		p.buf = lost.AppendJSON(p.buf[:0])
		if err := p.flowLog.WriteLine(p.buf); err != nil {
			p.log.Warn("write flow log", "error", err)
		}
	}
}

// emit is the per-event hot path: enrich (one allocation), count, encode
// into a reused buffer, write, publish.
func (p *flowPipe) emit(ev *datapath.FlowEvent) {
	if p.onEvent != nil {
		p.onEvent(ev)
	}
	f := p.enricher.Enrich(ev)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.metrics.count(f)
	if p.flowLog != nil && p.logSel.Match(f) {
		var err error
		if p.ocsf {
			p.buf, err = f.AppendOCSF(p.buf[:0])
		} else {
			p.buf = f.AppendJSON(p.buf[:0])
		}
		if err == nil {
			err = p.flowLog.WriteLine(p.buf)
		}
		if err != nil {
			p.log.Warn("write flow log", "error", err)
		}
	}
	if n := p.hub.Publish(f); n > 0 {
		p.metrics.lostUser.Add(float64(n))
	}
}

func (p *flowPipe) close() {
	if p == nil {
		return
	}
	p.events.Close()
	// Let the read loop finish the event it holds, so that it is written
	// rather than refused by a closed log. Read returns soon after Close;
	// the timeout only guards shutdown against a wedged reader.
	if p.readDone != nil {
		select {
		case <-p.readDone:
		case <-time.After(time.Second):
			p.log.Warn("flow reader did not stop; closing the flow log under it")
		}
	}
	p.checkKernelLoss() // the last losses reach the log before it closes
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	if p.flowLog != nil {
		if err := p.flowLog.Close(); err != nil {
			p.log.Warn("close flow log", "error", err)
		}
	}
}

// endpointPods names the pod of every local endpoint, for records of
// forged packets.
func (v *view) endpointPods() map[policy.EndpointID]flows.PodName {
	out := make(map[policy.EndpointID]flows.PodName, len(v.pods))
	for id, ref := range v.pods {
		out[id] = flows.PodName{Namespace: ref.ns, Name: ref.name}
	}
	return out
}

// isolatedBy names, for each local endpoint, the policies that isolate its
// pod in each direction whose default is not allow ("Kind ns/name", as
// explain's isolated_by), for the records of the drops of that default
// deny. It asks the compiler once per apply, on the goroutine that
// compiled ms: only local endpoints make drop events. Which policies
// select a pod depends on its identity only, so the replicas of a workload
// are asked about once.
func (v *view) isolatedBy(ms *policy.MapState, c *policy.Compiler) map[policy.EndpointID]*[2][]string {
	out := map[policy.EndpointID]*[2][]string{}
	byIdentity := map[identity.NumericID]*[2][]string{}
	for id, ref := range v.pods {
		ep := ms.Endpoints[id]
		if ep == nil {
			continue
		}
		if iso, ok := byIdentity[ep.Identity]; ok {
			if iso != nil {
				out[id] = iso
			}
			continue
		}
		var iso [2][]string
		for _, d := range []policy.Direction{policy.Ingress, policy.Egress} {
			if ep.Default[d] == policy.DefaultAllow {
				continue
			}
			for _, p := range c.IsolatedBy(ref.ns, ref.name, d) {
				iso[d] = append(iso[d], p.String())
			}
		}
		byIdentity[ep.Identity] = nil
		if iso[policy.Ingress] != nil || iso[policy.Egress] != nil {
			out[id] = &iso
			byIdentity[ep.Identity] = &iso
		}
	}
	return out
}

// podAddrs maps every known pod address to its pod, for flow records.
func (v *view) podAddrs(remote map[podRef][]netip.Addr) map[netip.Addr]flows.PodName {
	out := map[netip.Addr]flows.PodName{}
	for ref, ips := range remote {
		for _, ip := range ips {
			out[ip.Unmap()] = flows.PodName{Namespace: ref.ns, Name: ref.name}
		}
	}
	for id, rec := range v.endpoints {
		ref := v.pods[id]
		for _, ip := range rec.addrs() {
			out[ip.Unmap()] = flows.PodName{Namespace: ref.ns, Name: ref.name}
		}
	}
	return out
}
