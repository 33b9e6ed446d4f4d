package e2e

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

const shopStore = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {serviceAccountName: frontend}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {serviceAccountName: api}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db}
`

const apiOnlyFromFrontend = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 8080, protocol: TCP}]
`

func TestEnforcementFollowsTheStore(t *testing.T) {
	for _, primary := range []string{"ptp", "bridge"} {
		t.Run(primary, func(t *testing.T) {
			e := newEnv(t, primary)
			// Removing the only policy, below, is held back for this long.
			e.extraArgs = []string{"--store-shrink-grace", "1s"}
			e.writeStore("shop.yaml", shopStore)
			e.startAgent()
			front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
			api.serve(t, 8080)

			// No policy: everything is open.
			if !front.tcpWorks(api.IPv4, 8080) || !db.tcpWorks(api.IPv4, 8080) || !db.udpWorks(api.IPv4, 8080) {
				t.Fatal("traffic blocked with no policy")
			}

			// A NetworkPolicy lets only the frontend in, on TCP 8080; it is
			// enforced within a second of the file landing.
			start := time.Now()
			e.writeStore("policy.yaml", apiOnlyFromFrontend)
			if !eventually(time.Second, func() bool { return !db.tcpWorks(api.IPv4, 8080) }) {
				t.Fatal("db still reaches api 1s after the policy was written")
			}
			t.Logf("policy enforced after %v", time.Since(start).Round(time.Millisecond))
			if !front.tcpWorks(api.IPv4, 8080) {
				t.Fatal("frontend lost access that the policy allows")
			}
			if db.udpWorks(api.IPv4, 8080) {
				t.Fatal("UDP to api passes although only TCP is allowed")
			}
			// The node itself (kubelet probes) still reaches the pod.
			if !hostTCPWorks(api.IPv4, 8080) {
				t.Fatal("the node cannot reach a default-deny pod: kubelet probes would fail")
			}
			// Replies to api's own connections still work: api → db egress is open.
			db.serve(t, 9090)
			if !api.tcpWorks(db.IPv4, 9090) {
				t.Fatal("api cannot reach db: egress should be open and replies allowed")
			}

			// The flow log names the policy on both outcomes.
			if !eventually(2*time.Second, func() bool {
				return len(e.flowLines(`"verdict":"DROPPED"`, `"ingress_denied_by":[{"name":"default-deny"`, `"pod_name":"db"`)) > 0 &&
					len(e.flowLines(`"verdict":"FORWARDED"`, `"ingress_allowed_by":[{"name":"api-from-frontend","namespace":"shop","kind":"NetworkPolicy"`)) > 0
			}) {
				t.Fatalf("flow log lacks the expected records:\n%s", strings.Join(e.flowLines(), "\n"))
			}
			dropped := e.flowLines(`"verdict":"DROPPED"`, `"pod_name":"db"`)[0]
			for _, want := range []string{`"spiffe_id":"spiffe://cluster.local/ns/shop/sa/db"`, `"spiffe_id":"spiffe://cluster.local/ns/shop/sa/api"`, `"traffic_direction":"INGRESS"`} {
				if !strings.Contains(dropped, want) {
					t.Errorf("drop record lacks %s: %s", want, dropped)
				}
			}

			// A bad file changes nothing and is reported with file:line.
			e.writeStore("zz-bad.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - ports: [{port: 99999}]\n")
			e.removeStore("policy.yaml")
			if !eventually(2*time.Second, func() bool {
				st, err := e.client.Status(context.Background())
				return err == nil && len(st.StoreErrors) > 0
			}) {
				t.Fatal("bad store file not reported in status")
			}
			st, _ := e.client.Status(context.Background())
			if se := st.StoreErrors[0]; !strings.HasSuffix(se.File, "zz-bad.yaml") || se.Line == 0 {
				t.Fatalf("store error lacks file:line: %+v", se)
			}
			time.Sleep(500 * time.Millisecond)
			if db.tcpWorks(api.IPv4, 8080) || !front.tcpWorks(api.IPv4, 8080) {
				t.Fatal("a bad store changed enforcement: the last good state must stay")
			}
			// Fixing the store applies the removal of the policy, once the
			// store has stayed without policies for the grace period.
			e.removeStore("zz-bad.yaml")
			if !eventually(3*time.Second, func() bool { return db.tcpWorks(api.IPv4, 8080) }) {
				t.Fatal("removing the policy did not reopen access")
			}
		})
	}
}

// hostTCPWorks connects from the test's own (host) network namespace.
func hostTCPWorks(to netip.Addr, port int) bool {
	c, err := net.DialTimeout("tcp4", netip.AddrPortFrom(to, uint16(port)).String(), 700*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

// TestDenyHostIngress: with --deny-host-ingress the node is no exception.
func TestDenyHostIngress(t *testing.T) {
	e := newEnv(t, "ptp")
	e.extraArgs = []string{"--deny-host-ingress"}
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api := e.addPod("shop", "frontend"), e.addPod("shop", "api")
	api.serve(t, 8080)
	if !front.tcpWorks(api.IPv4, 8080) {
		t.Fatal("frontend → api blocked")
	}
	if hostTCPWorks(api.IPv4, 8080) {
		t.Fatal("the node reaches a default-deny pod although --deny-host-ingress is set")
	}
}
