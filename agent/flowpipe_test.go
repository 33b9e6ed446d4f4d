package agent

import (
	"bufio"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// A small shop: frontend → backend:8080 allowed by a NetworkPolicy rule,
// frontend → db:5432 denied by an explicit BulkheadPolicy deny rule, and
// everything else to backend denied by default.
const (
	idFrontend = identity.NumericID(1001)
	idBackend  = identity.NumericID(1002)
	idDB       = identity.NumericID(1003)
	epFrontend = policy.EndpointID(11)
	epBackend  = policy.EndpointID(12)
	epDB       = policy.EndpointID(13)
	ruleAllow  = policy.RuleID(7)
	ruleDeny   = policy.RuleID(9)
)

var (
	ipFrontend = netip.MustParseAddr("10.244.1.10")
	ipBackend  = netip.MustParseAddr("10.244.1.20")
	ipDB       = netip.MustParseAddr("10.244.1.30")
)

func shopMapState() *policy.MapState {
	return &policy.MapState{
		Revision: 42,
		Rules: map[policy.RuleID]policy.RuleInfo{
			ruleAllow: {Kind: "NetworkPolicy", Namespace: "shop", Name: "backend-from-frontend", Direction: policy.Ingress, Action: policy.ActionAllow},
			ruleDeny:  {Kind: "BulkheadPolicy", Namespace: "shop", Name: "db-lockdown", Direction: policy.Ingress, Index: 1, Action: policy.ActionDeny},
		},
	}
}

func shopContext() *flows.Context {
	pod := func(id identity.NumericID, app, sa string) policy.IdentityInfo {
		return policy.IdentityInfo{ID: id, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/" + sa,
			Labels: identity.Labels{Namespace: "shop", ServiceAccount: sa,
				PodLabels: map[string]string{"app": app, "tier": "web", "version": "v1.4.2"}}}
	}
	ids := []policy.IdentityInfo{pod(idFrontend, "frontend", "frontend"), pod(idBackend, "backend", "backend"), pod(idDB, "db", "db")}
	pods := map[netip.Addr]flows.PodName{
		ipFrontend: {Namespace: "shop", Name: "frontend-7d9f8b6c5-x2x9k"},
		ipBackend:  {Namespace: "shop", Name: "backend-5c6d7e8f9-abcde"},
		ipDB:       {Namespace: "shop", Name: "db-0"},
	}
	return flows.NewContext(shopMapState(), ids, pods)
}

// shopEvents are the events of pod-to-pod TCP traffic: allowed connections
// (new on the client's egress and the server's ingress, replies, ends), a
// default deny and an explicit deny.
func shopEvents(n int) []datapath.FlowEvent {
	out := make([]datapath.FlowEvent, 0, n)
	ts := uint64(1_000_000_000_000)
	for i := 0; len(out) < n; i++ {
		sport := uint16(32768 + i%28000)
		ts += 1500
		allowEgress := datapath.FlowEvent{Type: datapath.EventFlowNew, Timestamp: ts, Endpoint: epFrontend, Ifindex: 20,
			Direction: policy.Egress, Verdict: policy.VerdictAllow, Rule: ruleAllow, Proto: 6,
			Src: ipFrontend, Dst: ipBackend, SrcPort: sport, DstPort: 8080,
			SrcIdentity: idFrontend, DstIdentity: idBackend, TCPFlags: 0x02}
		allowIngress := allowEgress
		allowIngress.Endpoint, allowIngress.Ifindex, allowIngress.Direction = epBackend, 21, policy.Ingress
		end := allowIngress
		end.Type, end.TCPFlags = datapath.EventFlowEnd, 0x11|0x02|0x10
		defaultDeny := datapath.FlowEvent{Type: datapath.EventDrop, Timestamp: ts, Endpoint: epBackend, Ifindex: 21,
			Direction: policy.Ingress, Verdict: policy.VerdictDeny, DropReason: datapath.DropPolicy, Rule: policy.RuleDefault,
			Proto: 6, Src: ipDB, Dst: ipBackend, SrcPort: sport, DstPort: 22, SrcIdentity: idDB, DstIdentity: idBackend, TCPFlags: 0x02}
		explicitDeny := datapath.FlowEvent{Type: datapath.EventDrop, Timestamp: ts, Endpoint: epDB, Ifindex: 22,
			Direction: policy.Ingress, Verdict: policy.VerdictDeny, DropReason: datapath.DropPolicy, Rule: ruleDeny,
			Proto: 6, Src: ipFrontend, Dst: ipDB, SrcPort: sport, DstPort: 5432, SrcIdentity: idFrontend, DstIdentity: idDB, TCPFlags: 0x02}
		out = append(out, allowEgress, allowIngress, end, defaultDeny, explicitDeny)
	}
	return out[:n]
}

// rawEvents replays ring-buffer records: each Read decodes the next one,
// as the datapath's EventReader does with what it reads from the ring.
type rawEvents struct {
	raw  [][]byte
	next int
	left int
}

func newRawEvents(evs []datapath.FlowEvent, total int) *rawEvents {
	r := &rawEvents{left: total}
	for i := range evs {
		r.raw = append(r.raw, datapath.AppendEvent(nil, &evs[i]))
	}
	return r
}

func (r *rawEvents) Read() (datapath.FlowEvent, error) {
	if r.left == 0 {
		return datapath.FlowEvent{}, datapath.ErrClosed
	}
	r.left--
	raw := r.raw[r.next]
	if r.next++; r.next == len(r.raw) {
		r.next = 0
	}
	return datapath.DecodeEvent(raw)
}

func (r *rawEvents) Close() error { return nil }

// fakeDatapath counts kernel losses as a test says.
type fakeDatapath struct{ lost atomic.Uint64 }

func (d *fakeDatapath) Counters() (datapath.Counters, error) {
	return datapath.Counters{EventsLost: d.lost.Load()}, nil
}

func (d *fakeDatapath) GC() (int, []datapath.FlowEvent, error) { return 0, nil, nil }

type pipeFixture struct {
	pipe    *flowPipe
	hub     *flows.Hub
	metrics *metrics.Metrics
	path    string
}

func newPipeFixture(tb testing.TB, dp flowDatapath, src eventSource, logCfg flowlog.Config) *pipeFixture {
	return newFilteredPipeFixture(tb, dp, src, logCfg, flows.Selector{})
}

func newFilteredPipeFixture(tb testing.TB, dp flowDatapath, src eventSource, logCfg flowlog.Config, sel flows.Selector) *pipeFixture {
	tb.Helper()
	logCfg.Path = filepath.Join(tb.TempDir(), "flows.log")
	w, err := flowlog.Open(logCfg)
	if err != nil {
		tb.Fatal(err)
	}
	en := flows.NewEnricher("node-a")
	en.SetContext(shopContext())
	fx := &pipeFixture{hub: flows.NewHub(4096, "node-a"), metrics: metrics.New(nil), path: logCfg.Path}
	fx.pipe = newFlowPipe(flowPipeConfig{Datapath: dp, Events: src, Enricher: en, Hub: fx.hub,
		Metrics: fx.metrics, NodeName: "node-a", Format: "json", FlowLog: w, LogFilter: sel})
	return fx
}

// lines reads every line of the log.
func readLines(tb testing.TB, path string) []map[string]any {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			tb.Fatalf("line %d is not JSON: %v: %s", len(out)+1, err, sc.Bytes())
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

func counterValue(tb testing.TB, c prometheus.Collector, labels map[string]string) float64 {
	tb.Helper()
	ch := make(chan prometheus.Metric, 64)
	go func() { c.Collect(ch); close(ch) }()
	var sum float64
	found := false
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			tb.Fatal(err)
		}
		match := true
		for _, lp := range d.GetLabel() {
			if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
				match = false
			}
		}
		if match && d.Counter != nil {
			sum += d.Counter.GetValue()
			found = true
		}
	}
	if !found && len(labels) > 0 {
		return 0
	}
	return sum
}

