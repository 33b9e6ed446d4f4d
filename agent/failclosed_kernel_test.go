package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/tests/netns"
)

// podVeth makes a pod netns and a veth whose host end is in this (the
// agent's) namespace, and returns an ADD request for it.
func podVeth(t testing.TB, container, name, ip string) api.EndpointAddRequest {
	t.Helper()
	cur, err := ns.GetCurrentNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cur.Close() })
	pod := netns.New(t)
	host := fmt.Sprintf("bhfc%d", time.Now().UnixNano()%1e9)
	idx := netns.Veth(t, &netns.NS{NetNS: cur}, host, pod, "eth0")
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(host); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	return api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: container, IfName: "eth0"},
		Netns:       pod.Path(), HostVeth: host, HostIfIndex: idx,
		IPs: []netip.Prefix{netip.MustParsePrefix(ip)},
		Pod: api.PodRef{Namespace: "shop", Name: name},
	}
}

// assertEnforced fails unless the endpoint of req is registered, recorded,
// attached and carries a non-zero identity.
func assertEnforced(t *testing.T, a *Agent, req api.EndpointAddRequest) {
	t.Helper()
	a.mu.Lock()
	rec := a.endpoints[req.EndpointKey]
	var cp endpointRecord
	if rec != nil {
		cp = *rec
	}
	a.mu.Unlock()
	if rec == nil {
		t.Fatal("endpoint no longer registered")
	}
	if _, err := a.records.Get(recordKey(req.EndpointKey)); err != nil {
		t.Fatalf("record: %v", err)
	}
	if ok, err := a.dp.Attached(cp.dpEndpoint()); err != nil || !ok {
		t.Fatalf("programs attached: %v %v", ok, err)
	}
	if id, err := a.dp.EndpointIdentity(cp.ID); err != nil || id == 0 {
		t.Fatalf("live identity %d (%v): the endpoint passes everything", id, err)
	}
}

// failAfterAttach fails an ADD as late as an ADD can fail: after its
// attach (and, alongside it, its record) succeeded.
func failAfterAttach(attach func(datapath.Endpoint) (datapath.AttachMode, error)) func(datapath.Endpoint) (datapath.AttachMode, error) {
	return func(ep datapath.Endpoint) (datapath.AttachMode, error) {
		if _, err := attach(ep); err != nil {
			return "", err
		}
		return "", errors.New("injected late failure")
	}
}

// Two ADDs of one key, the first failing as late as an ADD can (after its
// attach and record): the second, which the runtime sent as a retry, is
// enforced at the end, whichever order they run in. Before the fix the
// first ADD's rollback deleted the key's endpoint, record and attach, and
// with them the retry that had already answered "enforced".
func TestAddRollbackKeepsConcurrentRetry(t *testing.T) {
	a := runAgent(t)
	req := podVeth(t, "c0ffee01", "web", "10.213.0.9/32")
	retryDone := make(chan error, 1)
	first := true
	attach := a.attach
	a.attach = func(ep datapath.Endpoint) (datapath.AttachMode, error) {
		mode, err := attach(ep)
		if !first || err != nil {
			return mode, err
		}
		first = false
		go func() {
			_, err := a.AddEndpoint(context.Background(), req)
			retryDone <- err
		}()
		// Give the retry time to answer if nothing makes it wait.
		select {
		case err := <-retryDone:
			retryDone <- err
		case <-time.After(time.Second):
		}
		return "", errors.New("injected late failure")
	}
	if _, err := a.AddEndpoint(context.Background(), req); err == nil {
		t.Fatal("the faulted ADD succeeded")
	}
	if err := <-retryDone; err != nil {
		t.Fatalf("retried ADD: %v", err)
	}
	assertEnforced(t, a, req)

	// And an ADD that fails after an earlier one answered restores that
	// one, rather than removing the key.
	a.attach = failAfterAttach(attach)
	if _, err := a.AddEndpoint(context.Background(), req); err == nil {
		t.Fatal("the faulted ADD succeeded")
	}
	a.attach = attach
	assertEnforced(t, a, req)
}

