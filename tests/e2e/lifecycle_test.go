package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

const openStore = `
apiVersion: v1
kind: Namespace
metadata: {name: shop}
`

// TestSpecVersions runs ADD, CHECK and DEL through the chain for every
// supported spec version, against the real agent.
func TestSpecVersions(t *testing.T) { forEachChain(t, testSpecVersions) }

func testSpecVersions(t *testing.T, primary string) {
	for _, v := range cnichain.SpecVersions() {
		t.Run(v, func(t *testing.T) {
			e := newEnv(t, primary)
			e.chain = cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: v,
				Bulkhead: &cnichain.BulkheadConfig{Socket: e.socket, AgentWaitSeconds: 5}})
			e.writeStore("ns.yaml", openStore)
			e.startAgent()
			p := e.addPod("shop", "a")
			if v != "0.3.1" { // CHECK exists from 0.4.0 on
				if err := e.chain.Check(context.Background(), p.Pod); err != nil {
					t.Fatalf("CHECK: %v", err)
				}
			}
			if n := len(e.endpoints(t)); n != 1 {
				t.Fatalf("agent has %d endpoints after ADD, want 1", n)
			}
			if err := e.chain.Del(context.Background(), p.Pod); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if n := len(e.endpoints(t)); n != 0 {
				t.Fatalf("agent has %d endpoints after DEL, want 0", n)
			}
			if err := e.chain.Del(context.Background(), p.Pod); err != nil {
				t.Fatalf("second DEL: %v", err)
			}
		})
	}
}

// endpoints lists the pods of the agent's endpoints, in its order.
func (e *env) endpoints(t *testing.T) []string {
	t.Helper()
	return e.endpointPods(t, func(api.EndpointInfo) bool { return true })
}

