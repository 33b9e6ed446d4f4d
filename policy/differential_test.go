package policy_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/mattfenwick/cyclonus/pkg/matcher"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The differential test compares our compiled verdicts (MapState.Lookup
// through the explain engine, with the ipcache resolving addresses) with
// cyclonus' matcher, an independent NetworkPolicy model, on random clusters.
//
// Known oracle deviations from Kubernetes, which the generator avoids (and
// TestOracleDeviations pins down):
//   - cyclonus evaluates `NotIn` as false when the key is absent; Kubernetes
//     (apimachinery labels.Requirement) matches then. So NotIn is generated
//     only on keys every object has (pods: "app", namespaces: "ns").
//   - cyclonus evaluates matchLabels {k: ""} as true when k is absent;
//     Kubernetes requires the key. So label values are never empty.

var (
	diffNamespaces = []string{"x", "y", "z"}
	diffPorts      = []struct {
		port  uint16
		proto corev1.Protocol
	}{{80, "TCP"}, {81, "TCP"}, {80, "UDP"}, {81, "SCTP"}, {8080, "TCP"}, {53, "UDP"}}
	diffExternal = []string{"192.168.1.5", "10.0.9.9", "8.8.8.8", "10.0.1.250", "10.0.0.251", "fd00::1:ff", "2001:db8::1"}
	diffCIDRs    = []struct {
		cidr   string
		except []string
	}{
		{"10.0.0.0/16", []string{"10.0.1.0/24"}},
		{"10.0.1.0/24", nil},
		{"10.0.1.0/24", []string{"10.0.1.0/28", "10.0.1.128/25"}},
		{"0.0.0.0/0", []string{"10.0.0.0/8"}},
		{"0.0.0.0/0", nil},
		{"192.168.0.0/16", []string{"192.168.1.0/24"}},
		{"10.0.2.0/25", nil},
		{"10.0.0.3/32", nil},
		{"fd00::/16", []string{"fd00::/112"}},
		{"::/0", nil},
	}
)

type diffCluster struct {
	nsLabels map[string]map[string]string
	pods     []policy.Pod
	policies []*networkingv1.NetworkPolicy
	bhps     []*v1alpha1.BulkheadPolicy
}

func pick[T any](r *rand.Rand, xs []T) T { return xs[r.IntN(len(xs))] }

func genCluster(r *rand.Rand) *diffCluster {
	c := &diffCluster{nsLabels: map[string]map[string]string{}}
	for _, ns := range diffNamespaces {
		l := map[string]string{"ns": pick(r, []string{"a", "b"})}
		if r.IntN(2) == 0 {
			l["env"] = pick(r, []string{"p", "q"})
		}
		enrollDiffNamespace(l)
		c.nsLabels[ns] = l
	}
	names := []string{"web", "dns", "metrics"}
	n := 0
	for i, ns := range diffNamespaces {
		for j := range 1 + r.IntN(3) {
			l := map[string]string{"app": pick(r, []string{"a", "b", "c"})}
			if r.IntN(2) == 0 {
				l["tier"] = pick(r, []string{"1", "2"})
			}
			enrollDiffPod(l)
			p := policy.Pod{Namespace: ns, Name: fmt.Sprintf("p%d", j), Labels: l}
			// Kubernetes warns about two container ports with the same number
			// and protocol, and cyclonus' traffic carries one resolved name
			// per port, so a pod uses each (port, protocol) once.
			used := map[int]bool{}
			for _, name := range names {
				k := r.IntN(len(diffPorts))
				if r.IntN(2) == 0 && !used[k] {
					used[k] = true
					pp := diffPorts[k]
					p.Ports = append(p.Ports, policy.NamedPort{Name: name, Port: pp.port, Proto: protoNum(pp.proto)})
				}
			}
			// Addresses in a few subnets the ipBlocks carve up: IPv4 only,
			// IPv6 only, or dual-stack (either family first, as podIPs may
			// list them).
			v4 := netip.MustParseAddr(fmt.Sprintf("10.0.%d.%d", pick(r, []int{0, 1, 2, i}), 1+r.IntN(3)*100+n))
			v6 := netip.MustParseAddr(fmt.Sprintf("fd00::%x:%x", r.IntN(2), 1+n))
			switch r.IntN(6) {
			case 0:
				p.IPs = []netip.Addr{v6}
			case 1:
				p.IPs = []netip.Addr{v4, v6}
			case 2:
				p.IPs = []netip.Addr{v6, v4}
			default:
				p.IPs = []netip.Addr{v4}
			}
			n++
			p.Endpoint = policy.EndpointID(n)
			c.pods = append(c.pods, p)
		}
	}
	pool := c.addrs()
	for i := range 1 + r.IntN(4) {
		c.policies = append(c.policies, genPolicy(r, i, pool))
	}
	return c
}