func get(m map[string]any, path string) any {
	var v any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}

// TestFlowPipeRecords drives the real read loop over recorded ring-buffer
// records and checks the log, the hub and the metrics.
func TestFlowPipeRecords(t *testing.T) {
	evs := shopEvents(5)
	fx := newPipeFixture(t, &fakeDatapath{}, newRawEvents(evs, 50), flowlog.Config{})
	fx.pipe.readLoop()
	fx.pipe.close()
	lines := readLines(t, fx.path)
	if len(lines) != 50 {
		t.Fatalf("%d lines, want 50", len(lines))
	}
	for i, c := range []struct {
		verdict, direction, deniedBy, allowedBy, srcPod, dstPod string
	}{
		{"FORWARDED", "EGRESS", "", "egress_allowed_by", "frontend-7d9f8b6c5-x2x9k", "backend-5c6d7e8f9-abcde"},
		{"FORWARDED", "INGRESS", "", "ingress_allowed_by", "frontend-7d9f8b6c5-x2x9k", "backend-5c6d7e8f9-abcde"},
		{"FORWARDED", "INGRESS", "", "ingress_allowed_by", "frontend-7d9f8b6c5-x2x9k", "backend-5c6d7e8f9-abcde"},
		{"DROPPED", "INGRESS", "ingress_denied_by", "", "db-0", "backend-5c6d7e8f9-abcde"},
		{"DROPPED", "INGRESS", "ingress_denied_by", "", "frontend-7d9f8b6c5-x2x9k", "db-0"},
	} {
		l := lines[i]
		if l["verdict"] != c.verdict || l["traffic_direction"] != c.direction ||
			get(l, "source.pod_name") != c.srcPod || get(l, "destination.pod_name") != c.dstPod {
			t.Errorf("line %d: %v", i, l)
		}
		key := c.allowedBy + c.deniedBy
		if ps, _ := l[key].([]any); len(ps) != 1 {
			t.Errorf("line %d: no %s: %v", i, key, l)
		}
	}
	if got := get(lines[4], "ingress_denied_by"); got.([]any)[0].(map[string]any)["name"] != "db-lockdown" {
		t.Errorf("explicit deny names %v", got)
	}
	if got := get(lines[3], "ingress_denied_by"); got.([]any)[0].(map[string]any)["name"] != "default-deny" {
		t.Errorf("default deny names %v", got)
	}
	if got := get(lines[0], "source.spiffe_id"); got != "spiffe://cluster.local/ns/shop/sa/frontend" {
		t.Errorf("spiffe_id %v", got)
	}
	if got := counterValue(t, fx.metrics.Flows, map[string]string{"verdict": "DROPPED", "direction": "INGRESS"}); got != 20 {
		t.Errorf("flows_total DROPPED INGRESS = %v, want 20", got)
	}
	if got := counterValue(t, fx.metrics.Flows, map[string]string{"verdict": "FORWARDED", "direction": "EGRESS"}); got != 10 {
		t.Errorf("flows_total FORWARDED EGRESS = %v, want 10", got)
	}
	if got := counterValue(t, fx.metrics.Drops, map[string]string{"reason": flows.DropPolicyDeny}); got != 10 {
		t.Errorf("drops_total POLICY_DENY = %v, want 10", got)
	}
	if got := counterValue(t, fx.metrics.PolicyVerdicts, map[string]string{"policy": "backend-from-frontend", "verdict": "FORWARDED"}); got != 30 {
		t.Errorf("policy_verdicts_total backend-from-frontend = %v, want 30", got)
	}
	if got := len(fx.hub.Last(0, nil)); got != 50 {
		t.Errorf("hub holds %d flows, want 50", got)
	}
}

