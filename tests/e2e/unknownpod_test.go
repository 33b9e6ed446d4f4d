package e2e

import (
	"fmt"
	"testing"
	"time"
)

// TestAddBeforeStoreKnowsPod: an ADD for a pod the store has not seen yet
// (the informer lags the kubelet) is enforced at once with what its
// namespace says of every pod, its default deny here, and gets its own
// labels' policy as soon as the pod arrives in the store.
func TestAddBeforeStoreKnowsPod(t *testing.T) {
	e := newEnv(t, "ptp")
	e.writeStore("ns.yaml", `apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
`)
	e.startAgent()
	client := e.addPod("shop", "client")
	web := e.addPod("shop", "web")
	web.serve(t, 8080)
	e.writeStore("client.yaml", podDoc("client", client))
	// web is unknown to the store: its namespace's default deny holds.
	if client.tcpWorks(web.IPv4, 8080) {
		t.Fatal("a pod the store has not seen yet is reachable: it must get its namespace's default deny")
	}
	e.writeStore("web.yaml", podDoc("web", web))
	if !eventually(5*time.Second, func() bool { return client.tcpWorks(web.IPv4, 8080) }) {
		t.Fatal("once the store has the pod, its labels' policy must allow the client")
	}
}

// podDoc is a Pod of namespace shop labelled app=<name>, on this node, with
// p's address.
func podDoc(name string, p *pod) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: shop, labels: {app: %s}}
spec: {nodeName: e2e-node}
status: {phase: Running, podIPs: [{ip: "%s"}]}
`, name, name, p.IPv4)
}