// addrs is the pool random ipBlocks are cut around: every pod address and
// every external one.
func (c *diffCluster) addrs() []netip.Addr {
	var out []netip.Addr
	for _, p := range c.pods {
		out = append(out, p.IPs...)
	}
	for _, e := range diffExternal {
		out = append(out, netip.MustParseAddr(e))
	}
	return out
}

// genIPBlock cuts a random ipBlock around an address of the pool, of either
// family, with up to two excepts around the pool's addresses inside it. The
// prefix lengths favour the bits where the pool's addresses differ.
func genIPBlock(r *rand.Rand, pool []netip.Addr) *networkingv1.IPBlock {
	base := pick(r, pool)
	lens := []int{0, 8, 16, 22, 23, 24, 25, 26, 30, 31, 32}
	if base.Is6() {
		lens = []int{0, 16, 64, 96, 108, 111, 112, 113, 120, 126, 127, 128}
	}
	bits := pick(r, lens)
	cidr, _ := base.Prefix(bits)
	b := &networkingv1.IPBlock{CIDR: cidr.String()}
	var inside []netip.Addr
	for _, a := range pool {
		if cidr.Contains(a) {
			inside = append(inside, a)
		}
	}
	for range r.IntN(3) {
		var longer []int
		for _, l := range lens {
			if l > bits {
				longer = append(longer, l)
			}
		}
		if len(longer) == 0 {
			break
		}
		x, _ := pick(r, inside).Prefix(pick(r, longer))
		if !slices.Contains(b.Except, x.String()) {
			b.Except = append(b.Except, x.String())
		}
	}
	return b
}

func protoNum(p corev1.Protocol) uint8 {
	n, _ := explain.ParseProto(string(p))
	return n
}

func genSelector(r *rand.Rand, pod bool) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	key, vals, opt, optVals := "ns", []string{"a", "b"}, "env", []string{"p", "q"}
	if pod {
		key, vals, opt, optVals = "app", []string{"a", "b", "c"}, "tier", []string{"1", "2"}
	}
	for range r.IntN(3) {
		switch r.IntN(6) {
		case 0:
			if s.MatchLabels == nil {
				s.MatchLabels = map[string]string{}
			}
			s.MatchLabels[key] = pick(r, vals)
		case 1:
			if s.MatchLabels == nil {
				s.MatchLabels = map[string]string{}
			}
			s.MatchLabels[opt] = pick(r, optVals)
		case 2:
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{Key: pick(r, []string{key, opt}), Operator: metav1.LabelSelectorOpIn, Values: []string{pick(r, vals), pick(r, optVals)}})
		case 3:
			// NotIn only on the key everything has (see the note above).
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{Key: key, Operator: metav1.LabelSelectorOpNotIn, Values: []string{pick(r, vals)}})
		case 4:
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{Key: opt, Operator: metav1.LabelSelectorOpExists})
		case 5:
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{Key: opt, Operator: metav1.LabelSelectorOpDoesNotExist})
		}
	}
	return s
}

func genPeers(r *rand.Rand, pool []netip.Addr) []networkingv1.NetworkPolicyPeer {
	var out []networkingv1.NetworkPolicyPeer
	for range r.IntN(3) {
		var p networkingv1.NetworkPolicyPeer
		switch r.IntN(5) {
		case 0:
			p.PodSelector = genSelector(r, true)
		case 1:
			p.NamespaceSelector = genSelector(r, false)
		case 2:
			p.PodSelector = genSelector(r, true)
			p.NamespaceSelector = genSelector(r, false)
		case 3:
			b := pick(r, diffCIDRs)
			p.IPBlock = &networkingv1.IPBlock{CIDR: b.cidr, Except: b.except}
		case 4:
			p.IPBlock = genIPBlock(r, pool)
		}
		out = append(out, p)
	}
	return out
}