// TestFlowPipeLogFilters: the flow log keeps what the allow list matches
// and the deny list does not, as Hubble's exporter filters; the stream and
// metrics still see every record.
func TestFlowPipeLogFilters(t *testing.T) {
	sel := flows.Selector{
		Allow: []flows.Filter{{Verdicts: []string{flows.VerdictDropped}}},
		Deny:  []flows.Filter{{ToPods: []string{"shop/db-0"}}},
	}
	fx := newFilteredPipeFixture(t, &fakeDatapath{}, newRawEvents(shopEvents(5), 50), flowlog.Config{}, sel)
	fx.pipe.readLoop()
	fx.pipe.close()
	lines := readLines(t, fx.path)
	// Of every 5 events, 2 are drops and one of them goes to db: 10 lines.
	if len(lines) != 10 {
		t.Fatalf("%d lines, want the 10 drops not to db", len(lines))
	}
	for _, l := range lines {
		if l["verdict"] != "DROPPED" || get(l, "destination.pod_name") == "db-0" {
			t.Fatalf("filtered log has %v", l)
		}
	}
	if got := len(fx.hub.Last(0, nil)); got != 50 {
		t.Errorf("hub holds %d flows, want all 50", got)
	}
}

// TestFlowPipeKernelLoss: losses the datapath counts become a lost_events
// record in the log at the point of the gap, a marker in streams, and the
// kernel series of the metric.
func TestFlowPipeKernelLoss(t *testing.T) {
	dp := &fakeDatapath{}
	dp.lost.Store(5) // before this pipe: not reported
	fx := newPipeFixture(t, dp, newRawEvents(shopEvents(5), 3), flowlog.Config{})
	_, sub := fx.hub.Subscribe(0, flows.Selector{}, 100)
	defer sub.Close()
	fx.pipe.readLoop()
	dp.lost.Add(17)
	fx.pipe.checkKernelLoss()
	fx.pipe.checkKernelLoss() // nothing new: no second record
	fx.pipe.events = newRawEvents(shopEvents(5), 2)
	fx.pipe.readLoop()
	fx.pipe.close()
	lines := readLines(t, fx.path)
	if len(lines) != 6 {
		t.Fatalf("%d lines, want 6", len(lines))
	}
	if got := get(lines[3], "lost_events.num_events_lost"); got != float64(17) {
		t.Fatalf("line 4 is %v, want a lost_events record of 17", lines[3])
	}
	if got := get(lines[3], "lost_events.source"); got != "kernel" {
		t.Fatalf("lost_events source %v", got)
	}
	if got := counterValue(t, fx.metrics.LostEvents, map[string]string{"source": "kernel"}); got != 17 {
		t.Fatalf("lost_events_total{source=kernel} = %v, want 17", got)
	}
	var items []flows.Item
	for len(sub.C()) > 0 {
		items = append(items, <-sub.C())
	}
	if len(items) != 6 || items[3].Lost == nil || items[3].Lost.NumEventsLost != 17 {
		t.Fatalf("stream %+v, want 3 flows, a lost marker of 17, 2 flows", items)
	}
}

