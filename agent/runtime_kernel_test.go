package agent

import (
	"bufio"
	"context"
	"encoding/json"
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
	var st unix.Statfs_t
	if err := unix.Statfs(rtmon.StandardTracefs, &st); err == nil && uint32(st.Type) != unix.TRACEFS_MAGIC {
		t.Cleanup(func() {
			if err := unix.Unmount(rtmon.StandardTracefs, 0); err != nil {
				t.Errorf("unmount the tracefs the agent mounted: %v", err)
			}
		})
	}
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

// bpfFromPod calls bpf(BPF_MAP_CREATE, NULL, 0), which the kernel refuses,
// from a thread inside the pod's netns, and returns the thread's ID.
func bpfFromPod(t *testing.T, netns string) uint32 {
	t.Helper()
	var tid int
	err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
		tid = unix.Gettid()
		unix.Syscall(unix.SYS_BPF, 0, 0, 0)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return uint32(tid)
}

func waitWatched(t *testing.T, m *rtmon.Monitor, ino uint32, want bool) {
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
