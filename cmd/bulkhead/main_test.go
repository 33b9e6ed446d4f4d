package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/author"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

const goodStore = "../../policy/testdata/stores/shop"

func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errw bytes.Buffer
	root := newRoot()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errw)
	err := root.Execute()
	return out.String(), errw.String(), err
}

func TestDemo(t *testing.T) {
	out, _, err := run(t, "demo", "--help")
	if err != nil || !strings.Contains(out, "--cni-bin") || !strings.Contains(out, "--keep") {
		t.Fatalf("demo --help: %q %v", out, err)
	}
	// Without its binaries (or root) the demo refuses before it creates
	// anything; tests/e2e runs the real thing.
	if _, _, err := run(t, "demo", "--bin-dir", t.TempDir()); err == nil {
		t.Fatal("demo without bulkhead-agent succeeded")
	}
}

func TestPolicyCheck(t *testing.T) {
	out, _, err := run(t, "policy", "check", goodStore)
	if err != nil || !strings.Contains(out, "all valid") {
		t.Fatalf("good store: %q %v", out, err)
	}
	_, errOut, err := run(t, "policy", "check", "testdata/bad")
	if !errors.Is(err, explain.ErrInvalidStore) {
		t.Fatalf("bad store: got %v, want ErrInvalidStore", err)
	}
	for _, want := range []string{
		"testdata/bad/policies.yaml:15: NetworkPolicy shop/bad-cidr: spec.ingress[0].from[0].ipBlock.cidr",
		"testdata/bad/policies.yaml:23: BulkheadPolicy shop/bad-action: spec.egress[0].action",
		"testdata/bad/pods.yaml:1: Pod shop/p: status.podIPs[0]",
		`testdata/bad/cased.yaml:7: NetworkPolicy shop/cased: unknown field "spec.PodSelector"`,
		`testdata/bad/cased.yaml:14: BulkheadPolicy shop/cased: unknown field "spec.selector.spiffeId"`,
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("check output lacks %q:\n%s", want, errOut)
		}
	}
	if strings.Contains(errOut, "shop/good") {
		t.Errorf("a valid policy was reported:\n%s", errOut)
	}
}

