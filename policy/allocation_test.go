package policy_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/policy"
)

// A compiler restored from a saved Allocation compiles the churned store to
// exactly the MapState the running compiler had: same identity numbers, same
// rule IDs. Without it a restarted agent renumbers in sorted order, and until
// its first apply completes the pinned maps judge new numbers by old rules.
func TestRestoredAllocationCompilesIdentically(t *testing.T) {
	s := benchSnapshot(3, 4, 2)
	c := policy.NewCompiler(policy.Config{})
	if _, err := c.Reset(s); err != nil {
		t.Fatal(err)
	}
	// Churn so that the live numbering is no longer the sorted one: pods
	// relabelled, removed and added, a policy removed and re-added, a
	// namespace relabelled.
	pods := slices.Clone(s.Pods)
	for i := range pods {
		if i%3 == 0 {
			pods[i].Labels = map[string]string{"app": "moved", "gen": fmt.Sprint(i)}
			if _, _, err := c.UpsertPod(pods[i]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, d := c.DeletePod(pods[1].Namespace, pods[1].Name); len(d.RemovedEndpoints) != 1 {
		t.Fatalf("delete pod: diff %+v", d)
	}
	pods = slices.Delete(pods, 1, 2)
	np := s.NetworkPolicies[0]
	if _, _, err := c.DeletePolicy(policy.KindNetworkPolicy, np.Namespace, np.Name); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.UpsertNetworkPolicy(np); err != nil {
		t.Fatal(err)
	}
	ns := s.Namespaces[1]
	ns.Labels = map[string]string{"team": "monitoring"}
	if _, _, err := c.UpsertNamespace(ns); err != nil {
		t.Fatal(err)
	}
	live := c.MapState()

	saved, err := json.Marshal(c.Allocation())
	if err != nil {
		t.Fatal(err)
	}
	var alloc policy.Allocation
	if err := json.Unmarshal(saved, &alloc); err != nil {
		t.Fatal(err)
	}
	final := &policy.Snapshot{Namespaces: slices.Clone(s.Namespaces), Pods: pods, NetworkPolicies: s.NetworkPolicies}
	final.Namespaces[1] = ns

	fresh := policy.NewCompiler(policy.Config{})
	if err := fresh.RestoreAllocation(alloc); err != nil {
		t.Fatal(err)
	}
	restarted, err := fresh.Reset(final)
	if err != nil {
		t.Fatal(err)
	}
	if !sameState(live, restarted) {
		t.Fatalf("a restored compiler numbers differently:\n%s", describeDiff(live, restarted))
	}
}

func describeDiff(a, b *policy.MapState) string {
	out := ""
	for p, id := range a.IPCache {
		if b.IPCache[p] != id {
			out += fmt.Sprintf("ipcache %s: %d -> %d\n", p, id, b.IPCache[p])
		}
	}
	for ep, x := range a.Endpoints {
		if y := b.Endpoints[ep]; y == nil || x.Identity != y.Identity || !slices.Equal(x.Entries, y.Entries) {
			out += fmt.Sprintf("endpoint %d differs\n", ep)
		}
	}
	for id, r := range a.Rules {
		if b.Rules[id] != r {
			out += fmt.Sprintf("rule %d: %+v -> %+v\n", id, r, b.Rules[id])
		}
	}
	return out
}

// A label set that goes and comes back within the grace period keeps its
// number; after ExpireIdentities it gets a new one, and the old number is
// not handed to anyone else.
func TestIdentityGrace(t *testing.T) {
	now := time.Unix(1000, 0)
	c := policy.NewCompiler(policy.Config{Now: func() time.Time { return now }})
	s := benchSnapshot(1, 2, 1)
	ms, err := c.Reset(s)
	if err != nil {
		t.Fatal(err)
	}
	p := s.Pods[0]
	orig := ms.Endpoints[p.Endpoint].Identity
	flap := p
	flap.Labels = map[string]string{"app": "elsewhere"}
	if _, _, err := c.UpsertPod(flap); err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Minute)
	if n := c.ExpireIdentities(now.Add(-5 * time.Minute)); n != 0 {
		t.Fatalf("expired %d identities inside the grace period", n)
	}
	ms, _, err = c.UpsertPod(p)
	if err != nil {
		t.Fatal(err)
	}
	if got := ms.Endpoints[p.Endpoint].Identity; got != orig {
		t.Fatalf("flapped back within the grace: identity %d, want %d", got, orig)
	}
	ms, _, _ = c.UpsertPod(flap)
	other := ms.Endpoints[p.Endpoint].Identity
	now = now.Add(10 * time.Minute)
	if n := c.ExpireIdentities(now.Add(-5 * time.Minute)); n != 1 {
		t.Fatalf("expired %d identities after the grace, want 1", n)
	}
	ms, _, _ = c.UpsertPod(p)
	got := ms.Endpoints[p.Endpoint].Identity
	if got == orig || got == other {
		t.Fatalf("after expiry identity %d reuses an old number (%d, %d)", got, orig, other)
	}
}

// A record whose CIDR part is bad is refused whole: the caller numbers
// afresh, and the workload numbers of the bad record must not stay behind
// (they would mix with fresh CIDR numbers and rule IDs).
func TestRestoreAllocationAllOrNothing(t *testing.T) {
	src := policy.NewCompiler(policy.Config{})
	if _, err := src.Reset(benchSnapshot(2, 3, 1)); err != nil {
		t.Fatal(err)
	}
	alloc := src.Allocation()
	if len(alloc.Workloads.Keys) == 0 {
		t.Fatal("the source compiler numbered no workload identity")
	}
	alloc.CIDRs.Next = 1 // outside the CIDR range
	c := policy.NewCompiler(policy.Config{})
	if err := c.RestoreAllocation(alloc); err == nil {
		t.Fatal("a record with a bad CIDR part was restored")
	}
	if got := c.Allocation(); len(got.Workloads.Keys) != 0 || len(got.CIDRs.Keys) != 0 || len(got.Rules) != 0 {
		t.Fatalf("after a refused restore the compiler keeps %d workload numbers, %d CIDR numbers, %d rule IDs; want none",
			len(got.Workloads.Keys), len(got.CIDRs.Keys), len(got.Rules))
	}
	// And the same compiler still takes a good record.
	alloc.CIDRs = src.Allocation().CIDRs
	if err := c.RestoreAllocation(alloc); err != nil {
		t.Fatalf("a good record after a refused one: %v", err)
	}
}
