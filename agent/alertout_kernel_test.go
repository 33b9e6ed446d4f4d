package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/cli"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// --alert-log end to end: runtime detection runs with no flow log (JSON
// alerts), and with an OCSF flow log (OCSF Detection Findings); a bpf()
// call from a pod added through the agent becomes a line of the alert log,
// none of the flow log, and an alert that `bulkhead observe --alerts`
// (through the agent's API socket) shows, filtered by pod and rule.
func TestRuntimeAlertsToAlertLogAndObserve(t *testing.T) {
	privileged.Require(t)
	unmountTracefsAfter(t)
	for i, tt := range []struct {
		name    string
		format  string
		flowLog bool
	}{
		{"no flow log", "json", false},
		{"ocsf flow log", "ocsf", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			alertLog, flowLog := filepath.Join(dir, "alerts.log"), ""
			if tt.flowLog {
				flowLog = filepath.Join(dir, "flows.log")
			}
			a, req, _ := runtimePod(t, "c0ffee7"+string(rune('0'+i)), "10.213.6."+string(rune('7'+i))+"/32", func(c *Config) {
				c.AlertLog, c.FlowLog, c.FlowFormat = alertLog, flowLog, tt.format
				c.AlertLogMaxSize, c.AlertLogMaxFiles = 1<<20, 2
			})
			tid := bpfFromPod(t, req.Netns)

			// The alert log.
			if tt.format == "json" {
				al := waitAlert(t, alertLog, func(al detect.Alert) bool { return al.TID == tid })
				if al.RuleID != detect.RuleBPF.ID || al.Pod.Namespace != "shop" || al.Pod.Pod != "web" ||
					al.Pod.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/web" {
					t.Errorf("alert log: %+v", al)
				}
			} else {
				f := waitOCSFFinding(t, alertLog, tid)
				if f["class_uid"] != 2004.0 || f["severity_id"] != 4.0 || jsonPath(f, "finding_info.analytic.uid") != detect.RuleBPF.ID ||
					jsonPath(f, "finding_info.uid") == "" || jsonPath(f, "finding_info.uid") == detect.RuleBPF.ID ||
					jsonPath(f, "resources.0.name") != "web" || jsonPath(f, "resources.0.namespace") != "shop" ||
					jsonPath(f, "unmapped.syscall") != "bpf" || jsonPath(f, "finding_info.attacks.0.technique.uid") != "T1014" {
					t.Errorf("alert log OCSF finding: %v", f)
				}
			}

			// `bulkhead observe --alerts`, through the agent's socket.
			c := api.NewClient(api.ClientConfig{Socket: a.cfg.Socket, Timeout: 10 * time.Second})
			defer c.Close()
			var out bytes.Buffer
			err := cli.Observe(context.Background(), c, &out, cli.ObserveOptions{Alerts: true, Last: 0, Output: cli.FormatJSON,
				Pod: []string{"shop/web"}, Rule: []string{detect.RuleBPF.ID}, Severity: []string{"high"}})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for l := range strings.Lines(out.String()) {
				var it flows.AlertItem
				if err := json.Unmarshal([]byte(l), &it); err != nil || it.Alert == nil {
					t.Fatalf("observe --alerts -o json line %q: %v", l, err)
				}
				if it.Alert.RuleID != detect.RuleBPF.ID || it.Alert.Pod.Pod != "web" {
					t.Errorf("observe --alerts --pod shop/web --rule %s printed %+v", detect.RuleBPF.ID, it.Alert)
				}
				found = found || it.Alert.TID == tid
			}
			if !found {
				t.Errorf("observe --alerts -o json does not show the alert of thread %d:\n%s", tid, out.String())
			}
			out.Reset()
			if err := cli.Observe(context.Background(), c, &out, cli.ObserveOptions{Alerts: true, Last: 1, Pod: []string{"shop/web"}, Rule: []string{detect.RuleBPF.ID}}); err != nil {
				t.Fatal(err)
			}
			// (The setns back out of the pod's netns that bpfFromPod makes
			// raises BH-RT-001 too: --rule leaves it out.)
			if !strings.Contains(out.String(), "shop/web "+detect.RuleBPF.ID+" high bpf() syscall from a pod (T1014) bpf cmd=") {
				t.Errorf("observe --alerts: %q", out.String())
			}
			out.Reset()
			if err := cli.Observe(context.Background(), c, &out, cli.ObserveOptions{Alerts: true, Pod: []string{"shop/other"}}); err != nil || out.Len() != 0 {
				t.Errorf("observe --alerts --pod shop/other: %q, %v; want nothing", out.String(), err)
			}

			// The flow log has flows, never the alert.
			if tt.flowLog {
				if err := a.pipe.Load().flowLog.Flush(); err != nil {
					t.Fatal(err)
				}
				b, err := os.ReadFile(flowLog)
				if err != nil {
					t.Fatal(err)
				}
				if bytes.Contains(b, []byte(`"class_uid":2004`)) || bytes.Contains(b, []byte(`"event_kind":"alert"`)) {
					t.Errorf("with --alert-log the flow log has alerts:\n%s", b)
				}
			}
			if _, err := a.DeleteEndpoint(context.Background(), api.EndpointDelRequest{EndpointKey: req.EndpointKey, Netns: req.Netns}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// waitOCSFFinding reads path until a Detection Finding of thread tid is in
// it.
func waitOCSFFinding(t *testing.T, path string, tid uint32) map[string]any {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var m map[string]any
				if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
					t.Fatalf("alert log line %s: %v", sc.Text(), err)
				}
				if jsonPath(m, "actor.process.tid") == float64(tid) {
					f.Close()
					return m
				}
			}
			f.Close()
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			t.Fatalf("no Detection Finding of thread %d in the alert log after 10s:\n%s", tid, b)
		}
	}
}

// jsonPath walks a decoded JSON object along dotted keys, a number indexing
// an array; nil where the path is not there.
func jsonPath(m map[string]any, path string) any {
	var v any = m
	for _, k := range strings.Split(path, ".") {
		switch cur := v.(type) {
		case map[string]any:
			v = cur[k]
		case []any:
			i, err := strconv.Atoi(k)
			if err != nil || i < 0 || i >= len(cur) {
				return nil
			}
			v = cur[i]
		default:
			return nil
		}
	}
	return v
}