// An endpoint whose host veth disappears without a DEL is removed while the
// agent runs: policy, attach and record.
func TestVanishedVethReconciled(t *testing.T) {
	a := runAgentWith(t, func(c *Config) { c.ReconcileInterval = 200 * time.Millisecond })
	req := podVeth(t, "c0ffee02", "gone", "10.213.0.10/32")
	if _, err := a.AddEndpoint(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByName(req.HostVeth)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkDel(l); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		list, _ := a.ListEndpoints(context.Background())
		keys, _ := a.records.Keys()
		if len(list.Endpoints) == 0 && len(keys) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("endpoint of a vanished veth still there after 5s: %d endpoints, records %v", len(list.Endpoints), keys)
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.mu.Lock()
	reserved := a.idReservedLocked(1)
	a.mu.Unlock()
	if !reserved {
		t.Error("the vanished endpoint's ID is free for reuse at once")
	}
}

// Two pods with one IP: the owner keeps it, the conflict is reported, and
// deleting the stale pod leaves the live pod's entry (before the fix it
// deleted it: the address became world). A terminal pod claims nothing.
func TestOneIPTwoPods(t *testing.T) {
	a := runAgent(t)
	store := strings.TrimPrefix(a.cfg.Store, "dir:")
	pod := func(name, app, ip, phase string) string {
		s := fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: shop, labels: {app: %s}}\nstatus:\n  podIPs: [{ip: %s}]\n", name, app, ip)
		if phase != "" {
			s += "  phase: " + phase + "\n"
		}
		return s
	}
	write := func(docs ...string) {
		t.Helper()
		tmp := filepath.Join(store, ".pods.tmp")
		if err := os.WriteFile(tmp, []byte(strings.Join(docs, "---\n")), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(store, "pods.yaml")); err != nil {
			t.Fatal(err)
		}
	}
	shared, twinIP, doneIP := netip.MustParseAddr("10.77.0.5"), netip.MustParseAddr("10.77.0.6"), netip.MustParseAddr("10.77.0.7")
	lookup := func(ip netip.Addr) uint32 {
		id, _, err := a.dp.IPCacheLookup(ip)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 5s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	write(pod("old", "old", "10.77.0.5", ""), pod("twin", "new", "10.77.0.6", ""))
	waitFor("old pod's address", func() bool { return lookup(shared) != 0 && lookup(twinIP) != 0 })
	oldID := lookup(shared)
	// The new pod has the same labels as twin, so the same identity; a
	// terminal pod holds twin's address and another of its own.
	write(pod("old", "old", "10.77.0.5", ""), pod("twin", "new", "10.77.0.6", ""), pod("new", "new", "10.77.0.5", ""),
		pod("done", "done", "10.77.0.6", "Succeeded"), pod("done2", "done", "10.77.0.7", "Failed"))
	waitFor("conflict reported", func() bool {
		st, _ := a.Status(context.Background())
		return strings.Contains(strings.Join(st.EndpointWarnings, "\n"), "10.77.0.5")
	})
	if got := lookup(shared); got != oldID {
		t.Fatalf("a second claimant took the address: %d, owner's identity %d", got, oldID)
	}
	st, _ := a.Status(context.Background())
	if w := strings.Join(st.EndpointWarnings, "\n"); strings.Contains(w, "10.77.0.6") || strings.Contains(w, "shop/done") {
		t.Fatalf("a terminal pod claims an address: %s", w)
	}
	if id, found, _ := a.dp.IPCacheLookup(doneIP); found {
		t.Fatalf("a terminal pod's address is in the ipcache as %d", id)
	}
	write(pod("twin", "new", "10.77.0.6", ""), pod("new", "new", "10.77.0.5", ""))
	waitFor("stale pod gone", func() bool { return lookup(shared) != oldID })
	if got, want := lookup(shared), lookup(twinIP); got != want {
		t.Fatalf("after the stale pod's deletion the live pod's address resolves to %d, want its identity %d", got, want)
	}
}

// The agent refuses, as the plugin does, an endpoint without a usable
// address or without a pod: it must not enforce under a made-up name or
// put 0.0.0.0 in the ipcache.
func TestAddRejectsBadRequests(t *testing.T) {
	a := runAgent(t)
	base := api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: "c0ffee03", IfName: "eth0"},
		HostVeth:    "lo", HostIfIndex: 1,
		IPs: []netip.Prefix{netip.MustParsePrefix("10.213.0.11/32")},
		Pod: api.PodRef{Namespace: "shop", Name: "x"},
	}
	for name, mutate := range map[string]func(*api.EndpointAddRequest){
		"no IP":    func(r *api.EndpointAddRequest) { r.IPs = nil },
		"0/0":      func(r *api.EndpointAddRequest) { r.IPs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")} },
		"::/0":     func(r *api.EndpointAddRequest) { r.IPs = append(r.IPs, netip.MustParsePrefix("::/0")) },
		"no pod":   func(r *api.EndpointAddRequest) { r.Pod = api.PodRef{} },
		"half pod": func(r *api.EndpointAddRequest) { r.Pod.Name = "" },
		"bad MAC":  func(r *api.EndpointAddRequest) { r.MAC = "ff:ff:ff:ff:ff:ff" },
	} {
		req := base
		mutate(&req)
		if _, err := a.AddEndpoint(context.Background(), req); !errors.Is(err, api.ErrInvalidRequest) {
			t.Errorf("%s: got %v, want invalid_request", name, err)
		}
	}
	if list, _ := a.ListEndpoints(context.Background()); len(list.Endpoints) != 0 {
		t.Fatalf("endpoints after refused ADDs: %+v", list.Endpoints)
	}
}

