package twonode

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// TestTopology checks what callers rely on: pods on either node reach each
// other in both directions and address families, each agent runs in its
// node's namespace with the arguments it was given, a restart with new
// arguments keeps the node's pods connected, and SyncPeers tells each
// agent about the other node's pods.
func TestTopology(t *testing.T) {
	for _, tc := range []struct {
		primary string
		ipv6    bool
	}{{"ptp", true}, {"bridge", false}} {
		t.Run(fmt.Sprintf("%s/ipv6=%v", tc.primary, tc.ipv6), func(t *testing.T) {
			topo := New(t, Config{Primary: tc.primary, IPv6: tc.ipv6,
				ExtraAgentArgs: func(string) []string { return []string{"--flow-ring", "1000"} }})
			a, b := topo.A(), topo.B()
			for _, n := range topo.Nodes {
				if pid := n.AgentPID(); pid == 0 || netnsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)) != netnsInode(t, n.NS.Path()) {
					t.Fatalf("%s: agent (pid %d) does not run in the node's namespace", n.Name, pid)
				}
				st, err := n.Client.Status(context.Background())
				if err != nil || st.NodeName != n.Name {
					t.Fatalf("%s: status %+v, %v", n.Name, st, err)
				}
			}
			a1 := a.AddPod("ns-a", "a1", map[string]string{"app": "a1"}, "")
			a2 := a.AddPod("ns-a", "a2", nil, "")
			b1 := b.AddPod("ns-b", "b1", map[string]string{"app": "b1"}, "sa-b1")
			for _, p := range []*Pod{a1, b1} {
				p.Serve(7000)
			}
			checks := [][2]*Pod{{a1, b1}, {b1, a1}, {a2, a1}, {b1, a2}}
			reachable := func() {
				t.Helper()
				for _, c := range checks {
					from, to := c[0], c[1]
					if to.Name == "a2" {
						continue // serves nothing
					}
					for _, ip := range to.IPs() {
						if !Eventually(5*time.Second, func() bool { return from.TCPWorks(ip, 7000) && from.UDPWorks(ip, 7000) }) {
							t.Fatalf("%s (%v) cannot reach %s at %s", from.Name, from.IPs(), to.Name, ip)
						}
					}
				}
			}
			reachable()
			if tc.ipv6 && (!a1.IPv6.IsValid() || !a.PodCIDR6.Contains(a1.IPv6) || !b.PodCIDR6.Contains(b1.IPv6)) {
				t.Fatalf("IPv6 addresses outside the nodes' CIDRs: %v in %v, %v in %v", a1.IPv6, a.PodCIDR6, b1.IPv6, b.PodCIDR6)
			}

			// Each agent learns the other node's pods from its store.
			topo.SyncPeers()
			waitIdentity(t, b, "ns-a", map[string]string{"app": "a1"})
			waitIdentity(t, a, "ns-b", map[string]string{"app": "b1"})
			peers, err := os.ReadFile(b.StoreDir + "/" + PeersFile)
			if err != nil || !strings.Contains(string(peers), `"ip":"`+a1.IPv4.String()+`"`) || !strings.Contains(string(peers), `"nodeName":"node-a"`) {
				t.Fatalf("node B's peers file lacks a1: %s (%v)", peers, err)
			}

			// A restart with changed arguments keeps the pods connected.
			oldPID := b.AgentPID()
			b.Args = append(b.Args, "--flow-ring", "2000")
			b.RestartAgent()
			if b.AgentPID() == oldPID || !strings.Contains(b.AgentLog(), "--flow-ring 1000 --flow-ring 2000") {
				t.Fatalf("node B's agent was not restarted with the new arguments:\n%s", b.AgentLog())
			}
			reachable()

			// A removed pod leaves its node's store and, after SyncPeers,
			// the other node's.
			a2.Remove()
			topo.SyncPeers()
			peers, _ = os.ReadFile(b.StoreDir + "/" + PeersFile)
			if strings.Contains(string(peers), `"a2"`) || !strings.Contains(string(peers), `"a1"`) {
				t.Fatalf("node B's peers after a2's removal: %s", peers)
			}
			if slices.Contains(a.Pods(), a2) {
				t.Fatal("a2 still among node A's pods")
			}
		})
	}
}

