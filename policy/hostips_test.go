package policy

import (
	"net/netip"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/bulkhead-io/bulkhead/identity"
)

func TestHostIPsAreHostIdentity(t *testing.T) {
	node := netip.MustParseAddr("10.1.0.1")
	veth := netip.MustParseAddr("10.213.0.1")
	c := NewCompiler(Config{})
	denyAll := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny", Namespace: "a"},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	}
	ms, err := c.Reset(&Snapshot{HostIPs: []netip.Addr{node}, NetworkPolicies: []*networkingv1.NetworkPolicy{denyAll},
		Pods: []Pod{{Namespace: "a", Name: "p", IPs: []netip.Addr{netip.MustParseAddr("10.213.0.2")}, Endpoint: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := ms.ResolveIP(node); got != identity.IDHost {
		t.Fatalf("node IP resolves to %v, want host", got)
	}
	if got := ms.ResolveIP(veth); got != identity.IDWorld {
		t.Fatalf("veth IP resolves to %v before it is a host IP", got)
	}
	ms, d := c.SetHostIPs([]netip.Addr{veth})
	if ms.ResolveIP(veth) != identity.IDHost || ms.ResolveIP(node) != identity.IDWorld {
		t.Fatalf("after SetHostIPs: veth %v, node %v", ms.ResolveIP(veth), ms.ResolveIP(node))
	}
	if d.IPCacheUpserts[identity.Host(veth)] != identity.IDHost || len(d.IPCacheDeletes) != 1 || d.IPCacheDeletes[0] != identity.Host(node) {
		t.Fatalf("diff = %+v", d)
	}
	if _, d := c.SetHostIPs([]netip.Addr{veth}); !d.Empty() {
		t.Fatalf("unchanged host IPs gave a diff: %+v", d)
	}
	// Host ingress passes a default-deny endpoint; the world does not.
	if v := ms.Lookup(1, Ingress, ms.ResolveIP(veth), ProtoTCP, 80); v.Verdict != VerdictAllow {
		t.Fatalf("host ingress = %v", v.Verdict)
	}
	if v := ms.Lookup(1, Ingress, ms.ResolveIP(node), ProtoTCP, 80); v.Verdict != VerdictDeny {
		t.Fatalf("world ingress to a default-deny pod = %v", v.Verdict)
	}
}
