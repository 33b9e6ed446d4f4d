package demo

import (
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/flows"
)

func record(verdict, from, to, proto string, port uint16, reply bool) *flows.Flow {
	f := &flows.Flow{Verdict: verdict, IsReply: reply, L4: &flows.Layer4{}}
	fns, fname, _ := strings.Cut(from, "/")
	tns, tname, _ := strings.Cut(to, "/")
	f.Source = &flows.Endpoint{Namespace: fns, PodName: fname}
	f.Destination = &flows.Endpoint{Namespace: tns, PodName: tname}
	switch proto {
	case "TCP":
		f.L4.TCP = &flows.TCP{SourcePort: 40000, DestinationPort: port}
	case "UDP":
		f.L4.UDP = &flows.Ports{SourcePort: 40000, DestinationPort: port}
	}
	return f
}

// TestFlowClassification covers how the demo reads the agent's records: a
// passing connection is Audited only with an AUDIT record, a cell is settled
// only once the record of its deciding side arrived, and the record shown
// for a change names the policy rule rather than an unselected side.
func TestFlowClassification(t *testing.T) {
	toDebug := Cell{From: "shop/api", To: "ops/debug", Port: Port{8080, "TCP"}}
	toAPI := Cell{From: "ops/debug", To: "shop/api", Port: Port{8080, "TCP"}}

	egress := record(flows.VerdictForwarded, "shop/api", "ops/debug", "TCP", 8080, false)
	egress.EgressAllowedBy = []*flows.Policy{{Kind: "default", Name: "no-policy-selects"}}
	audit := record(flows.VerdictAudit, "shop/api", "ops/debug", "TCP", 8080, false)
	audit.IngressDeniedBy = []*flows.Policy{{Kind: "default", Name: "default-deny"}}
	// A reply travels debug -> api; it must not count for the api -> debug
	// cell, nor as a debug -> api connection.
	reply := record(flows.VerdictAudit, "ops/debug", "shop/api", "TCP", 40000, true)
	drop := record(flows.VerdictDropped, "ops/debug", "shop/api", "TCP", 8080, false)
	drop.IngressDeniedBy = []*flows.Policy{{Kind: "BulkheadPolicy", Namespace: "shop", Name: "no-ops", Rule: "ingress[0]"}}
	otherPort := record(flows.VerdictDropped, "ops/debug", "shop/api", "UDP", 8080, false)

	idx := indexFlows([]*flows.Flow{egress})
	if idx.decided(toDebug, Allowed) {
		t.Fatal("a passing cell counted as settled on the egress record alone: an AUDIT at ingress could still come")
	}
	if idx.has(toDebug, flows.VerdictAudit) {
		t.Fatal("AUDIT found without an AUDIT record")
	}
	idx = indexFlows([]*flows.Flow{egress, audit, reply, otherPort})
	if !idx.decided(toDebug, Allowed) || !idx.has(toDebug, flows.VerdictAudit) {
		t.Fatal("the ingress AUDIT record did not settle the cell as audited")
	}
	if idx.decided(toAPI, Denied) {
		t.Fatal("a reply or another protocol's drop settled the cell")
	}
	if got := idx.deciding(toDebug, Audited); got != audit {
		t.Fatalf("deciding record %+v, want the AUDIT one", got)
	}
	if got := deciderText(audit); !strings.Contains(got, "audit-mode default deny at the ingress of ops/debug") {
		t.Fatalf("decider text %q", got)
	}

	idx = indexFlows([]*flows.Flow{drop})
	if !idx.decided(toAPI, Denied) {
		t.Fatal("a DROPPED record did not settle a denied cell")
	}
	if got := deciderText(idx.deciding(toAPI, Denied)); got != "BulkheadPolicy shop/no-ops ingress[0]" {
		t.Fatalf("decider text %q", got)
	}
	if got := shortDecider(drop); got != "BulkheadPolicy shop/no-ops" {
		t.Fatalf("short decider %q", got)
	}
	if idx.deciding(toAPI, Allowed) != nil {
		t.Fatal("a DROPPED record was offered as the reason a cell passes")
	}
}