// TestFlowPipeUserspaceLoss: a follower too slow for the pipeline loses
// flows; they are counted in the userspace series.
func TestFlowPipeUserspaceLoss(t *testing.T) {
	fx := newPipeFixture(t, &fakeDatapath{}, newRawEvents(shopEvents(5), 10), flowlog.Config{})
	_, sub := fx.hub.Subscribe(0, flows.Selector{}, 4)
	defer sub.Close()
	fx.pipe.readLoop()
	fx.pipe.close()
	if got := counterValue(t, fx.metrics.LostEvents, map[string]string{"source": "userspace"}); got != 6 {
		t.Fatalf("lost_events_total{source=userspace} = %v, want 6", got)
	}
}

// TestFlowPipeShortRecord: a record too short to decode is a userspace
// loss, and the loop goes on.
func TestFlowPipeShortRecord(t *testing.T) {
	src := newRawEvents(shopEvents(2), 4)
	src.raw[1] = src.raw[1][:10]
	fx := newPipeFixture(t, &fakeDatapath{}, src, flowlog.Config{})
	fx.pipe.readLoop()
	fx.pipe.close()
	if n := len(readLines(t, fx.path)); n != 2 {
		t.Fatalf("%d lines, want 2", n)
	}
	if got := counterValue(t, fx.metrics.LostEvents, map[string]string{"source": "userspace"}); got != 2 {
		t.Fatalf("lost_events_total{source=userspace} = %v, want 2", got)
	}
}

