package e2e

import (
	"bytes"
	"io"
	"syscall"
	"testing"
	"time"
)

// TestKill9KeepsConnectionsAndEnforcement kills the agent with SIGKILL
// during a live TCP connection: the connection keeps flowing, denied
// traffic stays denied while no agent runs, and after the restart a policy
// change still applies.
func TestKill9KeepsConnectionsAndEnforcement(t *testing.T) {
	forEachChain(t, testKill9KeepsConnectionsAndEnforcement)
}

func testKill9KeepsConnectionsAndEnforcement(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)

	conn, err := front.dial("tcp4", api.IPv4, 8080, time.Second)
	if err != nil {
		t.Fatalf("frontend → api: %v", err)
	}
	defer conn.Close()
	roundTrip := func(what string) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		msg := []byte(what)
		if _, err := conn.Write(msg); err != nil {
			t.Fatalf("%s: write: %v", what, err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(conn, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("%s: echo: %q %v", what, buf, err)
		}
	}
	roundTrip("before kill")
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("db reaches api before the kill")
	}

	e.stopAgent(syscall.SIGKILL)
	roundTrip("agent dead")
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("enforcement lapsed while the agent was dead")
	}

	e.startAgent()
	roundTrip("agent restarted")
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("db reaches api after the restart")
	}

	// Tighten: nothing may reach api. The established connection is cut
	// (conntrack re-checks at the new revision) and new ones fail.
	e.writeStore("policy.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
`)
	if !eventually(2*time.Second, func() bool { return !front.tcpWorks(api.IPv4, 8080) }) {
		t.Fatal("policy change after restart did not apply")
	}
	_ = conn.SetDeadline(time.Now().Add(700 * time.Millisecond))
	if _, err := conn.Write([]byte("after tightening")); err == nil {
		buf := make([]byte, 16)
		if _, err := io.ReadFull(conn, buf); err == nil {
			t.Fatal("established connection still flows after the policy was tightened")
		}
	}
}
