package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/policy"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// budgetScene is a node with a small policy trie: 100 peer identities in
// namespace y; x/server is selected by "big" (TCP ranges 1001-1999, ...,
// 20001-20999 from all 100 peers: 19,600 keys, the kind of
// policy); x/web by "small" (TCP 80 from y/peer0); x/fill0..2 by "fill"
// (one such range: 980 keys each), which brings the node near its limit.
func budgetScene() (pods []policy.Pod, big, small, fill *networkingv1.NetworkPolicy) {
	for i := range 100 {
		pods = append(pods, policy.Pod{Namespace: "y", Name: fmt.Sprintf("peer%d", i), Labels: map[string]string{"n": fmt.Sprint(i)},
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 214, 1, byte(1 + i)})}})
	}
	local := func(name, app string, ep policy.EndpointID) policy.Pod {
		return policy.Pod{Namespace: "x", Name: name, Labels: map[string]string{"app": app}, Endpoint: ep,
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 214, 2, byte(ep)})}}
	}
	pods = append(pods, local("server", "server", 31), local("web", "web", 32),
		local("fill0", "fill", 33), local("fill1", "fill", 34), local("fill2", "fill", 35))
	tcp := corev1.ProtocolTCP
	fromY := networkingv1.NetworkPolicyPeer{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{policy.NamespaceNameLabel: "y"}}}
	ranges := func(name, app string, n int) *networkingv1.NetworkPolicy {
		var ports []networkingv1.NetworkPolicyPort
		for k := 1; k <= n; k++ {
			lo, hi := intstr.FromInt32(int32(1000*k+1)), int32(1000*k+999)
			ports = append(ports, networkingv1.NetworkPolicyPort{Protocol: &tcp, Port: &lo, EndPort: &hi})
		}
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: name}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": app}},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{fromY}, Ports: ports}},
		}}
	}
	p80 := intstr.FromInt32(80)
	small = &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "small"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
		Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: fromY.NamespaceSelector, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"n": "0"}}}},
			Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p80}},
		}},
	}}
	return pods, ranges("big", "server", 20), small, ranges("fill", "fill", 1)
}

// TestProgPolicyBudget: on a node whose policy trie holds 8,192 keys and
// is near full, the policy is rejected alone; the datapath applies
// every state; the rejected policy's pod stays isolated in the kernel; the
// other policy and a new pod (a CNI ADD) keep applying. Without a budget
// the same policy makes every apply on the node fail (the bug).
func TestProgPolicyBudget(t *testing.T) {
	pods, big, small, fill := budgetScene()
	peer0, peer1 := pods[0].IPs[0], pods[1].IPs[0]
	const trie = 8192
	addWeb2 := policy.Pod{Namespace: "x", Name: "web2", Labels: map[string]string{"app": "web"}, Endpoint: 36,
		IPs: []netip.Addr{netip.MustParseAddr("10.214.2.36")}}

	t.Run("without a budget every apply fails", func(t *testing.T) {
		d := newTestDatapath(t, Config{MaxPolicyEntries: trie})
		c := policy.NewCompiler(policy.Config{})
		ms, err := c.Reset(&policy.Snapshot{Pods: pods, NetworkPolicies: []*networkingv1.NetworkPolicy{small, fill}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply near the limit: %v", err)
		}
		ms, _, _ = c.UpsertNetworkPolicy(big)
		_, err = d.Apply(ms)
		t.Logf("apply with the big policy: %v", err)
		if err == nil {
			t.Fatal("a 19,600-key policy fit an 8,192-key trie")
		}
		ms, _, _ = c.UpsertPod(addWeb2)
		_, err = d.Apply(ms)
		t.Logf("apply of the next ADD: %v", err)
		if err == nil {
			t.Fatal("the next apply succeeded: the bug this test documents is gone, update the test")
		}
	})

	t.Run("with a budget", func(t *testing.T) {
		d := newTestDatapath(t, Config{MaxPolicyEntries: trie})
		c := policy.NewCompiler(policy.Config{Budget: policy.Budget{Endpoint: trie / 4, Policy: trie / 2}})
		ms, err := c.Reset(&policy.Snapshot{Pods: pods, NetworkPolicies: []*networkingv1.NetworkPolicy{small, fill}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply near the limit: %v", err)
		}
		ms, _, err = c.UpsertNetworkPolicy(big)
		if !errors.Is(err, policy.ErrOverBudget) {
			t.Fatalf("upsert of the big policy: %v, want ErrOverBudget", err)
		}
		t.Logf("rejected: %v", err)
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply with the big policy rejected: %v", err)
		}
		ms, _, err = c.UpsertPod(addWeb2)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply of the next ADD: %v", err)
		}
		// And a change to the fill policy (written into the next generation
		// beside the live one) still applies.
		fill2 := fill.DeepCopy()
		fill2.Spec.Ingress[0].Ports[0].EndPort = new(int32(1998))
		if ms, _, err = c.UpsertNetworkPolicy(fill2); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Apply(ms); err != nil {
			t.Fatalf("apply of another policy's change: %v", err)
		}
		for _, tc := range []struct {
			ep   policy.EndpointID
			src  netip.Addr
			port uint16
			want uint32
		}{
			{31, peer0, 1500, retShot}, // server: big's allow withheld, isolated
			{31, peer0, 80, retShot},
			{32, peer0, 80, retPass}, // web: small applies
			{32, peer1, 80, retShot},
			{36, peer0, 80, retPass}, // web2, the new pod
			{33, peer0, 1500, retPass},
			{33, peer0, 1999, retShot}, // fill's new version applies
		} {
			bindTestEndpoint(t, d, uint32(tc.ep))
			dst := netip.AddrFrom4([4]byte{10, 214, 2, byte(tc.ep)})
			if got := run(t, d.objs.BulkheadToPod, tcpSyn(tc.src, dst, 40000, tc.port).build()); got != tc.want {
				t.Errorf("endpoint %d from %s port %d: got %#x, want %#x", tc.ep, tc.src, tc.port, got, tc.want)
			}
		}
	})
}

// TestPolicyMapEntriesSizesTrieAndExactTable: Config.MaxPolicyEntries
// (--policy-map-entries) sizes the policy trie and the exact-match table in
// front of it, whose mask BPF reads.
func TestPolicyMapEntriesSizesTrieAndExactTable(t *testing.T) {
	for _, n := range []uint32{4096, 65536, 300000} {
		spec, err := loadSpec(Config{MaxPolicyEntries: n}, time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if got := spec.Maps["policy"].MaxEntries; got != n {
			t.Errorf("%d: policy trie holds %d", n, got)
		}
		buckets := spec.Maps["policy_exact"].MaxEntries
		if buckets&(buckets-1) != 0 || buckets*exactWays < n || buckets*exactWays >= 2*n {
			t.Errorf("%d: exact table has %d buckets of %d", n, buckets, exactWays)
		}
	}
}
