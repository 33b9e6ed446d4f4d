package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
	rtmon "github.com/bulkhead-io/bulkhead/runtime"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// --runtime-detection end to end: an ADD makes the agent watch the pod's
// netns, a bpf() call from inside the pod becomes an alert line in the flow
// log naming the pod, and after DEL the pod's syscalls are no longer sent.
func TestRuntimeDetectionAlertsToFlowLog(t *testing.T) {
	privileged.Require(t)
	// Registered first, so it runs after the agent has stopped.
	unmountTracefsAfter(t)
	flowLog := filepath.Join(t.TempDir(), "flows.log")
	a, store := newTestAgentWith(t, func(c *Config) { c.RuntimeDetection, c.FlowLog = true, flowLog })
	pod := "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: web}\n"
	if err := os.WriteFile(filepath.Join(store, "web.yaml"), []byte(pod), 0o644); err != nil {
		t.Fatal(err)
	}
	startTestAgent(t, a)
	status, err := a.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	features := map[string]string{}
	for _, f := range status.Features {
		features[f.Name] = f.State
	}
	if mp := features["runtime-module-hook"]; mp == "" || mp != string(a.sysmon.mon.ModulePath()) || features["runtime-tracepoint"] != "yes" {
		t.Errorf("status features %v: want the runtime probes and module hook %q", features, a.sysmon.mon.ModulePath())
	}
	for _, h := range []string{"syscalls/sys_enter_chroot", "syscalls/sys_enter_setuid", "syscalls/sys_enter_capset"} {
		if features["runtime-"+h] != "attached" {
			t.Errorf("status feature runtime-%s = %q, want attached", h, features["runtime-"+h])
		}
	}
	req := podVeth(t, "c0ffee61", "web", "10.213.6.1/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	var nsSt unix.Stat_t
	if err := unix.Stat(req.Netns, &nsSt); err != nil {
		t.Fatal(err)
	}
	ino := uint32(nsSt.Ino)
	waitWatched(t, a.sysmon.mon, ino, true)

	tid := bpfFromPod(t, req.Netns)
	al := waitAlert(t, flowLog, func(al detect.Alert) bool { return al.TID == tid })
	if al.RuleID != detect.RuleBPF.ID || al.Technique != "T1014" || al.Syscall != "bpf" || al.EventKind != "alert" ||
		al.Pod.Namespace != "shop" || al.Pod.Pod != "web" || al.Pod.ID != "c0ffee61" || al.Pod.Netns != ino ||
		al.Pod.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/web" || al.PID != uint32(os.Getpid()) {
		t.Errorf("alert %+v", al)
	}

	var counted dto.Metric
	if err := a.sysmon.alerts.WithLabelValues(detect.RuleBPF.ID, "T1014", "alert").Write(&counted); err != nil {
		t.Fatal(err)
	}
	if n := counted.GetCounter().GetValue(); n < 1 {
		t.Errorf("bulkhead_runtime_alerts_total for %s is %v", detect.RuleBPF.ID, n)
	}
	mfs, err := a.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sentMetric := -1.0
	for _, mf := range mfs {
		if mf.GetName() == "bulkhead_runtime_events_total" {
			for _, m := range mf.GetMetric() {
				if m.GetLabel()[0].GetValue() == "sent" {
					sentMetric = m.GetCounter().GetValue()
				}
			}
		}
	}
	if sentMetric < 1 {
		t.Errorf("bulkhead_runtime_events_total{result=sent} is %v", sentMetric)
	}
	if _, err := a.DeleteEndpoint(context.Background(), api.EndpointDelRequest{EndpointKey: req.EndpointKey, Netns: req.Netns}); err != nil {
		t.Fatal(err)
	}
	waitWatched(t, a.sysmon.mon, ino, false)
	before, err := a.sysmon.mon.Counters()
	if err != nil {
		t.Fatal(err)
	}
	bpfFromPod(t, req.Netns)
	after, err := a.sysmon.mon.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if after.Sent != before.Sent || after.Unwatched == before.Unwatched {
		t.Errorf("after DEL: counters %+v → %+v; want the pod's bpf() dropped in the kernel", before, after)
	}
}

