package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/flows"
)

// TestObserveFlowsDirectionAndIsolation (issue 16): a pod-to-pod flow
// appears once per side; compact and table output say which side, and a
// default-deny drop names the policies that isolate the pod; -o json
// carries isolated_by. With FromNow, a follow asks the agent for no recent
// flows.
func TestObserveFlowsDirectionAndIsolation(t *testing.T) {
	now := time.Now()
	mk := func(dir, verdict string) *flows.Flow {
		return &flows.Flow{Time: now, Verdict: verdict, Type: "L3_L4", TrafficDirection: dir, EventKind: "new",
			IP:          &flows.IP{Source: "10.0.0.1", Destination: "10.0.0.2", IPVersion: "IPv4"},
			L4:          &flows.Layer4{TCP: &flows.TCP{SourcePort: 40000, DestinationPort: 5432}},
			Source:      &flows.Endpoint{Identity: 300, Namespace: "shop", PodName: "web"},
			Destination: &flows.Endpoint{Identity: 301, Namespace: "shop", PodName: "db"}}
	}
	out := mk(flows.DirectionEgress, flows.VerdictForwarded)
	out.EgressAllowedBy = []*flows.Policy{{Kind: "default", Name: "no-policy-selects"}}
	in := mk(flows.DirectionIngress, flows.VerdictDropped)
	in.DropReasonDesc, in.IngressDeniedBy = flows.DropPolicyDenied, []*flows.Policy{{Kind: "default", Name: "default-deny"}}
	in.IsolatedBy = []string{"NetworkPolicy shop/db-in", "BulkheadPolicy shop/x"}
	b := &historyBackend{ring: []*flows.Flow{out, in}}
	c := serveBackend(t, b)
	ctx := context.Background()

	var buf bytes.Buffer
	if err := Observe(ctx, c, &buf, ObserveOptions{Last: 20}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "shop/web:40000 -> shop/db:5432 egress TCP FORWARDED") ||
		!strings.HasSuffix(lines[1], "shop/web:40000 -> shop/db:5432 ingress TCP DROPPED by default-deny (isolated by NetworkPolicy shop/db-in, BulkheadPolicy shop/x)") {
		t.Errorf("compact:\n%s", buf.String())
	}
	if b.got.Last != 20 || b.got.Follow {
		t.Errorf("request %+v, want the last 20", b.got)
	}

	buf.Reset()
	if err := Observe(ctx, c, &buf, ObserveOptions{Output: FormatJSON}); err != nil {
		t.Fatal(err)
	}
	var it flows.Item
	lines = strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 || json.Unmarshal([]byte(lines[1]), &it) != nil || it.Flow == nil ||
		strings.Join(it.Flow.IsolatedBy, ",") != "NetworkPolicy shop/db-in,BulkheadPolicy shop/x" {
		t.Errorf("-o json:\n%s", buf.String())
	}

	buf.Reset()
	if err := Observe(ctx, c, &buf, ObserveOptions{Output: FormatTable}); err != nil {
		t.Fatal(err)
	}
	if s := buf.String(); !strings.Contains(s, "DIRECTION") || !strings.Contains(s, " ingress ") ||
		!strings.Contains(s, "default-deny (isolated by NetworkPolicy shop/db-in, BulkheadPolicy shop/x)") {
		t.Errorf("table:\n%s", s)
	}

	// --follow starts from now (Last < 0: no recent flows) unless --last
	// asks for them; without Follow, FromNow changes nothing.
	for _, tc := range []struct {
		o    ObserveOptions
		want int
	}{
		{ObserveOptions{Follow: true, FromNow: true, Last: 20}, -1},
		{ObserveOptions{Follow: true, Last: 5}, 5},
		{ObserveOptions{FromNow: true, Last: 20}, 20},
	} {
		if err := Observe(ctx, c, &bytes.Buffer{}, tc.o); err != nil {
			t.Fatal(err)
		}
		if b.got.Last != tc.want || b.got.Follow != tc.o.Follow {
			t.Errorf("%+v: request %+v, want last %d", tc.o, b.got, tc.want)
		}
	}
}
