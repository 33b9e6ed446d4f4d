package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// TestAdoptRunningPods: pods that ran before Bulkhead was chained in are
// enforced without a restart. The agent finds each local pod's host veth
// from its address (the route to it on ptp, the bridge's neighbour and
// forwarding tables on bridge), attaches, and records the endpoint as
// adopted under the runtime's container ID from libcni's cache; the
// runtime's later DEL and GC find it like any other. A pod whose sandbox
// cannot be found is reported, never skipped in silence.
func TestAdoptRunningPods(t *testing.T) { forEachChain(t, testAdoptRunningPods) }

func testAdoptRunningPods(t *testing.T, primary string) {
	e := newEnv(t, primary)
	// The node before the install: the primary alone.
	plain := cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: "1.1.0"})
	server, good, bad := plainPod(t, plain, "shop", "server"), plainPod(t, plain, "shop", "good"), plainPod(t, plain, "shop", "bad")
	server.serve(t, 8080)
	if !bad.tcpWorks(server.IPv4, 8080) {
		t.Fatal("before the install, traffic must flow: the primary alone enforces nothing")
	}
	if primary == "bridge" {
		// The host has talked to the server (its neighbour entry and the
		// bridge's forwarding table find it), and to no one else: the
		// others are found by looking behind the bridge's ports.
		flushNeighbours(t, plain.Bridge)
		c, err := net.DialTimeout("tcp4", netip.AddrPortFrom(server.IPv4, 8080).String(), 2*time.Second)
		if err != nil {
			t.Fatalf("host to server: %v", err)
		}
		c.Close()
	}

	b := plain.Subnet4.Addr().As4()
	ghost := netip.AddrFrom4([4]byte{b[0], b[1], b[2], 250}) // in the pods' subnet; no pod has it
	e.writeStore("ns.yaml", openStore)
	e.writeStore("pods.yaml", adoptStore(server, good, bad, ghost.String()))
	e.extraArgs = []string{"--cni-cache-dir", plain.CacheDir}
	e.startAgent()

	want := []string{"shop/bad", "shop/good", "shop/server"}
	if !eventually(15*time.Second, func() bool { return slices.Equal(e.adopted(t), want) }) {
		t.Fatalf("adopted endpoints = %v, want %v\n%s", e.adopted(t), want, e.agentLogs())
	}
	if primary == "bridge" {
		for pod, via := range map[string]string{"shop/server": "neighbour", "shop/good": "bridge-scan"} {
			if len(logLines(e.agentLogs(), `"running pod adopted"`, fmt.Sprintf(`"pod":%q`, pod), fmt.Sprintf(`"via":%q`, via))) == 0 {
				t.Errorf("%s was not found via %s:\n%s", pod, via, e.agentLogs())
			}
		}
	}
	if !eventually(5*time.Second, func() bool { return !bad.tcpWorks(server.IPv4, 8080) }) {
		t.Fatal("an adopted pod's policy is not enforced: shop/bad still reaches shop/server")
	}
	if !good.tcpWorks(server.IPv4, 8080) {
		t.Fatal("shop/good, allowed by the policy, cannot reach the adopted shop/server")
	}
	if !eventually(5*time.Second, func() bool {
		return len(e.flowLines(`"verdict":"DROPPED"`, `"pod_name":"server"`)) > 0
	}) {
		t.Errorf("no DROPPED flow record for the adopted server:\n%s", strings.Join(e.flowLines(), "\n"))
	}

	// The runtime's own keys: the DEL and GC it runs find the endpoints.
	l, err := e.client.ListEndpoints(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range l.Endpoints {
		if ep.Pod.Name == "bad" && (ep.ContainerID != bad.ContainerID || ep.IfName != bad.IfName) {
			t.Fatalf("adopted shop/bad has key %s/%s, want the runtime's %s/%s", ep.ContainerID, ep.IfName, bad.ContainerID, bad.IfName)
		}
	}

	// The pod that is not there is reported: in status, in the CLI, in
	// metrics' sense of it.
	st, err := e.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Unadopted) != 1 || st.Unadopted[0].Pod.Name != "ghost" || !strings.Contains(st.Unadopted[0].Reason, ghost.String()) {
		t.Fatalf("status unadopted = %+v, want shop/ghost with a reason naming %s", st.Unadopted, ghost)
	}
	out, _ := runCLI(t, e.socket, "status")
	if !strings.Contains(out, "Pod not enforced: shop/ghost") {
		t.Errorf("bulkhead status does not report the unadopted pod:\n%s", out)
	}
	out, err = runCLI(t, e.socket, "endpoints")
	if err != nil || !strings.Contains(out, "(adopted)") {
		t.Errorf("bulkhead endpoints does not mark adopted endpoints (%v):\n%s", err, out)
	}

	// A restarted agent keeps them, still adopted, from its records.
	e.stopAgent(syscall.SIGTERM)
	e.startAgent()
	if got := e.adopted(t); !slices.Equal(got, want) {
		t.Fatalf("after a restart adopted = %v, want %v", got, want)
	}
	if bad.tcpWorks(server.IPv4, 8080) {
		t.Fatal("after a restart shop/bad reaches shop/server")
	}

	// The install: bulkhead-cni joins the conflist. The runtime's DEL of
	// an adopted pod removes its endpoint and releases its address; a new
	// pod is an ordinary ADD.
	installed := plain.WithBulkhead(t, cnichain.BulkheadConfig{Socket: e.socket, AgentWaitSeconds: 5})
	if err := installed.Del(context.Background(), bad.Pod); err != nil {
		t.Fatalf("DEL of an adopted pod: %v", err)
	}
	if got := e.adopted(t); slices.Contains(got, "shop/bad") {
		t.Fatalf("after its DEL shop/bad is still an endpoint: %v", got)
	}
	if leases := hostLocalLeases(t, plain, bad.IPv4.String()); len(leases) != 0 {
		t.Errorf("host-local still holds %s after the DEL: %v", bad.IPv4, leases)
	}
	fresh := installed.NewPod(t)
	fresh.Namespace, fresh.Name = "shop", "fresh"
	if _, err := installed.Add(context.Background(), fresh); err != nil {
		t.Fatalf("ADD after the install: %v", err)
	}
	eps, err := e.client.ListEndpoints(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps.Endpoints {
		if ep.Pod.Name == "fresh" && ep.Adopted {
			t.Fatal("a pod added through the chain is marked adopted")
		}
	}
	// GC with the runtime's list keeps what it lists, adopted or not.
	if err := installed.GC(context.Background(), server.Pod, good.Pod, fresh); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got := e.endpoints(t); !slices.Equal(got, []string{"shop/fresh", "shop/good", "shop/server"}) {
		t.Fatalf("after GC endpoints = %v", got)
	}
}