// TestPolicyCheckPaths: check reads files, *.yml, several paths and
// --store, counts in the singular, and fails when it checked nothing.
func TestPolicyCheckPaths(t *testing.T) {
	dir := t.TempDir()
	yml, empty, one := dir+"/yml", dir+"/empty", dir+"/one"
	for _, d := range []string{yml, empty, one} {
		os.Mkdir(d, 0o700)
	}
	pods, _ := os.ReadFile(goodStore + "/pods.yaml")
	os.WriteFile(yml+"/pods.yml", pods, 0o600)
	os.WriteFile(empty+"/notes.txt", []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"), 0o600)
	os.WriteFile(empty+"/comment.yaml", []byte("# nothing yet\n"), 0o600)
	os.WriteFile(one+"/ns.yaml", []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"), 0o600)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{goodStore + "/pods.yaml"}, "pods.yaml: 4 objects, all valid"},
		{[]string{yml}, "yml: 4 objects, all valid"},
		{[]string{"--store", goodStore}, "shop: 8 objects, all valid"},
		{[]string{one}, "one: 1 object, valid"},
		{[]string{yml, goodStore + "/namespaces.yaml"}, "6 objects, all valid"},
	} {
		out, errOut, err := run(t, append([]string{"policy", "check"}, tc.args...)...)
		if err != nil || !strings.Contains(out, tc.want) {
			t.Errorf("%v: %v %q %q, want %q", tc.args, err, out, errOut, tc.want)
		}
	}
	for _, args := range [][]string{{empty}, {empty + "/comment.yaml"}} {
		if _, _, err := run(t, append([]string{"policy", "check"}, args...)...); !errors.Is(err, explain.ErrNothingToCheck) {
			t.Errorf("%v: got %v, want ErrNothingToCheck", args, err)
		}
	}
	// The same pods twice, from two paths: one state, so a duplicate.
	if _, errOut, err := run(t, "policy", "check", yml, goodStore); !errors.Is(err, explain.ErrInvalidStore) || !strings.Contains(errOut, "already defined at") {
		t.Errorf("duplicate across paths: %v %q", err, errOut)
	}
	if _, _, err := run(t, "policy", "check"); err == nil {
		t.Error("check without a path succeeded")
	}
	if _, _, err := run(t, "policy", "check", dir+"/missing"); !errors.Is(err, explain.ErrInvalidStore) {
		t.Errorf("missing path: %v", err)
	}
}

func TestPolicyExplain(t *testing.T) {
	out, _, err := run(t, "policy", "explain", "--store", goodStore, "--from", "shop/api", "--to", "shop/db", "--port", "5432", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Ingress  struct{ Verdict string }
		Egress   struct{ Verdict string }
		Combined string
		Allowed  []struct{ Name string } `json:"allowed_by"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// db's NetworkPolicy allows api on its named port pg; api's own
	// BulkheadPolicy only lets it out to DNS.
	if r.Ingress.Verdict != "allow" || r.Egress.Verdict != "deny" || r.Combined != "deny" || len(r.Allowed) != 1 || r.Allowed[0].Name != "db" {
		t.Fatalf("unexpected verdict: %+v\n%s", r, out)
	}
	out, _, err = run(t, "policy", "explain", "--store", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "5432")
	if err != nil || !strings.Contains(out, "ALLOW") || !strings.Contains(out, "NetworkPolicy shop/db ingress[0]") {
		t.Fatalf("text explain: %v\n%s", err, out)
	}
	if _, _, err := run(t, "policy", "explain", "--store", goodStore, "--from", "shop/nope", "--to", "shop/db", "--port", "1"); err == nil {
		t.Fatal("unknown pod: want an error")
	}
}

func TestPolicyMatrix(t *testing.T) {
	out, _, err := run(t, "policy", "matrix", "--store", goodStore, "--ports", "8080/TCP,5432/TCP,53/UDP", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var cells []map[string]any
	if err := json.Unmarshal([]byte(out), &cells); err != nil {
		t.Fatal(err)
	}
	if len(cells) != 4*3*3 {
		t.Fatalf("got %d cells, want 36 (4 pods to 3 others each, 3 ports)", len(cells))
	}
	for _, c := range cells {
		for _, k := range []string{"from", "to", "port", "protocol", "ingress", "egress", "combined"} {
			if _, ok := c[k]; !ok {
				t.Fatalf("cell lacks %q: %v", k, c)
			}
		}
		if c["from"] == "ops/monitor" && c["to"] == "shop/db" && c["port"] == float64(5432) && c["combined"] != true {
			t.Errorf("monitor -> db 5432 should pass: %v", c)
		}
		if c["from"] == c["to"] {
			t.Errorf("a pod-to-self cell: %v", c)
		}
		if c["from"] == "shop/frontend" && c["to"] == "shop/db" && c["port"] == float64(5432) && c["combined"] != false {
			t.Errorf("frontend -> db 5432 should be denied (only api and ops may connect): %v", c)
		}
	}
	out, _, err = run(t, "policy", "matrix", "--store", goodStore, "--ports", "80")
	if err != nil || !strings.Contains(out, "80/TCP") {
		t.Fatalf("table: %v\n%s", err, out)
	}
}

func TestPolicyDiff(t *testing.T) {
	out, _, err := run(t, "policy", "diff", goodStore, goodStore, "--fail-on-change")
	if err != nil || !strings.Contains(out, "no verdict changes") {
		t.Fatalf("same store: %v\n%s", err, out)
	}
	newDir := t.TempDir()
	for _, f := range []string{"namespaces.yaml", "pods.yaml"} {
		data, err := os.ReadFile(goodStore + "/" + f)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(newDir+"/"+f, data, 0o600)
	}
	// Without policies, everything the shop's policies denied opens.
	out, _, err = run(t, "policy", "diff", goodStore, newDir, "--fail-on-change")
	if !errors.Is(err, author.ErrVerdictsChanged) || !strings.Contains(out, "DENY -> ALLOW") {
		t.Fatalf("policies removed: %v\n%s", err, out)
	}
	for _, args := range [][]string{
		{"policy", "diff", goodStore},
		{"policy", "diff", "--git", "HEAD..HEAD", goodStore, goodStore},
		{"policy", "diff", goodStore, newDir, "-o", "yaml"},
	} {
		if _, _, err := run(t, args...); err == nil {
			t.Errorf("%v: want an error", args)
		}
	}
}

// flowLog is two records the agent could have written: frontend calls
// api on 8080, both ends report it.
const flowLog = `{"time":"2026-12-07T10:00:00Z","verdict":"FORWARDED","IP":{"source":"10.1.0.11","destination":"10.1.0.10","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":40000,"destination_port":8080}},"source":{"identity":300,"namespace":"shop","pod_name":"frontend","labels":["k8s:app=frontend","k8s:io.kubernetes.pod.namespace=shop","k8s:io.kubernetes.pod.serviceaccount=frontend"],"spiffe_id":"spiffe://cluster.local/ns/shop/sa/frontend"},"destination":{"ID":2,"identity":301,"namespace":"shop","pod_name":"api","labels":["k8s:app=api","k8s:io.kubernetes.pod.namespace=shop","k8s:io.kubernetes.pod.serviceaccount=api"],"spiffe_id":"spiffe://cluster.local/ns/shop/sa/api"},"Type":"L3_L4","is_reply":false,"traffic_direction":"INGRESS"}
`

func TestPolicyGenerate(t *testing.T) {
	dir := t.TempDir()
	logPath := dir + "/flows.json"
	if err := os.WriteFile(logPath, []byte(flowLog+flowLog), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(t, "policy", "generate", logPath)
	if err != nil || !strings.Contains(out, "kind: NetworkPolicy") || !strings.Contains(out, "name: gen-api") {
		t.Fatalf("generate: %v\n%s", err, out)
	}
	root := newRoot()
	var stdout bytes.Buffer
	root.SetArgs([]string{"policy", "generate", "-", "--egress"})
	root.SetIn(strings.NewReader(flowLog))
	root.SetOut(&stdout)
	if err := root.Execute(); err != nil || !strings.Contains(stdout.String(), "name: gen-frontend") || strings.Contains(stdout.String(), "gen-api") {
		t.Fatalf("stdin, --egress: %v\n%s", err, stdout.String())
	}
	// The output is a store: check accepts it next to the pods.
	store := t.TempDir()
	for _, f := range []string{"namespaces.yaml", "pods.yaml"} {
		data, _ := os.ReadFile(goodStore + "/" + f)
		os.WriteFile(store+"/"+f, data, 0o600)
	}
	if _, _, err := run(t, "policy", "generate", logPath, "--spiffe", "--mode", "Audit", "-f", store+"/gen.yaml"); err != nil {
		t.Fatal(err)
	}
	if out, _, err := run(t, "policy", "check", store); err != nil {
		t.Fatalf("generated store: %v\n%s", err, out)
	}
	data, _ := os.ReadFile(store + "/gen.yaml")
	if !strings.Contains(string(data), "mode: Audit") || !strings.Contains(string(data), "kind: BulkheadPolicy") {
		t.Fatalf("--spiffe --mode Audit:\n%s", data)
	}

	bad := dir + "/bad.json"
	os.WriteFile(bad, []byte(flowLog+"{not json\n"+flowLog), 0o600)
	target := dir + "/never.yaml"
	_, _, err = run(t, "policy", "generate", bad, "-f", target)
	if err == nil || !strings.Contains(err.Error(), bad+":2: ") {
		t.Fatalf("bad line: %v", err)
	}
	if _, serr := os.Stat(target); serr == nil {
		t.Fatal("a file was written for bad input")
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{logPath, "--mode", "Audit"}, "NetworkPolicy has no mode"},
		{[]string{logPath, "--spiffe", "--mode", "Dry"}, "want Audit or Enforce"},
		{[]string{logPath, "--since", "1h"}, "not both"},
		{[]string{"--since", "yesterday"}, "positive duration"},
		{[]string{}, "give a flow log file"},
		{[]string{dir + "/missing.json"}, "open flow log"},
	} {
		_, _, err := run(t, append([]string{"policy", "generate"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestPolicyImpact(t *testing.T) {
	dir := t.TempDir()
	logPath := dir + "/flows.json"
	// monitor connects to db twice: the store's NetworkPolicy shop/db lets
	// the ops namespace in.
	monitorToDB := `{"time":"2026-12-07T10:00:00Z","verdict":"FORWARDED","IP":{"source":"10.2.0.5","destination":"10.1.0.12"},"l4":{"TCP":{"destination_port":5432}},"source":{"namespace":"ops","pod_name":"monitor"},"destination":{"namespace":"shop","pod_name":"db"},"traffic_direction":"INGRESS"}
`
	if err := os.WriteFile(logPath, []byte(monitorToDB+monitorToDB), 0o600); err != nil {
		t.Fatal(err)
	}
	// The change replaces shop/db's NetworkPolicy with one that lets in
	// api only.
	change := dir + "/db.yml"
	os.WriteFile(change, []byte(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: pg}]
`), 0o600)
	for _, args := range [][]string{
		{"policy", "impact", goodStore, "--change", change, logPath},
		{"policy", "impact", "--store", goodStore, "--change", change, logPath},
	} {
		out, _, err := run(t, args...)
		if err != nil || !strings.Contains(out, "newly dropped: 2 flow records in 1 group") ||
			!strings.Contains(out, "was: ingress NetworkPolicy shop/db ingress[0] (allow)") || !strings.Contains(out, "change replaces NetworkPolicy shop/db") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	_, _, err := run(t, "policy", "impact", goodStore, "--change", change, logPath, "--fail-on-drop")
	if !errors.Is(err, author.ErrFlowsDropped) {
		t.Errorf("--fail-on-drop: %v", err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--change", change}, "the agent's API does not serve its store"},
		{[]string{goodStore, logPath}, "give --change"},
		{[]string{goodStore, "--change", change}, "give a flow log file"},
		{[]string{goodStore, "--change", change, logPath, logPath}, "give one flow log"},
		{[]string{goodStore, "--change", change, logPath, "-o", "yaml"}, "want text or json"},
		// --since asks the agent: here there is none.
		{[]string{goodStore, "--change", change, "--since", "1h", "--socket", dir + "/none.sock"}, "cannot reach bulkhead-agent"},
	} {
		_, _, err := run(t, append([]string{"policy", "impact"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want %q", tc.args, err, tc.want)
		}
	}
}

// TestPolicyStoreInput: every verb takes the store as its argument or as
// --store, and those that cannot go live say so.
func TestPolicyStoreInput(t *testing.T) {
	for _, args := range [][]string{
		{"policy", "explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "5432"},
		{"policy", "explain", "--store", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "5432"},
		// Named ports resolve against the destination pod: db's pg is 5432.
		{"policy", "explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "pg"},
		{"policy", "explain", goodStore, "--from", "ops/monitor", "--to", "10.1.0.12", "--port", "pg"},
	} {
		out, _, err := run(t, args...)
		if err != nil || !strings.Contains(out, "5432/TCP: ALLOW") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	for _, args := range [][]string{
		{"policy", "matrix", goodStore, "--ports", "5432"},
		{"policy", "matrix", "--store", goodStore, "--ports", "5432"},
	} {
		if out, _, err := run(t, args...); err != nil || !strings.Contains(out, "5432/TCP") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	if out, _, err := run(t, "policy", "diff", "--store", goodStore, goodStore); err != nil || !strings.Contains(out, "no verdict changes") {
		t.Errorf("diff --store: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"matrix", "--ports", "80"}, "matrix needs a store folder"},
		{[]string{"matrix", "--store", goodStore, goodStore, "--ports", "80"}, "give the store once"},
		{[]string{"explain", "--store", goodStore, goodStore, "--from", "a/b", "--to", "c/d", "--port", "1"}, "give the store once"},
		{[]string{"explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "http"}, `pod shop/db has no TCP port of that name (it names pg=5432/TCP)`},
		{[]string{"explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "pg", "--protocol", "UDP"}, `no UDP port of that name`},
		{[]string{"explain", goodStore, "--from", "ops/monitor", "--to", "192.0.2.1", "--port", "pg"}, "not a pod"},
		{[]string{"explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "0"}, "want 1-65535 or a named port"},
		{[]string{"explain", goodStore, "--from", "ops/monitor", "--to", "shop/db", "--port", "70000"}, "want 1-65535 or a named port"},
		// Live, a name cannot be resolved: said before the agent is asked.
		{[]string{"explain", "--from", "ops/monitor", "--to", "shop/db", "--port", "pg"}, "the agent takes a port number"},
	} {
		_, _, err := run(t, append([]string{"policy"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want %q", tc.args, err, tc.want)
		}
	}
}

// TestExplainDefaultAllowWording: a default allow reads the same whether
// no policy selects the pod at all (monitor) or policies select it in the
// other direction only (db: ingress), and the latter is not enforced.
func TestExplainDefaultAllowWording(t *testing.T) {
	out, _, err := run(t, "policy", "explain", goodStore, "--from", "shop/db", "--to", "ops/monitor", "--port", "80")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"egress  at shop/db: allow by default (not isolated in this direction)",
		"ingress at ops/monitor: allow by default (not isolated in this direction)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "by default (allow)") {
		t.Errorf("a second wording:\n%s", out)
	}
	out, _, err = run(t, "policy", "explain", goodStore, "--from", "shop/db", "--to", "ops/monitor", "--port", "80", "-o", "json")
	var r struct{ Egress struct{ Enforced bool } }
	if err != nil || json.Unmarshal([]byte(out), &r) != nil || r.Egress.Enforced {
		t.Errorf("db's egress, which no policy selects, is enforced: %v\n%s", err, out)
	}
}

// TestExplainIsolatedBy: a default deny names the policies that isolate
// the pod in that direction, and only those.
func TestExplainIsolatedBy(t *testing.T) {
	out, _, err := run(t, "policy", "explain", goodStore, "--from", "shop/frontend", "--to", "shop/db", "--port", "5432")
	if want := "ingress at shop/db: deny by default (deny): shop/db is isolated by NetworkPolicy shop/db, which does not allow shop/frontend"; err != nil || !strings.Contains(out, want) {
		t.Errorf("%v: lacks %q:\n%s", err, want, out)
	}
	// Two policies isolate db's ingress; one of egress only does not.
	store := t.TempDir()
	for _, f := range []string{"namespaces.yaml", "pods.yaml", "policies.yaml"} {
		data, _ := os.ReadFile(goodStore + "/" + f)
		os.WriteFile(store+"/"+f, data, 0o600)
	}
	os.WriteFile(store+"/more.yaml", []byte(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-metrics, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 9187}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  egress: [{}]
`), 0o600)
	out, _, err = run(t, "policy", "explain", store, "--from", "shop/frontend", "--to", "shop/db", "--port", "5432", "-o", "json")
	var r struct {
		Ingress struct {
			IsolatedBy []string `json:"isolated_by"`
		}
		Egress struct {
			IsolatedBy []string `json:"isolated_by"`
		}
	}
	if err != nil || json.Unmarshal([]byte(out), &r) != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if got := strings.Join(r.Ingress.IsolatedBy, ";"); got != "NetworkPolicy shop/db;NetworkPolicy shop/db-metrics" || r.Egress.IsolatedBy != nil {
		t.Errorf("isolated_by: ingress %q, egress %v", got, r.Egress.IsolatedBy)
	}
	out, _, _ = run(t, "policy", "explain", store, "--from", "shop/frontend", "--to", "shop/db", "--port", "5432")
	if !strings.Contains(out, "which do not allow shop/frontend") {
		t.Errorf("plural:\n%s", out)
	}
}

// TestGenerateMessageSingular: one connection is "1 connection".
func TestGenerateMessageSingular(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/flows.json", []byte(flowLog), 0o600)
	_, errOut, err := run(t, "policy", "generate", dir+"/flows.json", "-f", dir+"/out.yaml")
	if err != nil || !strings.Contains(errOut, "wrote 2 policies for 1 connection to ") {
		t.Errorf("%v: %q", err, errOut)
	}
}

// A mistyped verb of a group is an error with a suggestion, not the
// group's help and exit 0; the bare group still prints its help.
func TestUnknownVerbIsAnError(t *testing.T) {
	for _, args := range [][]string{{"policy", "chek"}, {"policy", "chek", "store"}, {"quarantine", "lst"}} {
		_, _, err := run(t, args...)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("unknown command %q", args[1])) ||
			!strings.Contains(err.Error(), "did you mean") {
			t.Errorf("%v: %v, want an unknown command error with a suggestion", args, err)
		}
	}
	if out, _, err := run(t, "policy"); err != nil || !strings.Contains(out, "Available Commands") {
		t.Errorf("bulkhead policy: %v %q, want its help", err, out)
	}
}