// waitIdentity waits until n's agent has an identity of namespace with
// labels (the store reached it).
func waitIdentity(t *testing.T, n *Node, namespace string, labels map[string]string) {
	t.Helper()
	ok := Eventually(5*time.Second, func() bool {
		l, err := n.Client.ListIdentities(context.Background())
		if err != nil {
			return false
		}
		for _, id := range l.Identities {
			if id.Namespace != namespace {
				continue
			}
			match := true
			for k, v := range labels {
				match = match && id.Labels[k] == v
			}
			if match {
				return true
			}
		}
		return false
	})
	if !ok {
		l, err := n.Client.ListIdentities(context.Background())
		t.Fatalf("%s: no identity for %s %v: %+v, %v", n.Name, namespace, labels, l, err)
	}
}

func netnsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Ino
}

// TestIdentitySources: with the built-in CA both agents start, share one
// trust bundle (node B runs on a copy of node A's CA) and issue their pods
// the derived SPIFFE IDs; with SPIRE, AddPod's entries give each pod its
// SVID from its own node's SPIRE agent. Either way the peers file tells
// each node where the other's pods live (status.hostIP/hostIPs: the
// transit addresses), and namespace labels and pod relabels reach the
// agents.
func TestIdentitySources(t *testing.T) {
	for _, source := range []string{"builtin", "spire"} {
		t.Run(source, func(t *testing.T) {
			topo := New(t, Config{IdentitySource: source, IPv6: true})
			a, b := topo.A(), topo.B()
			topo.WriteNamespaces(map[string]map[string]string{"client": {"team": "client"}, "web": {"team": "web", MTLSLabel: MTLSEnabled}})
			a1 := a.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
			b1 := b.AddPod("web", "b1", map[string]string{"app": "b1"}, "")
			topo.SyncPeers()

			var bundles [2]string
			for i, n := range topo.Nodes {
				st, err := n.Client.Status(context.Background())
				if err != nil || st.IdentitySource == nil || st.IdentitySource.Name != source || st.IdentitySource.BundlePEM == "" {
					t.Fatalf("%s: identity source %+v, %v", n.Name, st.IdentitySource, err)
				}
				bundles[i] = st.IdentitySource.BundlePEM
			}
			if bundles[0] != bundles[1] {
				t.Fatalf("the nodes hold different trust bundles:\n%s\n%s", bundles[0], bundles[1])
			}
			if source == "spire" && (a1.SPIREEntry == "" || b1.SPIREEntry == "") {
				t.Fatalf("no SPIRE entries: %q %q", a1.SPIREEntry, b1.SPIREEntry)
			}
			want := map[*Node]map[string]string{
				a: {"client/a1": "spiffe://" + topo.TrustDomain.Name() + "/ns/client/sa/a1"},
				b: {"web/b1": "spiffe://" + topo.TrustDomain.Name() + "/ns/web/sa/default"},
			}
			if a1.SPIFFEID().String() != want[a]["client/a1"] || b1.SPIFFEID().String() != want[b]["web/b1"] {
				t.Fatalf("SPIFFEID() = %s, %s", a1.SPIFFEID(), b1.SPIFFEID())
			}
			for n, pods := range want {
				if !Eventually(90*time.Second, func() bool {
					l, err := n.Client.ListIdentities(context.Background())
					if err != nil {
						return false
					}
					for pod, id := range pods {
						if !slices.ContainsFunc(l.SVIDs, func(s api.SVIDInfo) bool { return s.Pod == pod && s.SPIFFEID == id && s.Serial != "" }) {
							return false
						}
					}
					return true
				}) {
					l, err := n.Client.ListIdentities(context.Background())
					t.Fatalf("%s: SVIDs %+v (%v), want %v", n.Name, l.SVIDs, err, pods)
				}
			}

			peers, err := os.ReadFile(b.StoreDir + "/" + PeersFile)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{`"hostIP":"` + a.TransitIP4.String() + `"`, `"hostIPs":[{"ip":"` + a.TransitIP4.String() + `"},{"ip":"` + a.TransitIP6.String() + `"}]`} {
				if !strings.Contains(string(peers), s) {
					t.Fatalf("node B's peers file lacks %s:\n%s", s, peers)
				}
			}
			// A relabel of a1 reaches node B.
			a1.Relabel(map[string]string{"app": "a1", MTLSLabel: MTLSEnabled})
			topo.SyncPeers()
			waitIdentity(t, b, "client", map[string]string{"app": "a1", MTLSLabel: MTLSEnabled})
		})
	}
}