// When the numbering cannot be saved, nothing that uses a new number is
// applied: the ADD fails and is rolled back, rather than the maps holding
// a number a restarted agent could give to another label set.
func TestUnsavedNumberingIsNotApplied(t *testing.T) {
	a := runAgent(t)
	ids := filepath.Join(a.cfg.StateDir, "identities")
	if err := os.RemoveAll(ids); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ids, nil, 0o600); err != nil { // a file where the folder was
		t.Fatal(err)
	}
	req := podVeth(t, "c0ffee04", "fresh", "10.213.0.12/32")
	if _, err := a.AddEndpoint(context.Background(), req); err == nil || !strings.Contains(err.Error(), "numbering") {
		t.Fatalf("ADD with an unsavable numbering: %v", err)
	}
	if list, _ := a.ListEndpoints(context.Background()); len(list.Endpoints) != 0 {
		t.Fatalf("endpoints after the failed ADD: %+v", list.Endpoints)
	}
	if id, _, _ := a.dp.IPCacheLookup(netip.MustParseAddr("10.213.0.12")); id != 0 {
		t.Fatalf("the failed ADD's address is in the ipcache as %d", id)
	}
}

// An address reused by a new local pod while the old pod's endpoint is
// still registered (a missed DEL): the new pod owns it, and the old pod's
// late DEL leaves the new pod's ipcache entry alone. Before the fix the DEL
// deleted the entry and the live pod's address became world.
func TestStaleLocalDeleteKeepsLiveIP(t *testing.T) {
	a := runAgent(t)
	stale := podVeth(t, "c0ffee05", "stale", "10.213.0.13/32")
	live := podVeth(t, "c0ffee06", "live", "10.213.0.13/32")
	addr := netip.MustParseAddr("10.213.0.13")
	if _, err := a.AddEndpoint(context.Background(), stale); err != nil {
		t.Fatal(err)
	}
	resp, err := a.AddEndpoint(context.Background(), live)
	if err != nil {
		t.Fatal(err)
	}
	if id, _, _ := a.dp.IPCacheLookup(addr); id != resp.IdentityID {
		t.Fatalf("the newer pod does not own the address: ipcache %d, its identity %d", id, resp.IdentityID)
	}
	if _, err := a.DeleteEndpoint(context.Background(), api.EndpointDelRequest{EndpointKey: stale.EndpointKey}); err != nil {
		t.Fatal(err)
	}
	if id, _, _ := a.dp.IPCacheLookup(addr); id != resp.IdentityID {
		t.Fatalf("after the stale pod's DEL the live pod's address resolves to %d, want %d", id, resp.IdentityID)
	}
}
