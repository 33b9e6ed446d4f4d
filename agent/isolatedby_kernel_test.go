package agent

import (
	"context"
	"encoding/json"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// TestIsolatedByOnRealDrops (issue 16): real TCP between two pods on a
// bridge, both enforced by a running agent. shop/b is isolated at ingress
// by two NetworkPolicies and at egress by one of them; a's SYN to b is
// dropped at b's ingress, b's SYN to a at b's egress, and each drop's
// record names default-deny and the policies that isolate b in that
// direction, as the compiler says (explain's isolated_by).
func TestIsolatedByOnRealDrops(t *testing.T) {
	p := startPodPair(t, 216, `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-lock, namespace: shop}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
`, nil)
	a, ctx, inPod := p.a, context.Background(), p.inPod
	reqA, reqB, ipA, ipB := p.reqA, p.reqB, p.ipA, p.ipB

	want := map[string][]string{
		flows.DirectionIngress: {"NetworkPolicy shop/b-in", "NetworkPolicy shop/b-lock"},
		flows.DirectionEgress:  {"NetworkPolicy shop/b-lock"},
	}
	found := map[string]*flows.Flow{}
	deadline := time.Now().Add(10 * time.Second)
	for len(found) < 2 && time.Now().Before(deadline) {
		// Each attempt is a new connection (a new source port): its SYN
		// makes a new drop event.
		for _, p := range []struct{ path, to string }{{reqA.Netns, ipB}, {reqB.Netns, ipA}} {
			inPod(p.path, func() error {
				if c, err := net.DialTimeout("tcp", net.JoinHostPort(p.to, "5432"), 200*time.Millisecond); err == nil {
					c.Close()
				}
				return nil
			})
		}
		for _, f := range a.hub.Last(0, nil) {
			if f.Verdict == flows.VerdictDropped && f.Source.PodName == "a" && f.Destination.PodName == "b" &&
				f.TrafficDirection == flows.DirectionIngress ||
				f.Verdict == flows.VerdictDropped && f.Source.PodName == "b" && f.Destination.PodName == "a" &&
					f.TrafficDirection == flows.DirectionEgress {
				found[f.TrafficDirection] = f
			}
		}
	}
	for _, dir := range []string{flows.DirectionIngress, flows.DirectionEgress} {
		f := found[dir]
		if f == nil {
			t.Errorf("no %s drop of shop/b recorded; flows: %d", dir, len(a.hub.Last(0, nil)))
			continue
		}
		by := f.DecidingPolicy()
		if f.DropReasonDesc != flows.DropPolicyDenied || by == nil || by.Name != "default-deny" || !slices.Equal(f.IsolatedBy, want[dir]) {
			t.Errorf("%s drop: %s, decided by %v, isolated_by %q, want %q", dir, f.DropReasonDesc, by, f.IsolatedBy, want[dir])
		}
		t.Logf("%s", flows.Compact(f, false))
	}
	// Live explain names the same policies for the same pair.
	r, err := a.Explain(ctx, api.ExplainRequest{Source: api.Peer{Pod: &api.PodRef{Namespace: "shop", Name: "a"}},
		Destination: api.Peer{Pod: &api.PodRef{Namespace: "shop", Name: "b"}}, Protocol: "TCP", Port: 5432})
	if err != nil {
		t.Fatal(err)
	}
	var detail explain.Result
	if err := json.Unmarshal(r.Detail, &detail); err != nil {
		t.Fatal(err)
	}
	if r.Verdict != policy.VerdictDeny.String() || !slices.Equal(detail.Ingress.IsolatedBy, want[flows.DirectionIngress]) ||
		!strings.Contains(r.Reason, "isolated by NetworkPolicy shop/b-in, NetworkPolicy shop/b-lock") {
		t.Errorf("live explain a -> b: %s, ingress isolated_by %q:\n%s", r.Verdict, detail.Ingress.IsolatedBy, r.Reason)
	}
	// Pod a is isolated by nothing: no drop of its own, no isolated_by.
	for _, f := range a.hub.Last(0, nil) {
		if f.Verdict != flows.VerdictDropped && len(f.IsolatedBy) > 0 {
			t.Errorf("a flow not dropped names isolated_by: %s", flows.Compact(f, false))
		}
	}
}