// runtimePod starts an agent with runtime detection (tune says where its
// alerts go) and the pod shop/web in its store, adds the pod's endpoint
// (container, ip) and waits until its netns is watched. It returns the
// agent, the ADD, and what stops the agent before the test ends.
func runtimePod(t testing.TB, container, ip string, tune func(*Config)) (*Agent, api.EndpointAddRequest, func()) {
	t.Helper()
	a, store := newTestAgentWith(t, func(c *Config) {
		c.RuntimeDetection = true
		tune(c)
	})
	pod := "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: web}\n"
	if err := os.WriteFile(filepath.Join(store, "web.yaml"), []byte(pod), 0o644); err != nil {
		t.Fatal(err)
	}
	stop := startTestAgent(t, a)
	req := podVeth(t, container, "web", ip)
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	var nsSt unix.Stat_t
	if err := unix.Stat(req.Netns, &nsSt); err != nil {
		t.Fatal(err)
	}
	waitWatched(t, a.sysmon.mon, uint32(nsSt.Ino), true)
	return a, req, stop
}

// bpfFromPod calls bpf(BPF_MAP_CREATE, NULL, 0), which the kernel refuses,
// from a thread inside the pod's netns, and returns the thread's ID.
func bpfFromPod(t testing.TB, netns string) uint32 { return bpfBurstFromPod(t, netns, 1) }

// bpfBurstFromPod makes n bpf() calls from one thread in the pod's netns,
// and returns the thread's ID.
func bpfBurstFromPod(t testing.TB, netns string, n int) uint32 {
	t.Helper()
	var tid int
	err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
		tid = unix.Gettid()
		for range n {
			unix.Syscall(unix.SYS_BPF, 0, 0, 0)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return uint32(tid)
}

func waitWatched(t testing.TB, m *rtmon.Monitor, ino uint32, want bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, ok := m.Endpoint(ino); ok == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netns %d watched: want %v after 10s", ino, want)
		}
	}
}

// waitAlert reads the flow log until an alert line satisfies want.
func waitAlert(t *testing.T, path string, want func(detect.Alert) bool) detect.Alert {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if !strings.Contains(sc.Text(), `"event_kind":"alert"`) {
					continue
				}
				var al detect.Alert
				if err := json.Unmarshal(sc.Bytes(), &al); err != nil {
					t.Fatalf("alert line %s: %v", sc.Text(), err)
				}
				if want(al) {
					f.Close()
					return al
				}
			}
			f.Close()
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			t.Fatalf("no matching alert in the flow log after 10s:\n%s", b)
		}
	}
}

