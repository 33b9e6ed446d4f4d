package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/twonode"
)

const twoNodeNamespaces = `
apiVersion: v1
kind: Namespace
metadata: {name: client, labels: {team: client}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {team: web}}
`

const webDefaultDeny = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Ingress]
`

// webAllowA1 lets pods labelled app=a1 of namespaces labelled team=client
// (so: only a pod of another node, as far as node B is concerned) reach b1.
const webAllowA1 = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a1, namespace: web}
spec:
  podSelector: {matchLabels: {app: b1}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: client}}, podSelector: {matchLabels: {app: a1}}}]
    ports: [{port: 8080, protocol: TCP}]
`

// TestTwoNodeCrossNodePolicy: node B judges traffic from node A's pods by
// their identity, which it knows only from its store (status.podIPs of
// remote pods, written by SyncPeers): a1 is let in and a2, from the same
// node and namespace, is not; both look alike to B except for that.
func TestTwoNodeCrossNodePolicy(t *testing.T) {
	topo := twonode.New(t, twonode.Config{
		// Removing the allow, below, leaves one policy of two; hold it
		// back no longer than this should the store guard wait.
		ExtraAgentArgs: func(string) []string { return []string{"--store-shrink-grace", "1s"} },
	})
	nodeA, nodeB := topo.A(), topo.B()
	for _, n := range topo.Nodes {
		n.WriteStore("namespaces.yaml", twoNodeNamespaces)
	}
	a1 := nodeA.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
	a2 := nodeA.AddPod("client", "a2", map[string]string{"app": "a2"}, "a2")
	b1 := nodeB.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	b2 := nodeB.AddPod("web", "b2", map[string]string{"app": "b2"}, "b2")
	b1.Serve(8080)
	if !nodeA.PodCIDR4.Contains(a1.IPv4) || !nodeB.PodCIDR4.Contains(b1.IPv4) || nodeA.PodCIDR4.Overlaps(nodeB.PodCIDR4) {
		t.Fatalf("pod addresses outside their nodes' CIDRs: a1 %v in %v, b1 %v in %v", a1.IPv4, nodeA.PodCIDR4, b1.IPv4, nodeB.PodCIDR4)
	}

	// No policy: the nodes route between their pods.
	for _, p := range []*twonode.Pod{a1, a2, b2} {
		if !twonode.Eventually(5*time.Second, func() bool { return p.TCPWorks(b1.IPv4, 8080) }) {
			t.Fatalf("%s (%s) cannot reach b1 (%s) with no policy: the topology does not route", p.Name, p.IPv4, b1.IPv4)
		}
	}

	// Node B denies ingress in web but for a1. It does not know a1's
	// address yet: a1 is "world" there, and denied like everyone else.
	nodeB.WriteStore("policy.yaml", webDefaultDeny+"---"+webAllowA1)
	if !twonode.Eventually(5*time.Second, func() bool { return !b2.TCPWorks(b1.IPv4, 8080) }) {
		t.Fatal("b2 still reaches b1 5s after the default deny was written")
	}
	if a1.TCPWorks(b1.IPv4, 8080) {
		t.Fatal("a1 reaches b1 before node B knows its address: the allow matched an unknown peer")
	}
	if !twonode.Eventually(3*time.Second, func() bool {
		return len(nodeB.FlowLines(`"verdict":"DROPPED"`, `"source":"`+a1.IPv4.String()+`"`, `"source":{"identity":2,"labels":["reserved:world"]}`)) > 0
	}) {
		t.Fatalf("node B's flow log does not show a1's address as world before it learned it:\n%s", strings.Join(nodeB.FlowLines(), "\n"))
	}

	// Once B's store lists A's pods with their addresses, a1 is itself.
	topo.SyncPeers()
	if !twonode.Eventually(5*time.Second, func() bool { return a1.TCPWorks(b1.IPv4, 8080) }) {
		t.Fatal("a1 does not reach b1 5s after node B learned its address")
	}
	if a2.TCPWorks(b1.IPv4, 8080) {
		t.Fatal("a2 reaches b1: node B let in a remote pod the policy does not select")
	}
	if b2.TCPWorks(b1.IPv4, 8080) {
		t.Fatal("b2 reaches b1 although only a1 is allowed")
	}

	// Node B's flow log names the remote pods on both verdicts, from what
	// its store says of them.
	if !twonode.Eventually(3*time.Second, func() bool {
		return len(nodeB.FlowLines(`"verdict":"FORWARDED"`, `"pod_name":"a1"`, `"ingress_allowed_by":[{"name":"allow-a1"`)) > 0 &&
			len(nodeB.FlowLines(`"verdict":"DROPPED"`, `"pod_name":"a2"`, `"ingress_denied_by"`)) > 0
	}) {
		t.Fatalf("node B's flow log lacks a1's allowed and a2's denied flows:\n%s", strings.Join(nodeB.FlowLines(), "\n"))
	}
	fwd := nodeB.FlowLines(`"verdict":"FORWARDED"`, `"pod_name":"a1"`, `"ingress_allowed_by"`)[0]
	for _, want := range []string{`"source":{`, `"namespace":"client"`, `"spiffe_id":"spiffe://cluster.local/ns/client/sa/a1"`,
		`"node_name":"node-b"`, `"traffic_direction":"INGRESS"`, `"source":"` + a1.IPv4.String() + `"`} {
		if !strings.Contains(fwd, want) {
			t.Errorf("node B's record of a1's flow lacks %s: %s", want, fwd)
		}
	}
	// Node A knows b1 the same way, and names it as the destination of
	// a1's egress.
	if !twonode.Eventually(3*time.Second, func() bool {
		return len(nodeA.FlowLines(`"traffic_direction":"EGRESS"`, `"pod_name":"a1"`, `"pod_name":"b1"`)) > 0
	}) {
		t.Errorf("node A's flow log does not name b1 as a1's peer:\n%s", strings.Join(nodeA.FlowLines(), "\n"))
	}

	// Removing the allow cuts a1 off.
	nodeB.WriteStore("policy.yaml", webDefaultDeny)
	if !twonode.Eventually(5*time.Second, func() bool { return !a1.TCPWorks(b1.IPv4, 8080) }) {
		t.Fatal("a1 still reaches b1 5s after the allow was removed")
	}
	if !twonode.Eventually(3*time.Second, func() bool {
		return len(nodeB.FlowLines(`"verdict":"DROPPED"`, `"pod_name":"a1"`, `"ingress_denied_by"`)) > 0
	}) {
		t.Fatalf("node B's flow log lacks a1's denied flow:\n%s", strings.Join(nodeB.FlowLines(), "\n"))
	}
}
