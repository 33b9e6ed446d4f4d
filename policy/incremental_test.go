package policy_test

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// canonical renders a MapState without its numeric IDs (which depend on the
// history of allocations): identities become the pods that have them or their
// prefix, rules become their RuleInfo.
func canonical(t *testing.T, c *policy.Compiler, ms *policy.MapState, pods []policy.Pod) map[string]bool {
	t.Helper()
	names := map[identity.NumericID][]string{}
	for _, p := range pods {
		for _, ip := range p.IPs {
			id := ms.ResolveIP(ip)
			names[id] = append(names[id], p.Namespace+"/"+p.Name)
		}
	}
	for _, ii := range c.Identities() {
		if ii.Prefix.IsValid() {
			names[ii.ID] = append(names[ii.ID], "cidr:"+ii.Prefix.String())
		}
	}
	name := func(id identity.NumericID) string {
		if id.IsReserved() {
			return id.String()
		}
		n := names[id]
		if len(n) == 0 {
			t.Fatalf("identity %d is used but belongs to nothing", id)
		}
		// On a copy: Compact clears the tail it drops, and the names of an
		// identity with several addresses of one pod are asked for again.
		n = slices.Compact(slices.Sorted(slices.Values(n)))
		return strings.Join(n, ",")
	}
	out := map[string]bool{}
	for p, id := range ms.IPCache {
		out[fmt.Sprintf("ipcache %s=%s", p, name(id))] = true
	}
	for id := range ms.Enrolled {
		out["enrolled "+name(id)] = true
	}
	for ep, e := range ms.Endpoints {
		out[fmt.Sprintf("ep %d id=%s default=%v enrolled=%v", ep, name(e.Identity), e.Default, e.Enrolled)] = true
		for _, en := range e.Entries {
			ri := ms.Rules[en.Rule]
			out[fmt.Sprintf("ep %d %v peer=%s %d %d-%d %v %d %+v", ep, en.Direction, name(en.Peer), en.Proto, en.PortLo, en.PortHi, en.Action, en.Flags, ri)] = true
		}
	}
	return out
}

// applyDiff plays a Diff onto a copy of prev, as the datapath would.
func applyDiff(prev, next *policy.MapState, d policy.Diff) *policy.MapState {
	out := &policy.MapState{IPCache: maps.Clone(prev.IPCache), Endpoints: maps.Clone(prev.Endpoints), Rules: maps.Clone(prev.Rules),
		Enrolled: maps.Clone(prev.Enrolled)}
	if out.Enrolled == nil {
		out.Enrolled = map[identity.NumericID]bool{}
	}
	for _, id := range d.EnrolledAdded {
		out.Enrolled[id] = true
	}
	for _, id := range d.EnrolledRemoved {
		delete(out.Enrolled, id)
	}
	for _, ep := range d.Endpoints {
		out.Endpoints[ep] = next.Endpoints[ep]
	}
	for _, ep := range d.RemovedEndpoints {
		delete(out.Endpoints, ep)
	}
	maps.Copy(out.IPCache, d.IPCacheUpserts)
	for _, p := range d.IPCacheDeletes {
		delete(out.IPCache, p)
	}
	for _, id := range d.RulesUpserted {
		out.Rules[id] = next.Rules[id]
	}
	for _, id := range d.RulesRemoved {
		delete(out.Rules, id)
	}
	return out
}

func sameState(a, b *policy.MapState) bool {
	if !maps.Equal(a.IPCache, b.IPCache) || !maps.Equal(a.Rules, b.Rules) || !maps.Equal(a.Enrolled, b.Enrolled) ||
		len(a.Endpoints) != len(b.Endpoints) {
		return false
	}
	for ep, x := range a.Endpoints {
		y := b.Endpoints[ep]
		if y == nil || x.Identity != y.Identity || x.Default != y.Default || x.Enrolled != y.Enrolled || !slices.Equal(x.Entries, y.Entries) {
			return false
		}
	}
	return true
}

// TestIncrementalMatchesFull applies random single changes and checks after
// each that (1) the result equals a full compile of the same snapshot, up to
// the numeric IDs, and (2) the returned Diff turns the previous MapState into
// the new one exactly.
func TestIncrementalMatchesFull(t *testing.T) {
	// With no budget, and with one so small that policies are withheld or
	// kept at their last version all the time.
	for _, budget := range []policy.Budget{{}, {Endpoint: 24, Policy: 40}, {Endpoint: 30, Policy: 60, Node: 40}} {
		t.Run(fmt.Sprintf("budget %+v", budget), func(t *testing.T) { testIncrementalMatchesFull(t, budget) })
	}
}