// A BulkheadRuntimePolicy in the dir store reaches the kernel: with Block
// for BH-RT-008, a raw socket from inside the selected pod fails with EPERM
// and the alert says "block"; once the policy file is gone the pod is back
// to Alert and the same socket opens. Repeats of one alert are folded into
// a counted line.
func TestRuntimePolicyBlocksThroughStore(t *testing.T) {
	privileged.Require(t)
	unmountTracefsAfter(t)
	flowLog := filepath.Join(t.TempDir(), "flows.log")
	a, store := newTestAgentWith(t, func(c *Config) {
		c.RuntimeDetection, c.FlowLog, c.RuntimeResync = true, flowLog, 100*time.Millisecond
	})
	pod := "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {serviceAccountName: web}\n"
	rp := `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: no-sniffing, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: web}}}
  detections:
  - {rule: BH-RT-008, action: Block}
`
	if err := os.WriteFile(filepath.Join(store, "web.yaml"), []byte(pod), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, "runtime.yaml"), []byte(rp), 0o644); err != nil {
		t.Fatal(err)
	}
	startTestAgent(t, a)
	if err := a.sysmon.mon.CgroupHooks()[rtmon.HookSockCreate]; err != nil {
		privileged.Unsupported(t, "sock_create hook: %v", err)
	}
	req := podVeth(t, "c0ffee62", "web", "10.213.6.2/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	var nsSt unix.Stat_t
	if err := unix.Stat(req.Netns, &nsSt); err != nil {
		t.Fatal(err)
	}
	ino := uint32(nsSt.Ino)
	waitActions(t, a, ino, detect.Actions{Block: detect.Bit(detect.RuleRawSocket.ID)})

	tid, err := rawSocketFromPod(t, req.Netns)
	if !errors.Is(err, unix.EPERM) {
		t.Fatalf("raw socket in a pod under Block: %v, want EPERM", err)
	}
	al := waitAlert(t, flowLog, func(al detect.Alert) bool { return al.TID == tid })
	if al.RuleID != detect.RuleRawSocket.ID || al.Action != "block" || al.ActionResult != "denied" || al.Technique != "T1040" ||
		al.Pod.Pod != "web" || al.Count != 1 {
		t.Errorf("alert %+v", al)
	}
	if n := eventsMetric(t, a, "blocked"); n < 1 {
		t.Errorf("bulkhead_runtime_events_total{result=blocked} is %v", n)
	}

	if err := os.Remove(filepath.Join(store, "runtime.yaml")); err != nil {
		t.Fatal(err)
	}
	waitActions(t, a, ino, detect.Actions{})
	// The thread may be the one before: the line is told apart by time.
	since := time.Now()
	tid, err = rawSocketFromPod(t, req.Netns)
	if err != nil {
		t.Fatalf("raw socket after the policy is gone: %v, want success", err)
	}
	al = waitAlert(t, flowLog, func(al detect.Alert) bool { return al.TID == tid && !al.Time.Before(since) })
	if al.Action != "alert" {
		t.Errorf("alert after the policy is gone: %+v", al)
	}

	// A burst of one process's identical calls: the first line at once,
	// the rest in one counted line at the window's end (10 s by default;
	// this waits for it, it asserts nothing about time).
	const n = 50
	since = time.Now()
	burstTID := bpfBurstFromPod(t, req.Netns, n)
	var lines []detect.Alert
	deadline := time.Now().Add(30 * time.Second)
	for {
		lines = lines[:0]
		total := 0
		readAlerts(t, flowLog, func(al detect.Alert) {
			if al.TID == burstTID && al.RuleID == detect.RuleBPF.ID && !al.Time.Before(since) {
				lines = append(lines, al)
				total += al.Count
			}
		})
		if total == n {
			break
		}
		if total > n || time.Now().After(deadline) {
			t.Fatalf("burst of %d: lines %+v (counts add up to %d)", n, lines, total)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(lines) != 2 || lines[0].Count != 1 || lines[1].Count != n-1 || lines[1].FirstTime == nil {
		t.Errorf("burst of %d: %d lines %+v, want 1 then a line with count %d", n, len(lines), lines, n-1)
	}
}

// The alerts the aggregator still holds when the agent stops (the repeats
// of a burst, within their window) are written before the flow log
// closes: the line counts add up to the events, as they do while it runs.
func TestRuntimeAlertsFlushedAtStop(t *testing.T) {
	privileged.Require(t)
	unmountTracefsAfter(t)
	flowLog := filepath.Join(t.TempDir(), "flows.log")
	_, req, stop := runtimePod(t, "c0ffee63", "10.213.6.3/32", func(c *Config) { c.FlowLog = flowLog })
	const n = 20
	tid := bpfBurstFromPod(t, req.Netns, n)
	// The first line goes out at once; the repeats wait for the window's
	// end, 10 s away, unless the agent writes them as it stops.
	waitAlert(t, flowLog, func(al detect.Alert) bool { return al.TID == tid && al.RuleID == detect.RuleBPF.ID })
	stop()
	total := 0
	readAlerts(t, flowLog, func(al detect.Alert) {
		if al.TID == tid && al.RuleID == detect.RuleBPF.ID {
			total += al.Count
		}
	})
	if total != n {
		t.Errorf("after the stop the flow log's alert lines count %d events, want %d", total, n)
	}
}

func waitActions(t *testing.T, a *Agent, ino uint32, want detect.Actions) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if ep, ok := a.sysmon.mon.Endpoint(ino); ok && ep.Actions == want {
			return
		}
		if time.Now().After(deadline) {
			ep, _ := a.sysmon.mon.Endpoint(ino)
			t.Fatalf("netns %d actions %+v, want %+v after 10s", ino, ep.Actions, want)
		}
	}
}

