package agent

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// kernelFixture is the real datapath, loaded under a private bpffs
// directory, with the backend pod's policy, and the real agent pipeline
// reading its ring buffer into a flow log. Packets are run through the
// to-pod program with BPF_PROG_TEST_RUN, which runs them on the loopback
// device of the test's network namespace; the fixture binds that device to
// the backend endpoint, as the datapath's own program tests do.
type kernelFixture struct {
	*pipeFixture
	dp       *datapath.Datapath
	toPod    *ebpf.Program
	lost0    uint64
	judged0  uint64
	loopDone chan struct{}
}

const loopbackIfindex = 1

func newKernelFixture(t testing.TB) *kernelFixture {
	t.Helper()
	privileged.Require(t)
	dir := testBPFFS(t)
	// Drop events are rate-limited per flow; the generator reuses source
	// ports on long runs, and a reused flow must make an event again.
	dp, err := datapath.New(datapath.Config{BPFFS: dir, DropEventInterval: time.Nanosecond})
	if err != nil {
		if errors.Is(err, datapath.ErrNotSupported) {
			privileged.Unsupported(t, "datapath: %v", err)
		}
		t.Fatalf("new datapath: %v", err)
	}
	t.Cleanup(func() {
		if err := dp.Remove(); err != nil {
			t.Errorf("remove datapath: %v", err)
		}
	})
	ms := shopMapState()
	ms.IPCache = map[netip.Prefix]identity.NumericID{
		netip.PrefixFrom(ipFrontend, 32): idFrontend,
		netip.PrefixFrom(ipBackend, 32):  idBackend,
		netip.PrefixFrom(ipDB, 32):       idDB,
	}
	ms.Endpoints = map[policy.EndpointID]*policy.EndpointPolicy{
		epBackend: {
			Identity: idBackend,
			Default:  [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultDeny},
			Entries: policy.SortEntries([]policy.Entry{{Direction: policy.Ingress, Peer: idFrontend, Proto: 6,
				PortLo: 8080, PortHi: 8080, Action: policy.ActionAllow, Rule: ruleAllow}}),
		},
	}
	if _, err := dp.Apply(ms); err != nil {
		t.Fatalf("apply: %v", err)
	}
	eps, err := ebpf.LoadPinnedMap(filepath.Join(dir, "maps", "endpoints_array"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer eps.Close()
	if err := eps.Update(uint32(loopbackIfindex), uint32(epBackend), ebpf.UpdateAny); err != nil {
		t.Fatalf("bind loopback to the endpoint: %v", err)
	}
	toPod, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "progs", "bulkhead_to_pod"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { toPod.Close() })
	rd, err := dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	fx := &kernelFixture{pipeFixture: newPipeFixture(t, dp, rd, flowlog.Config{MaxSize: 64 << 20, MaxFiles: 1000}),
		dp: dp, toPod: toPod, lost0: kernelLost(t, dp), judged0: judged(t, dp)}
	t.Cleanup(fx.stop)
	return fx
}

func kernelLost(t testing.TB, dp *datapath.Datapath) uint64 {
	t.Helper()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c.EventsLost
}

// judged is how many packets the datapath allowed or denied. In this
// fixture every one of them made an event (or tried to, into a full ring).
// It is the exact count of events generated: BPF_PROG_TEST_RUN restarts a
// run interrupted by a signal (Go preempts with SIGURG) after some of its
// repeats ran, so the runs requested undercount.
func judged(t testing.TB, dp *datapath.Datapath) uint64 {
	t.Helper()
	c, err := dp.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c.ByVerdict[policy.VerdictAllow].Packets + c.ByVerdict[policy.VerdictDeny].Packets
}

// start runs the pipeline's read loop, as the agent does.
func (fx *kernelFixture) start() {
	fx.loopDone = make(chan struct{})
	go func() { defer close(fx.loopDone); fx.pipe.readLoop() }()
}

// stop closes the reader, reports the last kernel losses and closes the log.
func (fx *kernelFixture) stop() {
	if fx.pipe == nil {
		return
	}
	fx.pipe.close()
	if fx.loopDone != nil {
		<-fx.loopDone
	}
	fx.pipe = nil
}

// tcpPacket is an Ethernet frame of a TCP segment with the given flags.
// Checksums are left zero: the program never reads them.
func tcpPacket(src, dst netip.Addr, sport, dport uint16, flags uint8) []byte {
	p := make([]byte, 14+20+20)
	binary.BigEndian.PutUint16(p[12:], 0x0800)
	ip := p[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 40)
	ip[8] = 64
	ip[9] = 6
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12] = 5 << 4
	tcp[13] = flags
	return p
}

