package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flowlog"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// alertAgent is an Agent with runtime detection's outputs and no kernel:
// what emitAlert and ObserveAlerts use.
func alertAgent(cfg Config) *Agent {
	a := &Agent{cfg: cfg, log: slog.New(slog.DiscardHandler), stopping: make(chan struct{})}
	a.sysmon = &runtimeDetection{
		alerts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "test_alerts_total"}, []string{"rule", "technique", "action"}),
		hub:    flows.NewAlertHub(alertRing, "test"),
	}
	return a
}

func testAlert(i int) detect.Alert {
	rule := detect.Rules()[i%len(detect.Rules())]
	return detect.Alert{
		EventKind: "alert", Time: time.Unix(1_800_000_000+int64(i), 0), RuleID: rule.ID, Rule: rule.Name,
		Technique: rule.Technique, TechniqueName: rule.TechniqueName, Severity: rule.Severity,
		Pod:     detect.Endpoint{Namespace: "shop", Pod: fmt.Sprintf("web-%d", i%2), Netns: 7},
		Syscall: "unshare", Args: map[string]string{"n": fmt.Sprint(i)}, PID: uint32(100 + i), Comm: "sh",
		Action: detect.ActionAlert, Count: 1,
	}
}

func readTextLines(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// --alert-log gets every alert as a whole line, flushed at once, rotated at
// --alert-log-max-size into PATH.1 … PATH.N; the flow log gets none. The
// metric counts each line's events.
func TestAlertLogWritesAndRotates(t *testing.T) {
	dir := t.TempDir()
	alertLog, flowLog := filepath.Join(dir, "alerts.log"), filepath.Join(dir, "flows.log")
	line0, _ := json.Marshal(testAlert(0))
	// Room for about two lines per file.
	a := alertAgent(Config{RuntimeDetection: true, FlowFormat: "json", AlertLog: alertLog,
		AlertLogMaxSize: int64(2*len(line0) + 20), AlertLogMaxFiles: 2})
	fw, err := flowlog.Open(flowlog.Config{Path: flowLog})
	if err != nil {
		t.Fatal(err)
	}
	pipe := &flowPipe{log: a.log, flowLog: fw}
	a.pipe.Store(pipe)
	defer fw.Close()
	if err := a.openAlertLog(); err != nil {
		t.Fatal(err)
	}
	const n = 9
	for i := range n {
		a.emitAlert(testAlert(i))
		// Written and flushed before emitAlert returns: no tick to wait for.
		if i == 0 {
			if got := readTextLines(t, alertLog); len(got) != 1 {
				t.Fatalf("after one alert the alert log has %d lines", len(got))
			}
		}
	}
	a.closeAlertLog()

	var seen []int
	for _, p := range []string{alertLog + ".2", alertLog + ".1", alertLog} {
		lines := readTextLines(t, p)
		if len(lines) == 0 || len(lines) > 2 {
			t.Errorf("%s: %d lines, want 1 or 2 (rotation at 2 lines)", filepath.Base(p), len(lines))
		}
		for _, l := range lines {
			var al detect.Alert
			if err := json.Unmarshal([]byte(l), &al); err != nil || al.EventKind != "alert" {
				t.Fatalf("%s: line %q: %v", filepath.Base(p), l, err)
			}
			var i int
			fmt.Sscan(al.Args["n"], &i)
			seen = append(seen, i)
		}
	}
	if _, err := os.Stat(alertLog + ".3"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s.3 exists: --alert-log-max-files 2 keeps two", alertLog)
	}
	// The newest files hold the newest alerts, in order.
	for k := 1; k < len(seen); k++ {
		if seen[k] != seen[k-1]+1 {
			t.Errorf("alerts kept out of order: %v", seen)
		}
	}
	if len(seen) == 0 || seen[len(seen)-1] != n-1 {
		t.Errorf("kept %v, want the last ones up to %d", seen, n-1)
	}
	if err := fw.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := readTextLines(t, flowLog); len(got) != 0 {
		t.Errorf("with --alert-log the flow log got alerts: %q", got)
	}
	var m dto.Metric
	r := detect.Rules()[0]
	if err := a.sysmon.alerts.WithLabelValues(r.ID, r.Technique, "alert").Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("%s counted %v (%v), want 1", r.ID, m.GetCounter().GetValue(), err)
	}
}

