package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// agentAt runs an agent on the given state dir, store and bpffs until stop
// is called (or the test ends).
func agentAt(t *testing.T, dir, bpffs string) (a *Agent, stop func()) {
	t.Helper()
	return agentAtWith(t, dir, bpffs, nil)
}

// agentAtWith is agentAt with before (if not nil) called between New and
// Run, to put test seams in place.
func agentAtWith(t *testing.T, dir, bpffs string, before func(*Agent)) (a *Agent, stop func()) {
	t.Helper()
	a, err := New(Config{Store: "dir:" + filepath.Join(dir, "store"), Socket: filepath.Join(dir, "agent.sock"),
		StateDir: filepath.Join(dir, "state"), BPFFS: bpffs, NodeName: "test", StoreDebounce: 20 * time.Millisecond})
	if err != nil {
		t.Fatalf("new agent: %v", err)
	}
	if before != nil {
		before(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent run: %v", err)
		}
	}
	t.Cleanup(stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := a.Status(ctx)
		if err == nil && st.Ready {
			return a, stop
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready after 10s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// After churn (pods relabelled, added and removed, policies and ipBlocks
// changed) a restarted agent's first apply writes nothing: the store is
// unchanged, so the numbering the pinned maps hold must be the one it
// compiles to. Before the fix identities were renumbered in sorted order
// at every start, and the first apply rewrote the ipcache and the policy
// slots while packets were judged by a mix of both numberings.
func TestRestartFirstApplyWritesNothing(t *testing.T) {
	privileged.Require(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	bpffs := testBPFFS(t)
	write := func(step int, docs ...string) {
		t.Helper()
		docs = append(docs, fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata: {name: marker, namespace: shop, labels: {step: %q}}\nstatus: {podIPs: [{ip: 10.88.1.%d}]}\n", fmt.Sprint(step), step))
		tmp := filepath.Join(store, ".all.tmp")
		if err := os.WriteFile(tmp, []byte(strings.Join(docs, "---\n")), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(store, "all.yaml")); err != nil {
			t.Fatal(err)
		}
	}
	waitStep := func(a *Agent, step int) {
		t.Helper()
		marker := netip.MustParsePrefix(fmt.Sprintf("10.88.1.%d/32", step))
		deadline := time.Now().Add(5 * time.Second)
		for {
			if _, ok := a.view.Load().ms.IPCache[marker]; ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("step %d not applied within 5s", step)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	ns := "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: shop}}\n"
	pod := func(name, labels, ip string) string {
		return fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: shop, labels: {%s}}\nstatus: {podIPs: [{ip: %s}]}\n", name, labels, ip)
	}
	local := func(name, labels string) string {
		return fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: shop, labels: {%s}}\n", name, labels)
	}
	np := func(name, app, from string, port int) string {
		return fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: %s, namespace: shop}
spec:
  podSelector: {matchLabels: {app: %s}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: %s}}}, {ipBlock: {cidr: 10.88.0.0/16, except: [10.88.%d.0/24]}}]
    ports: [{port: %d, protocol: TCP}]
`, name, app, from, port%250, port)
	}

	write(0, ns, local("web", "app: web"), local("db", "app: db"), pod("zeta", "app: zeta", "10.88.0.9"))
	a, stop := agentAt(t, dir, bpffs)
	waitStep(a, 0)
	for i, name := range []string{"web", "db"} {
		req := podVeth(t, fmt.Sprintf("c0ffee1%d", i), name, fmt.Sprintf("10.213.1.%d/32", i+1))
		if _, err := a.AddEndpoint(context.Background(), req); err != nil {
			t.Fatal(err)
		}
	}
	// Churn: each step numbers something new after what exists, so the
	// live numbering is no longer the sorted one.
	steps := [][]string{
		{ns, local("web", "app: web"), local("db", "app: db"), pod("zeta", "app: zeta", "10.88.0.9"), pod("alpha", "app: alpha", "10.88.0.10"), np("db", "db", "web", 5432)},
		{ns, local("web", "app: web, tier: x"), local("db", "app: db"), pod("zeta", "app: zeta", "10.88.0.9"), pod("alpha", "app: alpha", "10.88.0.10"), np("db", "db", "web", 5432), np("aaa", "web", "alpha", 80)},
		{ns, local("web", "app: web"), local("db", "app: db"), pod("alpha", "app: alpha", "10.88.0.10"), pod("beta", "app: aardvark", "10.88.0.11"), np("aaa", "web", "alpha", 80), np("db", "db", "web", 5433)},
		{ns, local("web", "app: web"), local("db", "app: db, v: \"2\""), pod("alpha", "app: alpha", "10.88.0.10"), pod("beta", "app: aardvark", "10.88.0.11"), pod("zeta", "app: zeta", "10.88.0.9"), np("aaa", "web", "alpha", 80), np("db", "db", "web", 5433)},
	}
	for i, docs := range steps {
		write(i+1, docs...)
		waitStep(a, i+1)
	}
	stop()

	// What the first apply of the restarted agent wrote: nothing, for an
	// unchanged store.
	var first atomic.Pointer[datapath.ApplyStats]
	agentAtWith(t, dir, bpffs, func(b *Agent) {
		apply := b.applyPolicy
		b.applyPolicy = func(ms *policy.MapState) (datapath.ApplyStats, error) {
			st, err := apply(ms)
			if err == nil {
				first.CompareAndSwap(nil, &st)
			}
			return st, err
		}
	})
	st := first.Load()
	if st == nil {
		t.Fatal("the restarted agent applied nothing")
	}
	if n := st.PolicyWrites + st.PolicyDeletes + st.IPCacheWrites + st.IPCacheDeletes + st.Flipped + st.Removed; n != 0 {
		t.Fatalf("the first apply after a restart with an unchanged store wrote %d entries: %+v", n, *st)
	}
}

// After the state dir is lost, an endpoint still attached is held at
// default deny under its old ID; a new ADD of its veth (the runtime's
// retry) takes the veth over, and the held endpoint is then let go without
// detaching the new one.
func TestUnrecordedEndpointTakenOverByNewADD(t *testing.T) {
	privileged.Require(t)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "store"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "store", "ns.yaml"), []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bpffs := testBPFFS(t)
	a, stop := agentAt(t, dir, bpffs)
	req := podVeth(t, "c0ffee21", "web", "10.213.2.1/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := os.RemoveAll(filepath.Join(dir, "state")); err != nil {
		t.Fatal(err)
	}
	a2, _ := agentAt(t, dir, bpffs)
	a2.mu.Lock()
	held := len(a2.fc.orphans)
	a2.mu.Unlock()
	if held != 1 {
		t.Fatalf("%d endpoints held at default deny, want 1", held)
	}
	if id, err := a2.dp.EndpointIdentity(1); err != nil || id == 0 {
		t.Fatalf("the unrecorded endpoint's live identity is %d (%v): it passes everything", id, err)
	}
	chk, err := a2.CheckEndpoint(context.Background(), api.EndpointCheckRequest{EndpointKey: req.EndpointKey,
		Netns: req.Netns, HostVeth: req.HostVeth, HostIfIndex: req.HostIfIndex, IPs: req.IPs})
	if err != nil || chk.Healthy() || !strings.Contains(strings.Join(chk.Problems, "; "), "default deny") {
		t.Fatalf("CHECK of the unrecorded endpoint: %+v, %v", chk, err)
	}
	req.ContainerID = "c0ffee22"
	if _, err := a2.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	a2.reconcileOnce(context.Background())
	a2.mu.Lock()
	held = len(a2.fc.orphans)
	a2.mu.Unlock()
	if held != 0 {
		t.Fatal("the unrecorded endpoint is still held after a new ADD took its veth over")
	}
	assertEnforced(t, a2, req)
}

// A retried ADD of a restored endpoint that arrives while the agent has no
// good store state yet is refused, and leaves the restored endpoint as it
// was. Before the fix the refusal dropped the key's registration, the
// restored endpoint's with it, and the first apply then un-enforced it.
func TestRefusedADDKeepsRestoredEndpoint(t *testing.T) {
	privileged.Require(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	good := []byte("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
	if err := os.WriteFile(filepath.Join(store, "ns.yaml"), good, 0o644); err != nil {
		t.Fatal(err)
	}
	bpffs := testBPFFS(t)
	a, stop := agentAt(t, dir, bpffs)
	req := podVeth(t, "c0ffee31", "web", "10.213.3.1/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := os.WriteFile(filepath.Join(store, "ns.yaml"), []byte("kind: [broken"), 0o644); err != nil {
		t.Fatal(err)
	}
	a2, err := New(Config{Store: "dir:" + store, Socket: filepath.Join(dir, "agent.sock"),
		StateDir: filepath.Join(dir, "state"), BPFFS: bpffs, NodeName: "test", StoreDebounce: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a2.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	addCtx, addCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer addCancel()
	if _, err := a2.AddEndpoint(addCtx, req); err == nil {
		t.Fatal("ADD succeeded without a good store state")
	}
	if err := os.WriteFile(filepath.Join(store, "ns.yaml"), good, 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, _ := a2.Status(ctx); st.Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("agent not ready after the store was fixed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	assertEnforced(t, a2, req)
}