const (
	tcpFlagSYN = 0x02
	tcpFlagRST = 0x04
	retPass    = 0xffffffff // TCX_NEXT
	retShot    = 2          // TC_ACT_SHOT
)

// generate makes n flow events, each from its own run of the program, in
// runs of repeat: distinct allowed flows from frontend to backend:8080, and
// every fifth run a denied one from db to backend:22. An allowed SYN+RST
// opens a flow and closes it, so the repeat of the same packet is a new
// flow again. It returns how many events the program made (see judged): at
// least n.
func (fx *kernelFixture) generate(t testing.TB, n, repeat int) int {
	t.Helper()
	generated := 0
	for i := 0; generated < n; i++ {
		r := min(repeat, n-generated)
		sport := uint16(1024 + i%60000)
		pkt, want := tcpPacket(ipFrontend, ipBackend, sport, 8080, tcpFlagSYN|tcpFlagRST), uint32(retPass)
		if i%5 == 4 {
			// The drop-event rate limit reads the coarse clock, so a
			// repeated denied packet makes one event: run it once.
			pkt, want, r = tcpPacket(ipDB, ipBackend, sport, 22, tcpFlagSYN), retShot, 1
		}
		ret, err := fx.toPod.Run(&ebpf.RunOptions{Data: pkt, Repeat: uint32(r)})
		if err != nil {
			t.Fatalf("prog run: %v", err)
		}
		if ret != want {
			t.Fatalf("run %d: verdict %#x, want %#x", i, ret, want)
		}
		generated += r
	}
	n2 := int(judged(t, fx.dp) - fx.judged0)
	if n2 < generated {
		t.Fatalf("the datapath judged %d packets, %d were run", n2, generated)
	}
	return n2
}

// flowsCounted is how many flows the pipeline has emitted so far.
func (fx *kernelFixture) flowsCounted(t testing.TB) uint64 {
	return uint64(counterValue(t, fx.metrics.Flows, nil))
}

