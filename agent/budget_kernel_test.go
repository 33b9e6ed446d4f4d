package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	dto "github.com/prometheus/client_model/go"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// budgetStore: 100 peer pods in y (100 identities); "big" selects x/server
// and admits TCP 1001-1999, ..., 20001-20999 from all of y (19,600 trie
// keys: the kind of policy); "small" admits TCP 80 from y/peer0 to
// x/web.
func budgetStore() string {
	var b strings.Builder
	b.WriteString("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n")
	for i := range 100 {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Pod\nmetadata: {name: peer%d, namespace: y, labels: {n: \"%d\"}}\nstatus: {podIPs: [{ip: 10.215.1.%d}]}\n", i, i, i+1)
	}
	b.WriteString("---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: x, labels: {app: server}}\n")
	b.WriteString("---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: x, labels: {app: web}}\n")
	b.WriteString("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: big, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]\n    ports:\n")
	for k := 1; k <= 20; k++ {
		fmt.Fprintf(&b, "    - {protocol: TCP, port: %d, endPort: %d}\n", 1000*k+1, 1000*k+999)
	}
	b.WriteString("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: small, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {n: \"0\"}}}]\n    ports: [{protocol: TCP, port: 80}]\n")
	return b.String()
}

// TestAgentPolicyOverBudget: an agent with the default budgets of a
// 65,536-key policy trie rejects the policy alone: status and the
// metric name it, CNI ADDs of pods it selects and of other pods succeed,
// the other policy applies, and the rejected policy's pod is isolated.
func TestAgentPolicyOverBudget(t *testing.T) {
	privileged.Require(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(store, "cluster.yaml"), []byte(budgetStore()), 0o644); err != nil {
		t.Fatal(err)
	}
	bpffs := testBPFFS(t)
	suffix := strings.TrimPrefix(filepath.Base(bpffs), "bulkhead-agent-test-")
	a, err := New(Config{Store: "dir:" + store, Socket: filepath.Join(dir, "agent.sock"),
		StateDir: filepath.Join(dir, "state"), BPFFS: bpffs, NodeName: "test",
		Datapath: datapath.Config{MaxPolicyEntries: 65536}})
	if err != nil {
		if errors.Is(err, datapath.ErrNotSupported) {
			privileged.Unsupported(t, "datapath: %v", err)
		}
		t.Fatalf("new agent: %v", err)
	}
	startTestAgent(t, a)
	ctx := context.Background()

	// Two pods, each on a veth whose host end is in this namespace and
	// whose pod end is in a namespace of the test.
	cur, err := ns.GetCurrentNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cur.Close() })
	host := &netns.NS{NetNS: cur}
	add := func(name, veth, ip string) {
		t.Helper()
		pod := netns.New(t)
		idx := netns.Veth(t, host, veth, pod, "eth0")
		_, err := a.AddEndpoint(ctx, api.EndpointAddRequest{
			EndpointKey: api.EndpointKey{ContainerID: "c-" + name + "-" + suffix, IfName: "eth0"},
			Netns:       pod.Path(), HostVeth: veth, HostIfIndex: idx,
			IPs: []netip.Prefix{netip.MustParsePrefix(ip + "/32")},
			Pod: api.PodRef{Namespace: "x", Name: name},
		})
		if err != nil {
			t.Fatalf("ADD %s: %v", name, err)
		}
		t.Cleanup(func() {
			_, _ = a.DeleteEndpoint(context.Background(), api.EndpointDelRequest{EndpointKey: api.EndpointKey{ContainerID: "c-" + name + "-" + suffix, IfName: "eth0"}})
		})
	}
	add("web", "bhw"+suffix[:8], "10.215.2.2")
	add("server", "bhs"+suffix[:8], "10.215.2.1")

	st, err := a.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.PolicyErrors) != 1 || st.PolicyErrors[0].Policy != "NetworkPolicy x/big" || st.PolicyErrors[0].KeptPreviousVersion {
		t.Fatalf("status policy errors %+v, want NetworkPolicy x/big withheld", st.PolicyErrors)
	}
	t.Logf("status: %s", st.PolicyErrors[0].Message)
	var m dto.Metric
	if err := a.metrics.PolicyOverBudget.WithLabelValues("NetworkPolicy", "x", "big", "policy", "isolation").Write(&m); err != nil || m.GetGauge().GetValue() != 1 {
		t.Errorf("bulkhead_policy_over_budget for x/big: %v (%v), want 1", m.GetGauge().GetValue(), err)
	}
	for _, tc := range []struct {
		to   string
		port uint16
		want string
	}{
		{"web", 80, "allow"},
		{"server", 1500, "deny"},
		{"server", 80, "deny"},
	} {
		r, err := a.Explain(ctx, api.ExplainRequest{Source: api.Peer{Pod: &api.PodRef{Namespace: "y", Name: "peer0"}},
			Destination: api.Peer{Pod: &api.PodRef{Namespace: "x", Name: tc.to}}, Protocol: "TCP", Port: tc.port})
		if err != nil {
			t.Fatal(err)
		}
		if r.Verdict != tc.want {
			t.Errorf("y/peer0 -> x/%s TCP %d: %s, want %s (%s)", tc.to, tc.port, r.Verdict, tc.want, r.Reason)
		}
	}
	// A local pod named by its address is that endpoint, enforced.
	r, err := a.Explain(ctx, api.ExplainRequest{Source: api.Peer{IP: netip.MustParseAddr("10.215.1.1")},
		Destination: api.Peer{IP: netip.MustParseAddr("10.215.2.1")}, Protocol: "TCP", Port: 1500})
	if err != nil {
		t.Fatal(err)
	}
	if r.Verdict != "deny" {
		t.Errorf("10.215.1.1 -> 10.215.2.1 (x/server) TCP 1500: %s, want deny (%s)", r.Verdict, r.Reason)
	}
}
