package e2e

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// bulkhead runs the CLI against the env's agent.
func (e *env) bulkhead(t *testing.T, args ...string) (string, error) {
	t.Helper()
	bin := filepath.Join(cnichain.RepoRoot(t), "bin", "bulkhead")
	out, err := exec.Command(bin, append([]string{"--socket", e.socket}, args...)...).CombinedOutput()
	return string(out), err
}

// denyStore: an explicit Deny by SPIFFE ID, on a pod no other policy
// selects (a Deny-only policy adds no default deny).
const denyStore = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: frontend-no-db, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/frontend"}
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/db"}]
    ports: [{port: 9000, protocol: TCP}]
    action: Deny
`

const auditStore = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: db-audit, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/db"}
  mode: Audit
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/api"}]
    ports: [{port: 5432, protocol: TCP}]
`

// TestCLIAndFlowsAgainstLiveAgent drives real traffic and reads it back
// through the CLI: observe with filters, status, endpoints, identities and
// the live explain; AUDIT records for an audit-mode policy whose traffic
// passes; replies marked is_reply.
func TestCLIAndFlowsAgainstLiveAgent(t *testing.T) {
	e := newEnv(t, "ptp")
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.writeStore("audit.yaml", auditStore)
	e.writeStore("deny.yaml", denyStore)
	e.startAgent()
	front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)
	db.serve(t, 5432)
	front.serve(t, 9000)

	// The explicit Deny: db may not reach frontend:9000, and the record
	// names the policy, its rule, and both SPIFFE IDs.
	if db.tcpWorks(front.IPv4, 9000) {
		t.Fatal("db → frontend:9000 passes a Deny rule")
	}
	if !api.tcpWorks(front.IPv4, 9000) {
		t.Fatal("a Deny-only policy blocked api → frontend:9000")
	}
	var denied []string
	if !eventually(3*time.Second, func() bool {
		denied = e.flowLines(`"verdict":"DROPPED"`, `"drop_reason_desc":"POLICY_DENY"`,
			`"ingress_denied_by":[{"name":"frontend-no-db","namespace":"shop","kind":"BulkheadPolicy"`, `"rule":"ingress[0]"`)
		return len(denied) > 0
	}) {
		t.Fatalf("no DROPPED record naming the Deny rule; flow log:\n%s", strings.Join(e.flowLines(), "\n"))
	}
	for _, want := range []string{`"spiffe_id":"spiffe://cluster.local/ns/shop/sa/db"`, `"spiffe_id":"spiffe://cluster.local/ns/shop/sa/frontend"`,
		`"destination_port":9000`} {
		if !strings.Contains(denied[0], want) {
			t.Errorf("deny record lacks %s: %s", want, denied[0])
		}
	}

	if !front.tcpWorks(api.IPv4, 8080) {
		t.Fatal("frontend → api blocked")
	}
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("db → api allowed")
	}
	// Audit mode: frontend → db is not allowed by the audit policy, but
	// passes and is reported as AUDIT.
	if !front.tcpWorks(db.IPv4, 5432) {
		t.Fatal("audit-mode policy blocked traffic")
	}

	observe := func(args ...string) []map[string]any {
		t.Helper()
		out, err := e.bulkhead(t, append([]string{"observe", "--last", "0", "-o", "json"}, args...)...)
		if err != nil {
			t.Fatalf("observe %v: %v\n%s", args, err, out)
		}
		var recs []map[string]any
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if line == "" {
				continue
			}
			var item map[string]any
			if err := json.Unmarshal([]byte(line), &item); err != nil {
				t.Fatalf("observe line %q: %v", line, err)
			}
			if f, ok := item["flow"].(map[string]any); ok {
				recs = append(recs, f)
			}
		}
		return recs
	}
	var dropped []map[string]any
	if !eventually(3*time.Second, func() bool { dropped = observe("--verdict", "DROPPED"); return len(dropped) > 0 }) {
		t.Fatal("no DROPPED flow observed")
	}
	for _, f := range dropped {
		if f["verdict"] != "DROPPED" {
			t.Fatalf("--verdict DROPPED returned %v", f["verdict"])
		}
		if src := f["source"].(map[string]any); src["pod_name"] != "db" {
			t.Fatalf("drop from %v, want db: %v", src["pod_name"], f)
		}
	}
	var audit []map[string]any
	if !eventually(3*time.Second, func() bool { audit = observe("--verdict", "AUDIT", "--to-pod", "shop/db"); return len(audit) > 0 }) {
		t.Fatalf("no AUDIT flow for the audit-mode policy; flow log:\n%s", strings.Join(e.flowLines(), "\n"))
	}
	if by := audit[0]["ingress_denied_by"].([]any)[0].(map[string]any); by["name"] != "default-deny" {
		t.Fatalf("audit record decided by %v", by)
	}
	var got []map[string]any
	if !eventually(3*time.Second, func() bool {
		got = observe("--from-pod", "shop/frontend", "--port", "8080", "--verdict", "FORWARDED")
		return len(got) > 0
	}) {
		t.Fatal("no FORWARDED frontend → api:8080 flow")
	}
	// The connection passes two endpoints: frontend's egress (no policy
	// selects it) and api's ingress (the NetworkPolicy allows it).
	var egressBy, ingressBy map[string]any
	for _, f := range got {
		if l, ok := f["egress_allowed_by"].([]any); ok {
			egressBy = l[0].(map[string]any)
		}
		if l, ok := f["ingress_allowed_by"].([]any); ok {
			ingressBy = l[0].(map[string]any)
		}
	}
	if ingressBy["name"] != "api-from-frontend" || ingressBy["kind"] != "NetworkPolicy" || ingressBy["namespace"] != "shop" {
		t.Fatalf("ingress allowed by %v", ingressBy)
	}
	if egressBy["kind"] != "default" {
		t.Fatalf("egress allowed by %v, want the no-policy default", egressBy)
	}
	if got := observe("--spiffe-id", "spiffe://cluster.local/ns/ops/*/*"); len(got) != 0 {
		t.Fatalf("a SPIFFE glob that matches nothing returned %d flows", len(got))
	}
	if got := observe("--namespace", "ops"); len(got) != 0 {
		t.Fatalf("--namespace ops returned %d flows", len(got))
	}

	// Replies: a flow ends at the FIN that completes the close. Here that is
	// api's (the echo handler closes after the client does), which travels
	// api → frontend, against the flow: its record is a reply.
	if !eventually(3*time.Second, func() bool {
		return len(e.flowLines(`"source_port":8080,"destination_port"`, `"is_reply":true`, `"event_kind":"end"`)) > 0
	}) {
		t.Fatalf("no reply-direction end record; flow log:\n%s", strings.Join(e.flowLines(), "\n"))
	}
	if n := len(e.flowLines(`"destination_port":8080,`, `"flags":{"SYN":true}`, `"is_reply":true`)); n != 0 {
		t.Fatalf("%d SYN records to api:8080 are marked as replies", n)
	}

	out, err := e.bulkhead(t, "status")
	if err != nil || !strings.Contains(out, "Ready:") || !strings.Contains(out, "tcx") || !regexp.MustCompile(`Endpoints:\s+3\n`).MatchString(out) {
		t.Fatalf("status: %v\n%s", err, out)
	}
	out, err = e.bulkhead(t, "endpoints")
	if err != nil || !strings.Contains(out, "shop/api") || !strings.Contains(out, "spiffe://cluster.local/ns/shop/sa/api") {
		t.Fatalf("endpoints: %v\n%s", err, out)
	}
	out, err = e.bulkhead(t, "identities")
	if err != nil || !strings.Contains(out, "spiffe://cluster.local/ns/shop/sa/frontend") || strings.Count(out, " world ") != 1 || strings.Count(out, " host ") != 1 {
		t.Fatalf("identities (host and world once each): %v\n%s", err, out)
	}
	out, err = e.bulkhead(t, "policy", "explain", "--from", "shop/db", "--to", "shop/api", "--port", "8080")
	if err != nil || !strings.Contains(out, "DENY") || !strings.Contains(out, "live state") {
		t.Fatalf("live explain: %v\n%s", err, out)
	}
	out, err = e.bulkhead(t, "policy", "explain", "--from", "shop/frontend", "--to", "shop/api", "--port", "8080")
	if err != nil || !strings.Contains(out, "ALLOW") || !strings.Contains(out, "api-from-frontend") {
		t.Fatalf("live explain (allowed): %v\n%s", err, out)
	}
}
