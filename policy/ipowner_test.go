package policy_test

import (
	"net/netip"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Deleting a pod removes only ipcache entries it still owns: a pod that
// took the address over later keeps it.
func TestDeletingStalePodKeepsLiveEntry(t *testing.T) {
	c := policy.NewCompiler(policy.Config{})
	ip := netip.MustParseAddr("10.0.0.5")
	if _, err := c.Reset(&policy.Snapshot{Pods: []policy.Pod{{Namespace: "shop", Name: "stale", Labels: map[string]string{"app": "old"}, IPs: []netip.Addr{ip}}}}); err != nil {
		t.Fatal(err)
	}
	ms, _, err := c.UpsertPod(policy.Pod{Namespace: "shop", Name: "live", Labels: map[string]string{"app": "new"}, IPs: []netip.Addr{ip}})
	if err != nil {
		t.Fatal(err)
	}
	want := ms.IPCache[identity.Host(ip)]
	ms, _ = c.DeletePod("shop", "stale")
	if got, ok := ms.IPCache[identity.Host(ip)]; !ok || got != want {
		t.Fatalf("after deleting the stale pod the address maps to %d (present %v), want the live pod's %d", got, ok, want)
	}
	ms, _ = c.DeletePod("shop", "live")
	if _, ok := ms.IPCache[identity.Host(ip)]; ok {
		t.Fatal("the owner's deletion left its entry")
	}
}
