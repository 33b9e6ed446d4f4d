package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestLostRecordStaysDenied: an endpoint whose record is unreadable (a
// corrupt file) or gone (a state dir that did not survive while bpffs did)
// stays enforced after a restart: traffic its policy denies is still
// denied, the record is quarantined rather than deleted, and status says
// so. Before the fix the agent deleted the record, and its first apply gave
// the endpoint identity 0, which passes everything, while the programs
// stayed attached.
func TestLostRecordStaysDenied(t *testing.T) {
	for _, how := range []string{"corrupt", "wiped"} {
		t.Run(how, func(t *testing.T) { testLostRecordStaysDenied(t, how) })
	}
}

func testLostRecordStaysDenied(t *testing.T, how string) {
	e := newEnv(t, "ptp")
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)
	if !front.tcpWorks(api.IPv4, 8080) || db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("policy not enforced before the restart")
	}
	e.stopAgent(syscall.SIGKILL)
	records := filepath.Join(e.stateDir, "endpoints")
	apiRecord := filepath.Join(records, api.ContainerID+"_eth0.json")
	switch how {
	case "corrupt":
		if err := os.WriteFile(apiRecord, []byte(`{"key":{"containerID":`), 0o600); err != nil {
			t.Fatal(err)
		}
	case "wiped":
		if err := os.RemoveAll(e.stateDir); err != nil {
			t.Fatal(err)
		}
	}
	e.startAgent()
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatalf("%s record: db reaches api after the restart: the endpoint was un-enforced\nagent log:\n%s", how, e.agentLogs())
	}
	st, err := e.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	warnings := strings.Join(st.EndpointWarnings, "\n")
	if !strings.Contains(warnings, "without a record") {
		t.Errorf("status does not report the unrecorded endpoint: %q", warnings)
	}
	if how == "corrupt" {
		bad, _ := filepath.Glob(apiRecord + ".bad-*")
		if len(bad) != 1 {
			t.Errorf("corrupt record not quarantined: %v", bad)
		}
		if !strings.Contains(warnings, api.ContainerID) {
			t.Errorf("status does not name the quarantined record: %q", warnings)
		}
	}
	// A new pod gets an ID of its own, not the unrecorded endpoint's (which
	// would make the old veth judge by the new pod's policy).
	e.addPod("shop", "frontend2")
	if db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("db reaches api after another pod was added")
	}
	// The pod goes: its veth with it, and the agent lets the endpoint go.
	held := func() int {
		st, err := e.client.Status(context.Background())
		if err != nil {
			return -1
		}
		return strings.Count(strings.Join(st.EndpointWarnings, "\n"), "without a record")
	}
	before := held()
	if err := e.chain.Remove(context.Background(), api.Pod); err != nil {
		t.Fatal(err)
	}
	if !eventually(5*time.Second, func() bool { return held() == before-1 }) {
		t.Fatal("the unrecorded endpoint is still held after its veth went")
	}
}

// TestRestartUnderChurnKeepsVerdicts kills the agent with SIGKILL in the
// middle of churn (pods added and removed, labels and policies changing)
// and restarts it, while probes of real traffic run throughout. The probed
// pairs are ones every state of the churn agrees on, so any other verdict
// is a crossing of two numberings or a mixed state.
func TestRestartUnderChurnKeepsVerdicts(t *testing.T) {
	e := newEnv(t, "ptp")
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)

	var probes, wrong atomic.Int64
	var mu sync.Mutex
	var failures []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	probe := func(from *pod, want bool, what string) {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			got := false
			if c, err := from.dial("tcp4", api.IPv4, 8080, 250*time.Millisecond); err == nil {
				got = echo(c)
				c.Close()
			}
			probes.Add(1)
			if got != want {
				wrong.Add(1)
				mu.Lock()
				failures = append(failures, fmt.Sprintf("probe %d at %s: %s %v, want %v", i, time.Now().Format("15:04:05.000"), what, got, want))
				mu.Unlock()
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	wg.Go(func() { probe(front, true, "frontend→api") })
	wg.Go(func() { probe(db, false, "db→api") })
	// An established connection is re-judged at every new revision from
	// what its conntrack entry recorded, identity numbers included: a
	// restarted agent that numbered differently would judge it as coming
	// from someone else.
	conn, err := front.dial("tcp4", api.IPv4, 8080, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	wg.Go(func() {
		buf := make([]byte, 64)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			msg := fmt.Appendf(nil, "long-lived %06d", i)
			_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
			_, werr := conn.Write(msg)
			n, rerr := 0, werr
			if werr == nil {
				n, rerr = io.ReadFull(conn, buf[:len(msg)])
			}
			probes.Add(1)
			if rerr != nil || string(buf[:n]) != string(msg) {
				wrong.Add(1)
				mu.Lock()
				failures = append(failures, fmt.Sprintf("established frontend→api connection broke at message %d (%s): %v", i, time.Now().Format("15:04:05.000"), rerr))
				mu.Unlock()
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	churn := func(round int) {
		// Labels of pods outside the probed pairs flap, pods come and go,
		// and a second policy appears and changes: identities and rules
		// are numbered and retired in an order that is not sorted. The
		// aardvark label sets sort before every probed pod's, so numbering
		// afresh in sorted order would move all of theirs.
		e.writeStore("extra.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {name: w%[1]d, namespace: shop, labels: {app: w, round: "%[1]d"}}
---
apiVersion: v1
kind: Pod
metadata: {name: remote%[1]d, namespace: shop, labels: {app: remote%[2]d}}
status: {podIPs: [{ip: 10.99.%[1]d.%[2]d}]}
---
apiVersion: v1
kind: Pod
metadata: {name: aardvark, namespace: shop, labels: {app: aardvark%[4]d}}
status: {podIPs: [{ip: 10.99.200.1}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: w-policy, namespace: shop}
spec:
  podSelector: {matchLabels: {app: w}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: remote%[2]d}}}, {ipBlock: {cidr: 10.99.0.0/16}}]
    ports: [{port: %[3]d, protocol: TCP}]
`, round, round%3, 1000+round, min(round, 3)))
		w := e.addPod("shop", fmt.Sprintf("w%d", round))
		if round%2 == 0 {
			if err := e.chain.Remove(context.Background(), w.Pod); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(300 * time.Millisecond)
	}
	// numbering maps each identity (by what it is) to its number.
	numbering := func() map[string]uint32 {
		l, err := e.client.ListIdentities(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]uint32{}
		for _, id := range l.Identities {
			out[fmt.Sprint(id.Reserved, id.Namespace, id.ServiceAccount, id.Labels)] = id.ID
		}
		return out
	}
	round := 0
	for restart := range 3 {
		for range 3 {
			churn(round)
			round++
		}
		before := numbering()
		e.stopAgent(syscall.SIGKILL)
		time.Sleep(200 * time.Millisecond)
		e.startAgent()
		// The store did not change across the kill, so the restarted
		// agent numbers every identity as its predecessor did.
		for k, id := range numbering() {
			if old, ok := before[k]; ok && old != id {
				t.Errorf("restart %d: identity %s renumbered %d -> %d", restart+1, k, old, id)
			}
		}
	}
	churn(round)
	close(stop)
	wg.Wait()
	t.Logf("%d probes, %d wrong", probes.Load(), wrong.Load())
	if len(failures) > 0 {
		t.Fatalf("verdicts that neither the old nor the new state gives:\n%s", strings.Join(failures, "\n"))
	}
	if probes.Load() < 100 {
		t.Fatalf("only %d probes ran", probes.Load())
	}
}
