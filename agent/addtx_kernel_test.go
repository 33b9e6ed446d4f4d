package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// failingApply puts a switchable ENOMEM in front of a's apply; call it
// before the agent runs.
func failingApply(a *Agent) *atomic.Bool {
	var failing atomic.Bool
	apply := a.applyPolicy
	a.applyPolicy = func(ms *policy.MapState) (datapath.ApplyStats, error) {
		if failing.Load() {
			return datapath.ApplyStats{}, fmt.Errorf("write policy: %w", syscall.ENOMEM)
		}
		return apply(ms)
	}
	return &failing
}

// assertNotFailOpen fails when ep's programs are attached while the live
// datapath has no config for its ID: segment.c passes everything such an
// endpoint sends and receives.
func assertNotFailOpen(t *testing.T, a *Agent, ep datapath.Endpoint) {
	t.Helper()
	attached, err := a.dp.Attached(ep)
	if err != nil {
		t.Fatalf("inspect %s: %v", ep.Ifname, err)
	}
	if !attached {
		return
	}
	if id, err := a.dp.EndpointIdentity(ep.ID); err != nil || id == 0 {
		t.Fatalf("programs stay attached to %s as endpoint %d, which has no config (identity %d, %v): all its traffic passes",
			ep.Ifname, ep.ID, id, err)
	}
}

// An ADD that fails late is rolled back; when the rollback's apply fails
// too (a full map), the endpoint is unregistered all the same, and the
// rest of the rollback must still run. Before the fix it stopped there:
// the programs stayed attached and the record stayed, and the next good
// apply removed the endpoint's config, so everything passed.
func TestRollbackWithFailedApplyDetaches(t *testing.T) {
	a, _ := newTestAgent(t)
	failing := failingApply(a)
	attach := a.attach
	var ep datapath.Endpoint
	a.attach = func(e datapath.Endpoint) (datapath.AttachMode, error) {
		ep = e
		if _, err := attach(e); err != nil {
			return "", err
		}
		failing.Store(true) // the rollback's apply fails
		return "", errors.New("injected late failure")
	}
	startTestAgent(t, a)
	req := podVeth(t, "c0ffee41", "web", "10.213.4.1/32")
	if _, err := a.AddEndpoint(context.Background(), req); err == nil {
		t.Fatal("the faulted ADD succeeded")
	}
	failing.Store(false)
	if err := a.submit(context.Background(), &change{refresh: true}); err != nil {
		t.Fatal(err)
	}
	assertNotFailOpen(t, a, ep)
	if keys, _ := a.records.Keys(); len(keys) != 0 {
		t.Errorf("records after the rolled-back ADD: %v", keys)
	}
	a.mu.Lock()
	reserved := a.idReservedLocked(ep.ID)
	a.mu.Unlock()
	if !reserved {
		t.Errorf("the rolled-back endpoint's ID %d is free for reuse at once", ep.ID)
	}
}