func genPorts(r *rand.Rand) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for range r.IntN(3) {
		var p networkingv1.NetworkPolicyPort
		if r.IntN(3) > 0 {
			proto := pick(r, []corev1.Protocol{"TCP", "UDP", "SCTP"})
			p.Protocol = &proto
		}
		switch r.IntN(4) {
		case 0:
			v := intstr.FromInt32(int32(pick(r, diffPorts).port))
			p.Port = &v
		case 1:
			v := intstr.FromString(pick(r, []string{"web", "dns", "metrics"}))
			p.Port = &v
		case 2:
			lo := pick(r, []int32{53, 80, 81})
			hi := lo + int32(r.IntN(8000))
			v := intstr.FromInt32(lo)
			p.Port, p.EndPort = &v, &hi
		case 3:
			// protocol only: every port of it
		}
		out = append(out, p)
	}
	return out
}

func genPolicy(r *rand.Rand, i int, pool []netip.Addr) *networkingv1.NetworkPolicy {
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("np%d", i), Namespace: pick(r, diffNamespaces)}}
	np.Spec.PodSelector = *genSelector(r, true)
	for range r.IntN(3) {
		np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: genPeers(r, pool), Ports: genPorts(r)})
	}
	for range r.IntN(3) {
		np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: genPeers(r, pool), Ports: genPorts(r)})
	}
	switch r.IntN(4) {
	case 0: // defaulted
	case 1:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	case 2:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	case 3:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
	}
	return np
}