// rawSocketFromPod opens (and closes) a raw ICMP socket from a thread in
// the pod's netns, and returns the thread's ID and socket(2)'s error.
func rawSocketFromPod(t *testing.T, netns string) (uint32, error) {
	t.Helper()
	var tid int
	var serr error
	if err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
		tid = unix.Gettid()
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err == nil {
			unix.Close(fd)
		}
		serr = err
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return uint32(tid), serr
}

func readAlerts(t *testing.T, path string, each func(detect.Alert)) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if !strings.Contains(sc.Text(), `"event_kind":"alert"`) {
			continue
		}
		var al detect.Alert
		if err := json.Unmarshal(sc.Bytes(), &al); err != nil {
			t.Fatalf("alert line %s: %v", sc.Text(), err)
		}
		each(al)
	}
}

func eventsMetric(t *testing.T, a *Agent, result string) float64 {
	t.Helper()
	mfs, err := a.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "bulkhead_runtime_events_total" {
			for _, m := range mf.GetMetric() {
				if m.GetLabel()[0].GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return -1
}

// TestRuntimePolicyWithDetectionOff: a BulkheadRuntimePolicy that nothing
// would enforce (runtime detection off) is named in `bulkhead status`, and
// goes from it when the policy goes.
func TestRuntimePolicyWithDetectionOff(t *testing.T) {
	privileged.Require(t)
	a, store := newTestAgentWith(t, func(c *Config) { c.RuntimeDetection = false })
	rp := `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadRuntimePolicy
metadata: {name: no-sniffing, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: web}}}
  detections:
  - {rule: BH-RT-008, action: Block}
`
	if err := os.WriteFile(filepath.Join(store, "runtime.yaml"), []byte(rp), 0o644); err != nil {
		t.Fatal(err)
	}
	startTestAgent(t, a)
	st, err := a.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.PolicyErrors) != 1 || st.PolicyErrors[0].Policy != "BulkheadRuntimePolicy shop/no-sniffing" ||
		!strings.Contains(st.PolicyErrors[0].Message, "--runtime-detection") {
		t.Fatalf("status policy errors %+v, want the runtime policy named as not enforced", st.PolicyErrors)
	}
	if err := os.Remove(filepath.Join(store, "runtime.yaml")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err = a.Status(context.Background())
		if err == nil && len(st.PolicyErrors) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status policy errors after the policy went: %+v (%v)", st.PolicyErrors, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// unmountTracefsAfter unmounts, when t ends, the tracefs that the agent
// will mount because none is mounted now.
func unmountTracefsAfter(t testing.TB) {
	var st unix.Statfs_t
	if err := unix.Statfs(rtmon.StandardTracefs, &st); err == nil && uint32(st.Type) != unix.TRACEFS_MAGIC {
		t.Cleanup(func() {
			if err := unix.Unmount(rtmon.StandardTracefs, 0); err != nil {
				t.Errorf("unmount the tracefs the agent mounted: %v", err)
			}
		})
	}
}