// A DEL whose apply fails has unregistered the endpoint all the same: its
// programs are detached and its record deleted. Before the fix both
// stayed, a retried DEL answered "unknown", and the next good apply left
// the veth's programs with no config.
func TestDeleteWithFailedApplyDetaches(t *testing.T) {
	a, _ := newTestAgent(t)
	failing := failingApply(a)
	startTestAgent(t, a)
	req := podVeth(t, "c0ffee42", "web", "10.213.4.2/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	ep := a.endpoints[req.EndpointKey].dpEndpoint()
	a.mu.Unlock()
	failing.Store(true)
	del := api.EndpointDelRequest{EndpointKey: req.EndpointKey}
	if _, err := a.DeleteEndpoint(context.Background(), del); err == nil {
		t.Fatal("DEL with a failing apply succeeded")
	}
	failing.Store(false)
	if _, err := a.DeleteEndpoint(context.Background(), del); err != nil {
		t.Fatalf("retried DEL: %v", err)
	}
	assertNotFailOpen(t, a, ep)
	if keys, _ := a.records.Keys(); len(keys) != 0 {
		t.Errorf("records after the DEL: %v", keys)
	}
	a.mu.Lock()
	reserved := a.idReservedLocked(ep.ID)
	a.mu.Unlock()
	if !reserved {
		t.Errorf("the deleted endpoint's ID %d is free for reuse at once", ep.ID)
	}
}

// A repeated ADD of a key on another veth shares the earlier endpoint's ID;
// when it fails late, its rollback must leave the earlier endpoint able to
// send. Before the fix the new veth's attach overwrote the ID's source
// addresses and the rollback's detach cleared them: the earlier pod's every
// packet was dropped as a forged source.
func TestRollbackOnOtherVethKeepsEarlierEndpoint(t *testing.T) {
	a := runAgent(t)
	first := podVeth(t, "c0ffee43", "web", "10.213.4.3/32")
	if _, err := a.AddEndpoint(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	id := a.endpoints[first.EndpointKey].ID
	a.mu.Unlock()
	mac0, addrs0, err := a.dp.EndpointAddrs(id)
	if err != nil || len(addrs0) == 0 {
		t.Fatalf("source addresses after the first ADD: %v %v", addrs0, err)
	}
	second := podVeth(t, "c0ffee43", "web", "10.213.4.4/32")
	attach := a.attach
	a.attach = failAfterAttach(attach)
	if _, err := a.AddEndpoint(context.Background(), second); err == nil {
		t.Fatal("the faulted ADD succeeded")
	}
	a.attach = attach
	assertEnforced(t, a, first)
	mac, addrs, err := a.dp.EndpointAddrs(id)
	if err != nil || !slices.Equal(addrs, addrs0) || mac.String() != mac0.String() {
		t.Fatalf("after the rollback endpoint %d may send from %v %v (%v), want %v %v", id, mac, addrs, err, mac0, addrs0)
	}
	if ok, _ := a.dp.Attached(datapath.Endpoint{ID: id, Ifname: second.HostVeth, Ifindex: second.HostIfIndex}); ok {
		t.Error("the rolled-back ADD's veth stays attached")
	}
}

// An ADD refused before it attached (no good store state yet, after a
// restart that lost the state dir) must not detach what is on its veth:
// there, an unrecorded endpoint held at default deny. And the reconciler
// must not read "programs not attached" as "taken over by a new endpoint":
// only a known endpoint on the veth takes it over. Before the fix the
// refused ADD's rollback detached the held endpoint, and the reconciler
// then dropped it.
func TestRefusedADDKeepsHeldEndpoint(t *testing.T) {
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
	req := podVeth(t, "c0ffee44", "web", "10.213.4.5/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	held := a.endpoints[req.EndpointKey].dpEndpoint()
	a.mu.Unlock()
	stop()
	if err := os.RemoveAll(filepath.Join(dir, "state")); err != nil {
		t.Fatal(err)
	}
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
	isHeld := func() bool {
		a2.mu.Lock()
		defer a2.mu.Unlock()
		return a2.fc.orphans[held.ID] != nil
	}
	if !isHeld() {
		t.Fatal("the unrecorded endpoint is not held at default deny")
	}
	retry := req
	retry.ContainerID = "c0ffee45"
	addCtx, addCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer addCancel()
	if _, err := a2.AddEndpoint(addCtx, retry); !errors.Is(err, api.ErrNotReady) {
		t.Fatalf("ADD without a good store state: %v, want not_ready", err)
	}
	if ok, err := a2.dp.Attached(held); err != nil || !ok {
		t.Fatalf("the refused ADD detached the endpoint held at default deny: attached %v (%v)", ok, err)
	}
	a2.reconcileOnce(ctx)
	if !isHeld() {
		t.Fatal("the reconciler let go of the held endpoint after a refused ADD")
	}
	// Programs gone from a veth no known endpoint has are no take-over.
	if err := a2.dp.Forget(held); err != nil {
		t.Fatal(err)
	}
	a2.reconcileOnce(ctx)
	if !isHeld() {
		t.Fatal("the reconciler let go of the held endpoint while no known endpoint has its veth")
	}
}