func testIncrementalMatchesFull(t *testing.T, budget policy.Budget) {
	withheld, reasons, enrollChanges := 0, map[string]int{}, 0
	for seed := range uint64(60) {
		r := rand.New(rand.NewPCG(seed, 42))
		cl := genCluster(r)
		snap := func() *policy.Snapshot {
			s := &policy.Snapshot{Pods: slices.Clone(cl.pods), NetworkPolicies: slices.Clone(cl.policies), BulkheadPolicies: slices.Clone(cl.bhps)}
			for _, ns := range diffNamespaces {
				s.Namespaces = append(s.Namespaces, policy.Namespace{Name: ns, Labels: cl.nsLabels[ns]})
			}
			return s
		}
		inc := policy.NewCompiler(policy.Config{Budget: budget})
		prev, err := inc.Reset(snap())
		if err != nil && !errors.Is(err, policy.ErrOverBudget) {
			t.Fatal(err)
		}
		for step := range 40 {
			var (
				ms   *policy.MapState
				d    policy.Diff
				err  error
				what string
			)
			switch r.IntN(8) {
			case 0: // relabel a pod
				i := r.IntN(len(cl.pods))
				p := cl.pods[i]
				p.Labels = map[string]string{"app": pick(r, []string{"a", "b", "c"})}
				if r.IntN(2) == 0 {
					p.Labels["tier"] = pick(r, []string{"1", "2"})
				}
				enrollDiffPod(p.Labels)
				cl.pods[i] = p
				what = "relabel " + p.Name
				ms, d, err = inc.UpsertPod(p)
			case 1: // move a pod to another subnet
				i := r.IntN(len(cl.pods))
				p := cl.pods[i]
				// The first address moves; a dual-stack pod keeps its other.
				a := p.IPs[0].As16()
				p.IPs = slices.Clone(p.IPs)
				if p.IPs[0].Is4() {
					a[14] = byte(r.IntN(3))
					p.IPs[0] = netip.AddrFrom16(a).Unmap()
				} else {
					a[13] = byte(r.IntN(2))
					p.IPs[0] = netip.AddrFrom16(a)
				}
				cl.pods[i] = p
				what = "move " + p.Name
				ms, d, err = inc.UpsertPod(p)
			case 2: // delete a pod
				if len(cl.pods) < 2 {
					continue
				}
				i := r.IntN(len(cl.pods))
				p := cl.pods[i]
				cl.pods = slices.Delete(cl.pods, i, i+1)
				what = "delete " + p.Name
				ms, d = inc.DeletePod(p.Namespace, p.Name)
			case 3: // relabel a namespace
				ns := pick(r, diffNamespaces)
				cl.nsLabels[ns] = map[string]string{"ns": pick(r, []string{"a", "b"}), "env": pick(r, []string{"p", "q"})}
				enrollDiffNamespace(cl.nsLabels[ns])
				what = "relabel ns " + ns
				ms, d, err = inc.UpsertNamespace(policy.Namespace{Name: ns, Labels: cl.nsLabels[ns]})
			case 4: // replace or add a policy
				np := genPolicy(r, r.IntN(6), cl.addrs())
				what = "upsert " + np.Namespace + "/" + np.Name
				before := slices.Clone(cl.policies)
				cl.policies = slices.DeleteFunc(cl.policies, func(o *networkingv1.NetworkPolicy) bool {
					return o.Namespace == np.Namespace && o.Name == np.Name
				})
				cl.policies = append(cl.policies, np)
				ms, d, err = inc.UpsertNetworkPolicy(np)
				if keptOld(inc, err, policy.KindNetworkPolicy, np.Namespace, np.Name) {
					cl.policies, err = before, nil
				}
			case 5: // delete a policy
				if len(cl.policies) == 0 {
					continue
				}
				i := r.IntN(len(cl.policies))
				np := cl.policies[i]
				cl.policies = slices.Delete(cl.policies, i, i+1)
				what = "delete " + np.Namespace + "/" + np.Name
				ms, d, err = inc.DeletePolicy(policy.KindNetworkPolicy, np.Namespace, np.Name)
			case 6: // add or replace a BulkheadPolicy
				bp := genBulkheadPolicy(r)
				what = "upsert bhp " + bp.Namespace + "/" + bp.Name
				before := slices.Clone(cl.bhps)
				cl.bhps = slices.DeleteFunc(cl.bhps, func(o *v1alpha1.BulkheadPolicy) bool {
					return o.Namespace == bp.Namespace && o.Name == bp.Name
				})
				cl.bhps = append(cl.bhps, bp)
				ms, d, err = inc.UpsertBulkheadPolicy(bp)
				if keptOld(inc, err, policy.KindBulkheadPolicy, bp.Namespace, bp.Name) {
					cl.bhps, err = before, nil
				}
			case 7: // delete a BulkheadPolicy
				if len(cl.bhps) == 0 {
					continue
				}
				i := r.IntN(len(cl.bhps))
				bp := cl.bhps[i]
				cl.bhps = slices.Delete(cl.bhps, i, i+1)
				what = "delete bhp " + bp.Namespace + "/" + bp.Name
				ms, d, err = inc.DeletePolicy(policy.KindBulkheadPolicy, bp.Namespace, bp.Name)
			}
			if errors.Is(err, policy.ErrOverBudget) {
				err = nil // withheld: the full compile withholds it too
			}
			if err != nil {
				t.Fatalf("seed %d step %d %s: %v", seed, step, what, err)
			}
			for _, st := range inc.BudgetStatus() {
				withheld++
				reasons[st.Reason+map[bool]string{true: " kept", false: ""}[st.Kept]]++
			}
			for ep, e := range ms.Endpoints {
				if n := e.TrieSize(); budget.Endpoint > 0 && n > budget.Endpoint {
					t.Fatalf("seed %d step %d %s: endpoint %d costs %d trie keys, over %d", seed, step, what, ep, n, budget.Endpoint)
				}
			}
			if err := ms.Validate(); err != nil {
				t.Fatalf("seed %d step %d %s: %v", seed, step, what, err)
			}
			full := policy.NewCompiler(policy.Config{Budget: budget})
			want, err := full.Reset(snap())
			if err != nil && !errors.Is(err, policy.ErrOverBudget) {
				t.Fatal(err)
			}
			got, exp := canonical(t, inc, ms, cl.pods), canonical(t, full, want, cl.pods)
			if !maps.Equal(got, exp) {
				var extra, missing []string
				for k := range got {
					if !exp[k] {
						extra = append(extra, k)
					}
				}
				for k := range exp {
					if !got[k] {
						missing = append(missing, k)
					}
				}
				slices.Sort(extra)
				slices.Sort(missing)
				t.Fatalf("seed %d step %d %s: incremental differs from full compile\nextra:\n  %s\nmissing:\n  %s",
					seed, step, what, strings.Join(extra, "\n  "), strings.Join(missing, "\n  "))
			}
			if applied := applyDiff(prev, ms, d); !sameState(applied, ms) {
				t.Fatalf("seed %d step %d %s: the diff does not turn the previous state into the new one: %+v", seed, step, what, d)
			}
			if len(d.EnrolledAdded)+len(d.EnrolledRemoved) > 0 {
				enrollChanges++
			}
			if d.Empty() != (ms.Revision == prev.Revision) {
				t.Fatalf("seed %d step %d %s: revision %d->%d with empty diff %v", seed, step, what, prev.Revision, ms.Revision, d.Empty())
			}
			prev = ms
		}
	}
	if enrollChanges == 0 {
		t.Error("no step changed enrollment: the test tests nothing of it")
	}
	if budget != (policy.Budget{}) && withheld == 0 {
		t.Error("the budget never withheld a policy: the test tests nothing")
	}
	t.Logf("policies over budget, summed over steps: %d %v", withheld, reasons)
}