// TestFlowPipeEmitAllocs pins the per-event allocations of the hot path:
// the record itself, which the hub keeps.
func TestFlowPipeEmitAllocs(t *testing.T) {
	evs := shopEvents(5)
	fx := newPipeFixture(t, &fakeDatapath{}, newRawEvents(nil, 0), flowlog.Config{})
	defer fx.pipe.close()
	i := 0
	allocs := testing.AllocsPerRun(1000, func() {
		fx.pipe.emit(&evs[i%len(evs)])
		i++
	})
	if allocs > 1 {
		t.Fatalf("emit allocates %v times per event, want 1", allocs)
	}
}

// TestFlowPipeConcurrentEmit: the GC ticker emits alongside the reader.
func TestFlowPipeConcurrentEmit(t *testing.T) {
	evs := shopEvents(5)
	fx := newPipeFixture(t, &fakeDatapath{}, newRawEvents(nil, 0), flowlog.Config{MaxSize: 64 << 10, MaxFiles: 100})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range 200 {
				fx.pipe.emit(&evs[i%len(evs)])
			}
		})
	}
	wg.Wait()
	fx.pipe.close()
	total := 0
	matches, _ := filepath.Glob(fx.path + "*")
	for _, m := range matches {
		total += len(readLines(t, m))
	}
	if total != 800 {
		t.Fatalf("%d lines in %d files, want 800", total, len(matches))
	}
}

// BenchmarkFlowPipeline is the agent's flow path for one event: decode of a
// ring-buffer record, enrich, metrics, JSON, the rotating log file, the hub.
// It runs the real read loop over recorded records, and reports events/s
// and, as the machine-independent figure, the ratio of its time per event
// to that of writing the same lines, already encoded, to the same kind of
// file (measured in the same run). Pin it to one core:
//
//	taskset -c 1 go test ./agent -run '^$' -bench 'FlowPipeline$' -benchmem
func BenchmarkFlowPipeline(b *testing.B) {
	evs := shopEvents(1000)
	// The agent's default rotation (--flow-log-max-size 100 MiB, 5 files)
	// would fill the disk on long runs; 64 MiB × 2 still rotates.
	logCfg := flowlog.Config{MaxSize: 64 << 20, MaxFiles: 2}
	baseline := writeOnlyNsPerLine(b, evs, logCfg)

	src := newRawEvents(evs, 0)
	fx := newPipeFixture(b, &fakeDatapath{}, src, logCfg)
	fx.pipe.emit(&evs[0]) // warm the caches and the buffer
	b.ReportAllocs()
	b.ResetTimer()
	src.left = b.N
	fx.pipe.readLoop()
	fx.pipe.flush()
	b.StopTimer()
	perEvent := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(1e9/perEvent, "events/s")
	b.ReportMetric(perEvent/baseline, "x-write-only")
	fx.pipe.close()
	if src.left != 0 {
		b.Fatal("read loop stopped early")
	}
}

// writeOnlyNsPerLine is the baseline of BenchmarkFlowPipeline: the median
// of three runs writing the pipeline's lines, encoded beforehand.
func writeOnlyNsPerLine(b *testing.B, evs []datapath.FlowEvent, cfg flowlog.Config) float64 {
	b.Helper()
	en := flows.NewEnricher("node-a")
	en.SetContext(shopContext())
	var lines [][]byte
	for i := range evs {
		lines = append(lines, en.Enrich(&evs[i]).AppendJSON(nil))
	}
	const n = 200000
	var runs []float64
	for r := range 3 {
		cfg.Path = filepath.Join(b.TempDir(), "baseline-"+strconv.Itoa(r)+".log")
		w, err := flowlog.Open(cfg)
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for i := range n {
			if err := w.WriteLine(lines[i%len(lines)]); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		runs = append(runs, float64(time.Since(start).Nanoseconds())/n)
		w.Close()
	}
	slices.Sort(runs)
	return runs[1]
}