// waitDrained waits until every generated event was either emitted or
// counted lost by the kernel, or the timeout passed.
func (fx *kernelFixture) waitDrained(t testing.TB, generated int, timeout time.Duration) (emitted, lost uint64) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		emitted, lost = fx.flowsCounted(t), kernelLost(t, fx.dp)-fx.lost0
		if emitted+lost >= uint64(generated) || time.Now().After(deadline) {
			return emitted, lost
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// logAccount reads every file of the flow log and returns the flow records
// and the sum of the lost_events records.
func logAccount(t testing.TB, path string) (flowLines, lostRecorded uint64) {
	t.Helper()
	files, _ := filepath.Glob(path + "*")
	for _, f := range files {
		for _, l := range readLines(t, f) {
			if n, ok := get(l, "lost_events.num_events_lost").(float64); ok {
				lostRecorded += uint64(n)
				continue
			}
			flowLines++
		}
	}
	return flowLines, lostRecorded
}

// checkAccounting asserts that no event vanished: every generated event is
// a line of the log or counted in a lost_events record, the kernel counter
// and the metric.
func (fx *kernelFixture) checkAccounting(t testing.TB, generated int) (written, lost uint64) {
	t.Helper()
	path := fx.path
	fx.stop()
	lost = kernelLost(t, fx.dp) - fx.lost0
	written, recorded := logAccount(t, path)
	if written+lost != uint64(generated) {
		t.Errorf("written %d + lost %d = %d, want %d generated", written, lost, written+lost, generated)
	}
	if recorded != lost {
		t.Errorf("lost_events records in the log sum to %d, the kernel counted %d", recorded, lost)
	}
	if got := counterValue(t, fx.metrics.LostEvents, map[string]string{"source": "kernel"}); got != float64(lost) {
		t.Errorf("bulkhead_lost_events_total{source=kernel} = %v, want %d", got, lost)
	}
	if got := counterValue(t, fx.metrics.LostEvents, map[string]string{"source": "userspace"}); got != 0 {
		t.Errorf("bulkhead_lost_events_total{source=userspace} = %v, want 0", got)
	}
	return written, lost
}

// TestFlowPipelineKernel: events from the real ring buffer reach the flow
// log with their enrichment, and every generated event is accounted for.
func TestFlowPipelineKernel(t *testing.T) {
	fx := newKernelFixture(t)
	fx.start()
	// Slower than the reader: runs of 8 events, a ring of 13,000.
	generated := fx.generate(t, 5000, 8)
	fx.waitDrained(t, generated, 10*time.Second)
	path := fx.path
	written, lost := fx.checkAccounting(t, generated)
	t.Logf("generated %d, written %d, lost %d", generated, written, lost)
	var allowed, denied int
	for _, l := range readLines(t, path) {
		switch {
		case l["verdict"] == "FORWARDED" && get(l, "source.pod_name") == "frontend-7d9f8b6c5-x2x9k" &&
			get(l, "destination.ID") == float64(epBackend) && get(l, "l4.TCP.destination_port") == float64(8080):
			if ps, _ := l["ingress_allowed_by"].([]any); len(ps) != 1 || ps[0].(map[string]any)["name"] != "backend-from-frontend" {
				t.Fatalf("allowed flow without its policy: %v", l)
			}
			allowed++
		case l["verdict"] == "DROPPED" && get(l, "source.pod_name") == "db-0" && l["drop_reason_desc"] == flows.DropPolicyDenied:
			denied++
		default:
			t.Fatalf("unexpected record %v", l)
		}
	}
	if allowed == 0 || denied == 0 {
		t.Fatalf("%d allowed and %d denied records", allowed, denied)
	}
}

// TestFlowPipelineKernelOverflow (issue 5): the ring is overfilled on
// purpose while the reader is paused. The loss shows in the kernel
// counter, as a lost_events record in the flow log and in the stream, and
// in bulkhead_lost_events_total{source="kernel"}; what was not lost is
// written.
func TestFlowPipelineKernelOverflow(t *testing.T) {
	fx := newKernelFixture(t)
	_, sub := fx.hub.Subscribe(0, flows.Selector{}, 1<<16)
	defer sub.Close()
	// The ring holds 1 MiB / (72+8) bytes = 13,107 events.
	generated := fx.generate(t, 30000, 64)
	if lost := kernelLost(t, fx.dp) - fx.lost0; lost == 0 {
		t.Fatalf("the kernel counted no loss after %d events into a paused reader", generated)
	}
	fx.start()
	fx.waitDrained(t, generated, 10*time.Second)
	fx.pipe.checkKernelLoss() // as the agent's ticker does
	written, lost := fx.checkAccounting(t, generated)
	t.Logf("generated %d, written %d, lost %d", generated, written, lost)
	if lost == 0 || written == 0 {
		t.Fatalf("written %d, lost %d: want both", written, lost)
	}
	var streamLost uint64
	var streamFlows int
	for len(sub.C()) > 0 {
		it := <-sub.C()
		if it.Lost != nil {
			if it.Lost.Source != "kernel" {
				t.Fatalf("lost marker from %q", it.Lost.Source)
			}
			streamLost += it.Lost.NumEventsLost
		} else {
			streamFlows++
		}
	}
	if streamLost != lost || uint64(streamFlows) != written {
		t.Fatalf("stream: %d flows and %d lost, want %d and %d", streamFlows, streamLost, written, lost)
	}
}

// BenchmarkFlowPipelineKernel measures the agent's flow path end to end:
// events made by the datapath program (BPF_PROG_TEST_RUN, as fast as the
// kernel makes them), the ring buffer, the reader, the pipeline, the log
// file. It reports what reached the file per second, and what the kernel
// lost because the reader did not keep up; written + lost must equal
// generated.
//
//	BULKHEAD_PRIVILEGED=1 go test ./agent -run '^$' -bench FlowPipelineKernel -benchtime 500000x
func BenchmarkFlowPipelineKernel(b *testing.B) {
	for _, repeat := range []int{1, 16} {
		b.Run("repeat="+strconv.Itoa(repeat), func(b *testing.B) {
			fx := newKernelFixture(b)
			fx.start()
			b.ResetTimer()
			generated := fx.generate(b, b.N, repeat)
			genTime := b.Elapsed()
			fx.waitDrained(b, generated, 30*time.Second)
			b.StopTimer()
			elapsed := b.Elapsed()
			written, lost := fx.checkAccounting(b, generated)
			b.ReportMetric(float64(generated)/genTime.Seconds(), "generated/s")
			b.ReportMetric(float64(written)/elapsed.Seconds(), "written/s")
			b.ReportMetric(float64(lost), "lost")
			b.ReportMetric(100*float64(lost)/float64(generated), "lost-%")
		})
	}
}