// keptOld reports whether an upsert was refused for its budget with the
// previous version kept: the effective store is then the old one.
func keptOld(c *policy.Compiler, err error, kind, ns, name string) bool {
	if !errors.Is(err, policy.ErrOverBudget) {
		return false
	}
	for _, st := range c.BudgetStatus() {
		if st.Kind == kind && st.Namespace == ns && st.Name == name && st.Kept {
			return true
		}
	}
	return false
}

func genBulkheadPolicy(r *rand.Rand) *v1alpha1.BulkheadPolicy {
	bp := &v1alpha1.BulkheadPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bhp%d", r.IntN(3)), Namespace: pick(r, diffNamespaces)}}
	if r.IntN(2) == 0 {
		bp.Spec.Selector.SPIFFEID = pick(r, []string{"spiffe://cluster.local/ns/" + bp.Namespace + "/sa/default", "spiffe://cluster.local/ns/*/sa/*"})
	} else {
		bp.Spec.Selector.PodSelector = genSelector(r, true)
	}
	if r.IntN(3) == 0 {
		bp.Spec.Mode = v1alpha1.ModeAudit
	}
	peer := func() v1alpha1.Peer {
		switch r.IntN(3) {
		case 0:
			return v1alpha1.Peer{SPIFFEID: pick(r, []string{"spiffe://cluster.local/ns/x/sa/*", "spiffe://cluster.local/ns/*/sa/default"})}
		case 1:
			return v1alpha1.Peer{PodSelector: genSelector(r, true), NamespaceSelector: genSelector(r, false)}
		}
		b := pick(r, diffCIDRs)
		return v1alpha1.Peer{CIDR: b.cidr, Except: b.except}
	}
	for range r.IntN(3) {
		rc := v1alpha1.RuleCommon{Ports: genPorts(r)}
		if r.IntN(2) == 0 {
			rc.Action = v1alpha1.ActionDeny
		}
		var peers []v1alpha1.Peer
		for range r.IntN(3) {
			peers = append(peers, peer())
		}
		// mTLS on allow rules with one peer where it is valid: no cidr
		// peer, and a port that can be TCP. No random draw decides it, so
		// that the random streams stay what they were.
		if rc.Action == "" && len(peers) == 1 && !slices.ContainsFunc(peers, func(p v1alpha1.Peer) bool { return p.CIDR != "" }) &&
			(len(rc.Ports) == 0 || slices.ContainsFunc(rc.Ports, func(p networkingv1.NetworkPolicyPort) bool { return p.Protocol == nil || *p.Protocol == "TCP" })) {
			rc.MTLS = v1alpha1.MTLSRequired
		}
		if r.IntN(2) == 0 {
			bp.Spec.Ingress = append(bp.Spec.Ingress, v1alpha1.IngressRule{From: peers, RuleCommon: rc})
		} else {
			bp.Spec.Egress = append(bp.Spec.Egress, v1alpha1.EgressRule{To: peers, RuleCommon: rc})
		}
	}
	return bp
}

