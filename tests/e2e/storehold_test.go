package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// `rm *.yaml; cp new/*.yaml .` with a gap longer than the debounce used to
// apply an empty store, and open every pod. A store that loses every policy
// or most of its objects at once is now held back: the last state stays
// enforced, status and metrics say so, and the held state is applied only
// once it has stayed the same for --store-shrink-grace.
func TestEmptiedStoreIsHeldBack(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	const grace = 4 * time.Second
	e := newEnv(t, "ptp")
	e.extraArgs = []string{"--store-shrink-grace", grace.String(), "--metrics-addr", addr}
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, apiPod, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	apiPod.serve(t, 8080)
	if !front.tcpWorks(apiPod.IPv4, 8080) || db.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("policy not enforced as expected")
	}

	// rm *.yaml, and the copy of the new files is slow to come.
	emptied := time.Now()
	e.removeStore("shop.yaml")
	e.removeStore("policy.yaml")
	// Well past the debounce (200 ms), within the grace period.
	time.Sleep(time.Second)
	if db.tcpWorks(apiPod.IPv4, 8080) || !front.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("an emptied store changed enforcement before its grace period: db reaches api")
	}
	held := waitHold(t, e, time.Second)
	if held.AppliedObjects != 5 || held.AppliedPolicies != 1 || held.HeldObjects != 0 || held.HeldPolicies != 0 ||
		!strings.Contains(held.Reason, "every policy") || held.Until.Sub(held.Since) != grace {
		t.Fatalf("hold: %+v", held)
	}
	if body := scrape(t, addr); !strings.Contains(body, "bulkhead_store_held 1") || !strings.Contains(body, "bulkhead_store_holds_total 1") {
		t.Fatalf("metrics do not show the hold:\n%s", grepLines(body, "store_hold"))
	}
	out, _ := e.bulkhead(t, "status")
	if !strings.Contains(out, "Store held: every policy is gone") || !strings.Contains(out, "stays enforced") {
		t.Fatalf("bulkhead status does not show the hold:\n%s", out)
	}

	// The copy lands before the grace period ends: the hold ends, and the
	// policy was enforced throughout.
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	if !eventually(2*time.Second, func() bool { return status(t, e).StoreHeld == nil }) {
		t.Fatal("the hold did not end when the store was filled again")
	}
	if time.Since(emptied) > grace {
		t.Fatalf("the test was too slow (%v) to show the hold ending before the grace period", time.Since(emptied))
	}
	time.Sleep(grace)
	if db.tcpWorks(apiPod.IPv4, 8080) || !front.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("enforcement changed after the store was filled again")
	}
	if body := scrape(t, addr); !strings.Contains(body, "bulkhead_store_held 0") {
		t.Fatalf("metrics still show a hold:\n%s", grepLines(body, "store_hold"))
	}

	// Emptying the store on purpose: wait out the grace period.
	e.removeStore("policy.yaml")
	held = waitHold(t, e, 2*time.Second)
	if db.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("removing the only policy opened access before the grace period")
	}
	if !eventually(grace+3*time.Second, func() bool { return db.tcpWorks(apiPod.IPv4, 8080) }) {
		t.Fatal("the held state was not applied after its grace period")
	}
	if opened := time.Now(); opened.Before(held.Until) {
		t.Fatalf("access opened at %v, before the hold's end %v", opened, held.Until)
	}
	if st := status(t, e); st.StoreHeld != nil {
		t.Fatalf("still held after the grace period: %+v", st.StoreHeld)
	}
}

// An agent restarted on an emptied store holds it back as well: the pinned
// maps keep enforcing the last applied state, which the agent remembers in
// its state dir, and a restart must not open every pod at once.
func TestRestartOnEmptiedStoreIsHeldBack(t *testing.T) {
	e := newEnv(t, "ptp")
	e.extraArgs = []string{"--store-shrink-grace", "1m"}
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, apiPod, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	apiPod.serve(t, 8080)
	if !front.tcpWorks(apiPod.IPv4, 8080) || db.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("policy not enforced as expected")
	}
	e.stopAgent(syscall.SIGTERM)
	e.removeStore("shop.yaml")
	e.removeStore("policy.yaml")
	e.launchAgent()
	var st api.StatusResponse
	if !eventually(10*time.Second, func() bool {
		s, err := e.client.Status(context.Background())
		st = s
		return err == nil && s.StoreHeld != nil
	}) {
		t.Fatalf("the emptied store was not held back after a restart (last status %+v):\n%s", st, e.agentLogs())
	}
	if st.StoreHeld.AppliedPolicies != 1 || st.StoreHeld.AppliedObjects != 5 {
		t.Fatalf("hold: %+v", st.StoreHeld)
	}
	if db.tcpWorks(apiPod.IPv4, 8080) || !front.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("a restart on an emptied store changed enforcement")
	}
	// The files come back: the hold ends and the agent is ready.
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.waitReady()
	if st := status(t, e); st.StoreHeld != nil {
		t.Fatalf("still held: %+v", st.StoreHeld)
	}
	if db.tcpWorks(apiPod.IPv4, 8080) || !front.tcpWorks(apiPod.IPv4, 8080) {
		t.Fatal("policy not enforced after the store came back")
	}
}

func status(t *testing.T, e *env) api.StatusResponse {
	t.Helper()
	st, err := e.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func waitHold(t *testing.T, e *env, d time.Duration) *api.StoreHold {
	t.Helper()
	var h *api.StoreHold
	if !eventually(d, func() bool { h = status(t, e).StoreHeld; return h != nil }) {
		t.Fatalf("the shrunken store was not held back:\n%s", e.agentLogs())
	}
	return h
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://%s/metrics", addr))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(s, needle string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, needle) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