// endpointPods lists the pods of the endpoints that keep holds for.
func (e *env) endpointPods(t *testing.T, keep func(api.EndpointInfo) bool) []string {
	t.Helper()
	l, err := e.client.ListEndpoints(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, ep := range l.Endpoints {
		if keep(ep) {
			out = append(out, ep.Pod.Namespace+"/"+ep.Pod.Name)
		}
	}
	return out
}

// TestCheckDetectsDetachedPrograms: CHECK fails once the programs are gone
// from the pod's veth.
func TestCheckDetectsDetachedPrograms(t *testing.T) {
	forEachChain(t, testCheckDetectsDetachedPrograms)
}

func testCheckDetectsDetachedPrograms(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	p := e.addPod("shop", "a")
	if err := e.chain.Check(context.Background(), p.Pod); err != nil {
		t.Fatalf("CHECK on a healthy pod: %v", err)
	}
	eps, err := e.client.ListEndpoints(context.Background())
	if err != nil || len(eps.Endpoints) != 1 {
		t.Fatalf("endpoints: %v %v", eps, err)
	}
	// Detach behind the agent's back: remove the pinned TCX links.
	links, _ := filepath.Glob(filepath.Join(e.bpffs, "links", "*"))
	if len(links) == 0 {
		t.Fatalf("no pinned links under %s", e.bpffs)
	}
	for _, l := range links {
		if err := os.Remove(l); err != nil {
			t.Fatal(err)
		}
	}
	err = e.chain.Check(context.Background(), p.Pod)
	if err == nil || !strings.Contains(err.Error(), "not attached") {
		t.Fatalf("CHECK after detach = %v, want a 'not attached' error", err)
	}
	// A restarted agent re-attaches what is missing.
	e.stopAgent(syscall.SIGTERM)
	e.startAgent()
	if err := e.chain.Check(context.Background(), p.Pod); err != nil {
		t.Fatalf("CHECK after the agent restarted: %v", err)
	}
}

// TestAddBeforeAgent: an ADD issued before the agent runs waits for it and
// succeeds once it is up; without an agent it fails with a clear message.
func TestAddBeforeAgent(t *testing.T) { forEachChain(t, testAddBeforeAgent) }

func testAddBeforeAgent(t *testing.T, primary string) {
	// The early ADD waits up to 60 s: on a loaded 2-vCPU machine the agent
	// can take longer than the default window to load its datapath, and
	// this half is about the ADD waiting, not about how fast the agent is.
	e := newEnvWait(t, primary, false, 60)
	e.writeStore("ns.yaml", openStore)

	p := e.chain.NewPod(t)
	p.Namespace, p.Name = "shop", "early"
	errc := make(chan error, 1)
	go func() {
		_, err := e.chain.Add(context.Background(), p)
		errc <- err
	}()
	time.Sleep(time.Second)
	e.startAgent()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("ADD that started before the agent failed: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ADD still waiting 10s after the agent came up")
	}
	if got := e.endpoints(t); len(got) != 1 || got[0] != "shop/early" {
		t.Fatalf("endpoints = %v", got)
	}

	// No agent at all: the ADD fails after agentWaitSeconds (5 s here) and
	// says what to do.
	e.stopAgent(syscall.SIGTERM)
	noAgent := newEnv(t, primary)
	late := noAgent.chain.NewPod(t)
	start := time.Now()
	_, err := noAgent.chain.Add(context.Background(), late)
	if err == nil {
		t.Fatal("ADD succeeded without an agent: a pod would run unenforced")
	}
	if took := time.Since(start); took < 4*time.Second {
		t.Fatalf("ADD gave up after %v, before the 5s window", took)
	}
	for _, want := range []string{"bulkhead-agent", "start bulkhead-agent"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestDelWhileAgentDown: DEL succeeds with the agent down, and the agent
// reconciles the endpoint away when it comes back.
func TestDelWhileAgentDown(t *testing.T) { forEachChain(t, testDelWhileAgentDown) }

func testDelWhileAgentDown(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	keep, gone := e.addPod("shop", "keep"), e.addPod("shop", "gone")
	_ = keep
	e.stopAgent(syscall.SIGTERM)
	if err := e.chain.Del(context.Background(), gone.Pod); err != nil {
		t.Fatalf("DEL with the agent down: %v", err)
	}
	if err := e.chain.RemoveNetns(gone.Pod); err != nil {
		t.Fatal(err)
	}
	e.startAgent()
	if got := e.endpoints(t); len(got) != 1 || got[0] != "shop/keep" {
		t.Fatalf("after restart endpoints = %v, want [shop/keep]", got)
	}
	recs, _ := filepath.Glob(filepath.Join(e.stateDir, "endpoints", "*.json"))
	if len(recs) != 1 {
		t.Fatalf("state records = %v, want one", recs)
	}
}

// TestGC: GC removes endpoints the runtime no longer lists.
func TestGC(t *testing.T) { forEachChain(t, testGC) }

func testGC(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	a, b, c := e.addPod("shop", "a"), e.addPod("shop", "b"), e.addPod("shop", "c")
	if err := e.chain.GC(context.Background(), a.Pod, c.Pod); err != nil {
		t.Fatalf("GC: %v", err)
	}
	got := e.endpoints(t)
	if len(got) != 2 || got[0] != "shop/a" || got[1] != "shop/c" {
		t.Fatalf("after GC endpoints = %v, want [shop/a shop/c]", got)
	}
	_ = b
}

// TestConcurrentAdds: twenty pods at once, as kubelet starts them.
func TestConcurrentAdds(t *testing.T) { forEachChain(t, testConcurrentAdds) }

func testConcurrentAdds(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	const n = 20
	pods := make([]*cnichain.Pod, n)
	for i := range pods {
		pods[i] = e.chain.NewPod(t)
		pods[i].Namespace, pods[i].Name = "shop", fmt.Sprintf("p%02d", i)
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range pods {
		wg.Go(func() { _, errs[i] = e.chain.Add(context.Background(), pods[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("ADD %d: %v", i, err)
		}
	}
	if got := e.endpoints(t); len(got) != n {
		t.Fatalf("agent has %d endpoints, want %d", len(got), n)
	}
	batches := strings.Count(e.agentLogs(), `"msg":"policy applied"`)
	t.Logf("%d concurrent ADDs took %d policy applies", n, batches)
}

// TestChurnLeavesNothing adds and deletes 200 pods and then checks that no
// link, pin, map entry or state record is left.
func TestChurnLeavesNothing(t *testing.T) { forEachChain(t, testChurnLeavesNothing) }

func testChurnLeavesNothing(t *testing.T, primary string) {
	e := newEnv(t, primary)
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	// The host-side veths this test's pods got; other packages' tests run
	// in parallel and make veths of their own, so a host-wide count would
	// not be this test's.
	var hostVeths []string
	const total, wave = 200, 20
	for done := 0; done < total; done += wave {
		pods := make([]*cnichain.Pod, wave)
		var wg sync.WaitGroup
		errs := make([]error, wave)
		results := make([]types.Result, wave)
		for i := range pods {
			pods[i] = e.chain.NewPod(t)
			pods[i].Namespace, pods[i].Name = "shop", fmt.Sprintf("churn-%03d", done+i)
			wg.Go(func() { results[i], errs[i] = e.chain.Add(context.Background(), pods[i]) })
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("ADD %d: %v", done+i, err)
			}
			hostVeths = append(hostVeths, hostVethNames(t, results[i])...)
		}
		for _, p := range pods {
			if err := e.chain.Remove(context.Background(), p); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := e.endpoints(t); len(got) != 0 {
		t.Fatalf("%d endpoints left: %v", len(got), got)
	}
	if len(hostVeths) != total {
		t.Errorf("ADD results named %d host veths for %d pods", len(hostVeths), total)
	}
	for _, name := range hostVeths {
		if _, err := netlink.LinkByName(name); err == nil {
			t.Errorf("host veth %s is left after its pod was deleted", name)
		}
	}
	links, _ := filepath.Glob(filepath.Join(e.bpffs, "links", "*"))
	if len(links) != 0 {
		t.Errorf("%d link pins left: %v", len(links), links)
	}
	recs, _ := filepath.Glob(filepath.Join(e.stateDir, "endpoints", "*"))
	if len(recs) != 0 {
		t.Errorf("%d state records left", len(recs))
	}
	for _, m := range []string{"endpoints", "policy"} {
		if n := mapEntries(t, filepath.Join(e.bpffs, "maps", m)); n != 0 {
			t.Errorf("map %s has %d entries left", m, n)
		}
	}
	if n := nonZeroArrayEntries(t, filepath.Join(e.bpffs, "maps", "endpoints_array")); n != 0 {
		t.Errorf("endpoints_array attributes %d ifindexes to endpoints after churn", n)
	}
	if n := nonZeroArrayEntries(t, filepath.Join(e.bpffs, "maps", "ep_configs")); n != 0 {
		t.Errorf("ep_configs configures %d endpoints after churn", n)
	}
	if n := nonZeroArrayEntries(t, filepath.Join(e.bpffs, "maps", "endpoint_addrs")); n != 0 {
		t.Errorf("endpoint_addrs holds the source addresses of %d endpoints after churn", n)
	}
}

// hostVethNames lists the host-side veths of an ADD result (a bridge
// primary also names its bridge, which outlives the pods).
func hostVethNames(t *testing.T, r types.Result) []string {
	t.Helper()
	res, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatalf("ADD result: %v", err)
	}
	var out []string
	for _, ifc := range res.Interfaces {
		if ifc.Sandbox != "" {
			continue
		}
		if l, err := netlink.LinkByName(ifc.Name); err == nil && l.Type() == "veth" {
			out = append(out, ifc.Name)
		}
	}
	return out
}

func mapEntries(t *testing.T, pin string) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		t.Fatalf("map pin %s missing", pin)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	keySize := m.KeySize()
	n := 0
	key := make([]byte, keySize)
	next := make([]byte, keySize)
	var cur any
	for {
		if err := m.NextKey(cur, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n
			}
			t.Fatal(err)
		}
		n++
		copy(key, next)
		cur = key
	}
}

// nonZeroArrayEntries counts the array entries that are not all zero.
func nonZeroArrayEntries(t *testing.T, pin string) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatalf("open %s: %v", pin, err)
	}
	defer m.Close()
	n := 0
	var k uint32
	v := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		if slices.ContainsFunc(v, func(b byte) bool { return b != 0 }) {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}