// TestIncrementalIsTargeted: a change touches only what it affects, and rule
// IDs of untouched policies do not move.
func TestIncrementalIsTargeted(t *testing.T) {
	s := benchSnapshot(3, 4, 2)
	c := policy.NewCompiler(policy.Config{})
	before, err := c.Reset(s)
	if err != nil {
		t.Fatal(err)
	}
	rulesBefore := maps.Clone(before.Rules)

	// A pod that keeps its identity (only its name is new): one new
	// endpoint, one ipcache entry, nothing else.
	p := s.Pods[0]
	p.Name, p.Endpoint, p.IPs = "extra", 1000, []netip.Addr{netip.MustParseAddr("10.200.0.1")}
	_, d, err := c.UpsertPod(p)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.Endpoints, []policy.EndpointID{1000}) || len(d.IPCacheUpserts) != 1 || len(d.RulesUpserted)+len(d.RulesRemoved) != 0 {
		t.Fatalf("diff %+v", d)
	}

	// Changing one policy's port range changes only the endpoints it
	// selects, and keeps every rule ID.
	ms, d, err := c.UpsertNetworkPolicy(benchPolicy("ns001", 2, 4, 9000))
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range d.Endpoints {
		if e := ms.Endpoints[ep]; e == nil {
			t.Fatalf("endpoint %d in diff but not in state", ep)
		}
	}
	if len(d.Endpoints) != 2 || len(d.IPCacheUpserts)+len(d.IPCacheDeletes) != 0 {
		t.Fatalf("want the policy's 2 replicas only: %+v", d)
	}
	if !maps.Equal(rulesBefore, ms.Rules) {
		t.Fatal("rule IDs moved")
	}

	// Deleting a policy releases only its rule IDs.
	ms, d, err = c.DeletePolicy(policy.KindNetworkPolicy, "ns001", "app2")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.RulesRemoved) != 5 || len(ms.Rules) != len(rulesBefore)-5 {
		t.Fatalf("diff %+v", d)
	}
	for id, ri := range ms.Rules {
		if rulesBefore[id] != ri {
			t.Fatalf("rule %d changed: %+v -> %+v", id, rulesBefore[id], ri)
		}
	}
}

func TestReplaceDiffsAgainstPrevious(t *testing.T) {
	c := policy.NewCompiler(policy.Config{})
	s := benchSnapshot(2, 2, 2)
	first, err := c.Reset(s)
	if err != nil {
		t.Fatal(err)
	}
	same, d, err := c.Replace(s)
	if err != nil || !d.Empty() || same.Revision != first.Revision {
		t.Fatalf("replacing with the same snapshot: diff %+v, revision %d -> %d, %v", d, first.Revision, same.Revision, err)
	}
	s.Pods = s.Pods[1:]
	next, d, err := c.Replace(s)
	if err != nil || !slices.Equal(d.RemovedEndpoints, []policy.EndpointID{1}) || len(d.IPCacheDeletes) != 1 {
		t.Fatalf("diff %+v %v", d, err)
	}
	if applied := applyDiff(same, next, d); !sameState(applied, next) {
		t.Fatal("the diff does not turn the previous state into the new one")
	}
}

// enrollDiffPod and enrollDiffNamespace enroll some of the random
// workloads in mTLS, by labels the random generators already drew (so the
// random streams, and the clusters of the differential test, stay what
// they were).
func enrollDiffPod(l map[string]string) {
	if l["app"] == "c" {
		l[identity.LabelMTLS] = identity.MTLSEnabled
	}
}

func enrollDiffNamespace(l map[string]string) {
	if l["env"] == "q" {
		l[identity.LabelMTLS] = identity.MTLSEnabled
	}
}