// oraclePolicies gives cyclonus explicit policyTypes (it panics without),
// defaulted here independently of policy.PolicyTypes.
func oraclePolicies(nps []*networkingv1.NetworkPolicy) []*networkingv1.NetworkPolicy {
	var out []*networkingv1.NetworkPolicy
	for _, np := range nps {
		cp := np.DeepCopy()
		if len(cp.Spec.PolicyTypes) == 0 {
			cp.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
			if len(cp.Spec.Egress) > 0 {
				cp.Spec.PolicyTypes = append(cp.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
			}
		}
		out = append(out, cp)
	}
	return out
}

// checkCluster compares every (src, dst, port) of one cluster and returns
// the number of cases compared.
// diffStats counts the cases of a run: all, denied by the oracle, over
// IPv6, with a dual-stack pod at either end, and of those, with a pod whose
// two addresses have different identities (an ipBlock split it).
type diffStats struct{ n, denied, v6, dual, split int }

func checkCluster(t testing.TB, c *diffCluster) (st diffStats) {
	t.Helper()
	snap := &policy.Snapshot{Pods: c.pods, NetworkPolicies: c.policies}
	for _, ns := range diffNamespaces {
		snap.Namespaces = append(snap.Namespaces, policy.Namespace{Name: ns, Labels: c.nsLabels[ns]})
	}
	ms, err := policy.Compile(snap)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	if err := ms.Validate(); err != nil {
		t.Fatal(err)
	}
	oracle := matcher.BuildNetworkPolicies(false, oraclePolicies(c.policies))

	type end struct {
		peer explain.Peer
		tp   *matcher.TrafficPeer
		pod  *policy.Pod
		addr netip.Addr
	}
	var ends []end
	// One end per address: a dual-stack pod talks IPv4 from its IPv4
	// address and IPv6 from its IPv6 one, and each is judged by its own
	// address, as the ipcache resolves it.
	for i := range c.pods {
		p := &c.pods[i]
		nsl := map[string]string{policy.NamespaceNameLabel: p.Namespace}
		for k, v := range c.nsLabels[p.Namespace] {
			nsl[k] = v
		}
		for _, a := range p.IPs {
			ends = append(ends, end{
				peer: explain.PeerOfEndpoint(ms, p.Namespace+"/"+p.Name+"@"+a.String(), p.Endpoint, []netip.Addr{a}),
				tp:   &matcher.TrafficPeer{IP: a.String(), Internal: &matcher.InternalPeer{PodLabels: p.Labels, NamespaceLabels: nsl, Namespace: p.Namespace}},
				pod:  p,
				addr: a,
			})
		}
	}
	for _, ip := range diffExternal {
		a := netip.MustParseAddr(ip)
		ends = append(ends, end{peer: explain.PeerOfAddr(ms, a), tp: &matcher.TrafficPeer{IP: ip}, addr: a})
	}
	for _, src := range ends {
		for _, dst := range ends {
			if src.addr.Is4() != dst.addr.Is4() {
				continue // no packet goes from one family to the other
			}
			for _, pp := range diffPorts {
				name := ""
				if dst.pod != nil {
					for _, np := range dst.pod.Ports {
						if np.Port == pp.port && np.Proto == protoNum(pp.proto) {
							name = np.Name
						}
					}
				}
				want := oracle.IsTrafficAllowed(&matcher.Traffic{Source: src.tp, Destination: dst.tp, ResolvedPort: int(pp.port), ResolvedPortName: name, Protocol: pp.proto})
				got := explain.Verdict(ms, src.peer, dst.peer, protoNum(pp.proto), pp.port)
				st.n++
				if !want.IsAllowed() {
					st.denied++
				}
				if src.addr.Is6() {
					st.v6++
				}
				if isDual(src.pod) || isDual(dst.pod) {
					st.dual++
					if isSplit(ms, src.pod) || isSplit(ms, dst.pod) {
						st.split++
					}
				}
				if got.IngressPasses() != want.Ingress.IsAllowed() || got.EgressPasses() != want.Egress.IsAllowed() {
					t.Errorf("%s -> %s %d/%s (named %q): ingress got %v want %v, egress got %v want %v\npods: %s\npolicies:\n%s",
						src.peer.Name, dst.peer.Name, pp.port, pp.proto, name, got.IngressPasses(), want.Ingress.IsAllowed(),
						got.EgressPasses(), want.Egress.IsAllowed(), dumpPods(c), dumpPolicies(c.policies))
					return st
				}
			}
		}
	}
	return st
}

func isDual(p *policy.Pod) bool { return p != nil && len(p.IPs) == 2 }

func isSplit(ms *policy.MapState, p *policy.Pod) bool {
	return isDual(p) && ms.ResolveIP(p.IPs[0]) != ms.ResolveIP(p.IPs[1])
}

func dumpPods(c *diffCluster) string {
	var b strings.Builder
	for ns, l := range c.nsLabels {
		fmt.Fprintf(&b, "\n  ns %s %v", ns, l)
	}
	for _, p := range c.pods {
		fmt.Fprintf(&b, "\n  %s/%s %v %v ports=%v", p.Namespace, p.Name, p.Labels, p.IPs, p.Ports)
	}
	return b.String()
}

func dumpPolicies(nps []*networkingv1.NetworkPolicy) string {
	var b strings.Builder
	for _, np := range nps {
		fmt.Fprintf(&b, "  %s/%s: %s\n", np.Namespace, np.Name, np.Spec.String())
	}
	return b.String()
}

func TestDifferentialCyclonus(t *testing.T) {
	clusters := 2000
	if testing.Short() {
		clusters = 200
	}
	var sum diffStats
	for seed := range clusters {
		r := rand.New(rand.NewPCG(uint64(seed), 0x5eed))
		st := checkCluster(t, genCluster(r))
		sum = diffStats{sum.n + st.n, sum.denied + st.denied, sum.v6 + st.v6, sum.dual + st.dual, sum.split + st.split}
		if t.Failed() {
			t.Fatalf("seed %d", seed)
		}
	}
	// A generator that never denies would test nothing; nor one that never
	// splits a dual-stack pod.
	if sum.denied < sum.n/10 || sum.denied > sum.n*9/10 {
		t.Errorf("only %d of %d cases denied: the generator is lopsided", sum.denied, sum.n)
	}
	if sum.split < sum.n/100 {
		t.Errorf("only %d of %d cases have a dual-stack pod that an ipBlock splits", sum.split, sum.n)
	}
	t.Logf("%d clusters, %d cases agree (%d denied, %d over IPv6, %d with a dual-stack pod, %d of them split by an ipBlock)",
		clusters, sum.n, sum.denied, sum.v6, sum.dual, sum.split)
}

func FuzzDifferentialCyclonus(f *testing.F) {
	for s := range uint64(8) {
		f.Add(s, s*7919)
	}
	f.Fuzz(func(t *testing.T, a, b uint64) {
		checkCluster(t, genCluster(rand.New(rand.NewPCG(a, b))))
	})
}