// TestAdoptWithoutCNICache: a runtime that keeps no libcni cache. The
// adopted endpoint gets a key of its own; the runtime's DEL names the
// sandbox's netns, and that finds it.
func TestAdoptWithoutCNICache(t *testing.T) {
	e := newEnv(t, "ptp")
	plain := cnichain.New(t, cnichain.Config{Primary: "ptp", CNIVersion: "1.1.0"})
	server, bad := plainPod(t, plain, "shop", "server"), plainPod(t, plain, "shop", "bad")
	server.serve(t, 8080)
	e.writeStore("ns.yaml", openStore)
	e.writeStore("pods.yaml", adoptStore(server, bad))
	e.extraArgs = []string{"--cni-cache-dir", ""}
	e.startAgent()
	want := []string{"shop/bad", "shop/server"}
	if !eventually(15*time.Second, func() bool { return slices.Equal(e.adopted(t), want) }) {
		t.Fatalf("adopted endpoints = %v, want %v\n%s", e.adopted(t), want, e.agentLogs())
	}
	if !eventually(5*time.Second, func() bool { return !bad.tcpWorks(server.IPv4, 8080) }) {
		t.Fatal("the adopted server's policy is not enforced")
	}
	installed := plain.WithBulkhead(t, cnichain.BulkheadConfig{Socket: e.socket, AgentWaitSeconds: 5})
	// GC cannot list a key it never had: it must not collect the pods.
	if err := installed.GC(context.Background(), server.Pod, bad.Pod); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got := e.adopted(t); !slices.Equal(got, want) {
		t.Fatalf("GC removed adopted endpoints it could not name: %v", got)
	}
	if err := installed.Del(context.Background(), server.Pod); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if got := e.adopted(t); !slices.Equal(got, []string{"shop/bad"}) {
		t.Fatalf("after the server's DEL adopted = %v, want [shop/bad]", got)
	}
}

// plainPod adds a pod through a chain without bulkhead-cni.
func plainPod(t *testing.T, c *cnichain.Chain, namespace, name string) *pod {
	t.Helper()
	p := c.NewPod(t)
	p.Namespace, p.Name = namespace, name
	res, err := c.Add(context.Background(), p)
	if err != nil {
		t.Fatalf("ADD %s/%s through the primary: %v", namespace, name, err)
	}
	return &pod{Pod: p, IPv4: firstIPv4(t, res)}
}

// adoptStore lists the pods as the apiserver would (on this node, running,
// with their addresses), plus a ghost pod at each extra address, and a
// policy: only role=good reaches shop/server.
func adoptStore(pods ...any) string {
	var b strings.Builder
	ghosts := 0
	for _, x := range pods {
		var name, uid, ip, role string
		switch p := x.(type) {
		case *pod:
			name, uid, ip, role = p.Name, p.UID, p.IPv4.String(), p.Name
		case string:
			ghosts++
			name, uid, ip, role = "ghost", fmt.Sprintf("00000000-0000-4000-8000-%012d", ghosts), p, "ghost"
		}
		fmt.Fprintf(&b, `apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: shop, uid: %s, labels: {role: %s}}
spec: {nodeName: e2e-node}
status: {phase: Running, podIPs: [{ip: "%s"}]}
---
`, name, uid, role, ip)
	}
	b.WriteString(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-good, namespace: shop}
spec:
  podSelector: {matchLabels: {role: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: good}}}]
`)
	return b.String()
}

// adopted lists the pods of the adopted endpoints, sorted.
func (e *env) adopted(t *testing.T) []string {
	t.Helper()
	out := e.endpointPods(t, func(ep api.EndpointInfo) bool { return ep.Adopted })
	slices.Sort(out)
	return out
}

// logLines are the lines of logs that contain every needle.
func logLines(logs string, needles ...string) []string {
	var out []string
	for l := range strings.SplitSeq(logs, "\n") {
		if !slices.ContainsFunc(needles, func(n string) bool { return !strings.Contains(l, n) }) {
			out = append(out, l)
		}
	}
	return out
}

// flushNeighbours empties the neighbour table of the bridge.
func flushNeighbours(t *testing.T, bridge string) {
	t.Helper()
	if out, err := exec.Command("ip", "neigh", "flush", "dev", bridge).CombinedOutput(); err != nil {
		t.Fatalf("ip neigh flush dev %s: %v\n%s", bridge, err, out)
	}
}

// hostLocalLeases lists host-local's lease files for ip in the chain's
// IPAM data folder.
func hostLocalLeases(t *testing.T, c *cnichain.Chain, ip string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(c.IPAMDir, "*", ip))
	var out []string
	for _, f := range m {
		if _, err := os.Stat(f); err == nil {
			out = append(out, f)
		}
	}
	return out
}
