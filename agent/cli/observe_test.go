package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// alertBackend serves a fixed set of alerts through the alert filter the
// CLI sends, as the agent does, and remembers the last request.
type alertBackend struct {
	api.Backend
	alerts []*detect.Alert
	req    api.AlertObserveRequest
}

func (b *alertBackend) ObserveAlerts(_ context.Context, req api.AlertObserveRequest, write func([]byte) error) error {
	b.req = req
	var f flows.AlertFilter
	if err := json.Unmarshal(req.Filter, &f); err != nil {
		return api.Errorf(api.CodeInvalidRequest, "%v", err)
	}
	for _, al := range b.alerts {
		if !f.Match(al) {
			continue
		}
		line, _ := json.Marshal(flows.AlertItem{Alert: al})
		if err := write(line); err != nil {
			return err
		}
	}
	return nil
}

func TestObserveAlerts(t *testing.T) {
	t0 := time.Now().Add(-time.Minute)
	mk := func(pod, rule string, sev detect.Severity) *detect.Alert {
		return &detect.Alert{EventKind: "alert", Time: t0, RuleID: rule, Rule: "rule " + rule, Technique: "T1611", Severity: sev,
			Pod: detect.Endpoint{Namespace: "shop", Pod: pod}, Syscall: "unshare", Args: map[string]string{"flags": "CLONE_NEWUSER"},
			PID: 42, Comm: "unshare", Action: "alert", Count: 1}
	}
	b := &alertBackend{alerts: []*detect.Alert{
		mk("frontend", "BH-RT-002", detect.SeverityHigh),
		mk("frontend", "BH-RT-001", detect.SeverityCritical),
		mk("api", "BH-RT-002", detect.SeverityHigh),
	}}
	c := serveBackend(t, b)
	ctx := context.Background()

	var out bytes.Buffer
	err := Observe(ctx, c, &out, ObserveOptions{Alerts: true, Last: 7, Pod: []string{"shop/frontend"}, Severity: []string{"high"}, Since: "5m"})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "shop/frontend BH-RT-002 high rule BH-RT-002 (T1611) unshare flags=CLONE_NEWUSER pid 42 comm unshare alert") {
		t.Errorf("compact:\n%s", out.String())
	}
	var sent flows.AlertFilter
	if err := json.Unmarshal(b.req.Filter, &sent); err != nil || b.req.Last != 7 ||
		sent.Pods[0] != "shop/frontend" || sent.Severities[0] != "high" || sent.Since.IsZero() {
		t.Errorf("request %+v filter %+v (%v)", b.req, sent, err)
	}

	out.Reset()
	if err := Observe(ctx, c, &out, ObserveOptions{Alerts: true, Rule: []string{"bh-rt-002"}, Output: FormatJSON}); err != nil {
		t.Fatal(err)
	}
	lines = strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("-o json --rule BH-RT-002: %d lines:\n%s", len(lines), out.String())
	}
	for _, l := range lines {
		var it flows.AlertItem
		if err := json.Unmarshal([]byte(l), &it); err != nil || it.Alert == nil || it.Alert.RuleID != "BH-RT-002" {
			t.Errorf("-o json line %s: %v", l, err)
		}
	}

	for _, tt := range []struct {
		o    ObserveOptions
		want string
	}{
		{ObserveOptions{Alerts: true, Verdict: []string{"DROPPED"}}, "--verdict: filter flows, not alerts"},
		{ObserveOptions{Alerts: true, FromPod: []string{"a"}, Port: []uint16{80}}, "--from-pod, --port: filter flows"},
		{ObserveOptions{Alerts: true, MTLS: true}, "--mtls: filter flows"},
		{ObserveOptions{Alerts: true, Output: FormatTable}, `-o "table": --alerts prints compact or json`},
		{ObserveOptions{Alerts: true, Rule: []string{"BH-RT-77"}}, `unknown rule "BH-RT-77"`},
		{ObserveOptions{Alerts: true, Severity: []string{"low"}}, `unknown severity "low"`},
		{ObserveOptions{Alerts: true, Since: "yesterday"}, `--since "yesterday"`},
		{ObserveOptions{Rule: []string{"BH-RT-002"}}, "--rule and --severity filter runtime alerts: add --alerts"},
		{ObserveOptions{Severity: []string{"high"}}, "add --alerts"},
	} {
		b.req = api.AlertObserveRequest{}
		err := Observe(ctx, c, &bytes.Buffer{}, tt.o)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: error %v, want %q", tt.o, err, tt.want)
		}
		if b.req.Filter != nil {
			t.Errorf("%+v: reached the agent", tt.o)
		}
	}
}