// Without --alert-log the alerts go to the flow log, in --flow-format: the
// native line, or an OCSF Detection Finding. With --alert-log and ocsf the
// alert log holds Detection Findings.
func TestAlertFormatsAndFallback(t *testing.T) {
	for _, tt := range []struct {
		format   string
		alertLog bool
		want     string
	}{
		{"json", false, `"event_kind":"alert"`},
		{"ocsf", false, `"class_uid":2004`},
		{"ocsf", true, `"class_uid":2004`},
	} {
		dir := t.TempDir()
		alertLog, flowLog := filepath.Join(dir, "alerts.log"), filepath.Join(dir, "flows.log")
		cfg := Config{RuntimeDetection: true, FlowFormat: tt.format, FlowLog: flowLog}
		if tt.alertLog {
			cfg.AlertLog = alertLog
		}
		a := alertAgent(cfg)
		fw, err := flowlog.Open(flowlog.Config{Path: flowLog})
		if err != nil {
			t.Fatal(err)
		}
		a.pipe.Store(&flowPipe{log: a.log, flowLog: fw})
		if err := a.openAlertLog(); err != nil {
			t.Fatal(err)
		}
		a.emitAlert(testAlert(1))
		a.closeAlertLog()
		fw.Close()
		target, other := flowLog, alertLog
		if tt.alertLog {
			target, other = alertLog, flowLog
		}
		got := readTextLines(t, target)
		if len(got) != 1 || !strings.Contains(got[0], tt.want) {
			t.Errorf("%s (alert log %v): %s has %q, want one line with %s", tt.format, tt.alertLog, filepath.Base(target), got, tt.want)
		}
		if rest := readTextLines(t, other); len(rest) != 0 {
			t.Errorf("%s (alert log %v): %s has %q, want nothing", tt.format, tt.alertLog, filepath.Base(other), rest)
		}
	}
}

// The agent's alert stream: recent alerts filtered as asked, new ones while
// following, a bad filter refused, and no stream without runtime detection.
func TestObserveAlerts(t *testing.T) {
	a := alertAgent(Config{RuntimeDetection: true, FlowFormat: "json"})
	for i := range 6 {
		a.emitAlert(testAlert(i))
	}
	collect := func(ctx context.Context, req api.AlertObserveRequest) ([]flows.AlertItem, error) {
		var out []flows.AlertItem
		err := a.ObserveAlerts(ctx, req, func(line []byte) error {
			var it flows.AlertItem
			if err := json.Unmarshal(line, &it); err != nil {
				return err
			}
			out = append(out, it)
			return nil
		})
		return out, err
	}
	items, err := collect(context.Background(), api.AlertObserveRequest{Filter: json.RawMessage(`{"pods":["shop/web-1"]}`)})
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 3 {
		t.Fatalf("pod shop/web-1: %d alerts, want 3", len(items))
	}
	for _, it := range items {
		if it.Alert == nil || it.Alert.Pod.Pod != "web-1" {
			t.Errorf("pod shop/web-1: got %+v", it.Alert)
		}
	}
	rule := detect.Rules()[2].ID
	items, err = collect(context.Background(), api.AlertObserveRequest{Last: 5, Filter: json.RawMessage(`{"rules":["` + rule + `"],"severities":["` + string(detect.Rules()[2].Severity) + `"]}`)})
	if err != nil || len(items) != 1 || items[0].Alert.RuleID != rule {
		t.Fatalf("rule %s: %+v, %v", rule, items, err)
	}

	for _, bad := range []string{`{"rules":["BH-RT-999"]}`, `{"severities":["low"]}`, `{"pod":["x"]}`} {
		_, err := collect(context.Background(), api.AlertObserveRequest{Filter: json.RawMessage(bad)})
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeInvalidRequest {
			t.Errorf("filter %s: error %v, want invalid request", bad, err)
		}
	}

	// Following: the backlog, then a new alert, until the context ends.
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan *detect.Alert, 16)
	done := make(chan error, 1)
	go func() {
		done <- a.ObserveAlerts(ctx, api.AlertObserveRequest{Last: 1, Follow: true, Filter: json.RawMessage(`{"namespaces":["shop"]}`)},
			func(line []byte) error {
				var it flows.AlertItem
				if err := json.Unmarshal(line, &it); err != nil {
					return err
				}
				got <- it.Alert
				return nil
			})
	}()
	if al := <-got; al.PID != 105 {
		t.Errorf("backlog of 1: pid %d, want the last alert's 105", al.PID)
	}
	a.emitAlert(testAlert(42))
	select {
	case al := <-got:
		if al.PID != 142 {
			t.Errorf("followed alert pid %d, want 142", al.PID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a new alert did not reach the follower")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	off := &Agent{cfg: Config{}, log: slog.New(slog.DiscardHandler), stopping: make(chan struct{})}
	err = off.ObserveAlerts(context.Background(), api.AlertObserveRequest{}, func([]byte) error { return nil })
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeUnsupported || !strings.Contains(err.Error(), "--runtime-detection") {
		t.Errorf("without runtime detection: %v, want unsupported naming --runtime-detection", err)
	}
}
