package twonode

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
	spiretest "github.com/bulkhead-io/bulkhead/tests/spire"
)

// Node names, as given to --node-name and written into peers' spec.nodeName.
const (
	NodeA = "node-a"
	NodeB = "node-b"
)

// TransitLink is the name of each node's end of the link between the nodes
// (inside the node namespaces, so it cannot clash with the host's links).
const TransitLink = "bh2n0"

// Transit addresses. They exist only inside the node namespaces; the /30
// and the ULA /64 are still picked outside ranges the host or other tests
// use, so that a packet that leaks is recognisable.
var (
	transit4 = [2]netip.Prefix{netip.MustParsePrefix("172.31.213.1/30"), netip.MustParsePrefix("172.31.213.2/30")}
	transit6 = [2]netip.Prefix{netip.MustParsePrefix("fd00:213:ffff::a/64"), netip.MustParsePrefix("fd00:213:ffff::b/64")}
)

// Config shapes a topology.
type Config struct {
	// Primary is the primary CNI plugin of both nodes' chains: "ptp"
	// (default) or "bridge".
	Primary string
	// IPv6 makes pods dual-stack and routes IPv6 between the nodes too.
	IPv6 bool
	// ExtraAgentArgs, when set, gives each node's agent arguments beyond
	// the ones the topology sets (node is NodeA or NodeB). They become
	// Node.Args, which the caller may change before RestartAgent.
	ExtraAgentArgs func(node string) []string
	// NoStart leaves the agents stopped, for callers that prepare stores
	// or files first; start them with StartAgents or Node.StartAgent.
	NoStart bool
	// IdentitySource is where the agents get their pods' SVIDs from:
	//   - "" leaves it to ExtraAgentArgs (the agent's default: none);
	//   - "builtin": each agent runs --identity-source builtin, and both
	//     share one CA: StartAgents starts node A first, then copies the
	//     CA folder A created (--state-dir/ca) into B's state folder
	//     before B starts, so both issue SVIDs under one trust bundle;
	//   - "spire": a SPIRE server and one SPIRE agent per node (the
	//     bulkhead agents, root, are its authorized delegates), trust
	//     domain SPIRETrustDomain; AddPod registers an entry for each pod
	//     with its derived SPIFFE ID under its node's SPIRE agent.
	IdentitySource string
}

// SPIRETrustDomain is the trust domain of topologies with IdentitySource
// "spire"; "builtin" ones use the agent's default, cluster.local.
const SPIRETrustDomain = "bulkhead.test"

// Topology is two nodes and their pods.
type Topology struct {
	// Nodes are node A and node B, in that order.
	Nodes [2]*Node
	// IdentitySource is Config.IdentitySource.
	IdentitySource string
	// TrustDomain is the trust domain of the pods' SPIFFE IDs.
	TrustDomain spiffeid.TrustDomain
	// SPIRE is the SPIRE server (IdentitySource "spire" only), and
	// SPIREAgents node A's and node B's SPIRE agents.
	SPIRE       *spiretest.Server
	SPIREAgents [2]*spiretest.Agent
	t           testing.TB
}

// A is node A.
func (tp *Topology) A() *Node { return tp.Nodes[0] }

// B is node B.
func (tp *Topology) B() *Node { return tp.Nodes[1] }

// New builds both nodes, links and routes them, and (unless cfg.NoStart)
// starts both agents. It fails t on any error and removes everything when
// t ends. Use it from the test (or subtest) whose t it gets: its methods
// fail that t.
func New(t testing.TB, cfg Config) *Topology {
	t.Helper()
	privileged.Require(t)
	if cfg.Primary == "" {
		cfg.Primary = "ptp"
	}
	agentBin := filepath.Join(cnichain.RepoRoot(t), "bin", "bulkhead-agent")
	if _, err := os.Stat(agentBin); err != nil {
		t.Fatalf("bin/bulkhead-agent missing (run `make build`): %v", err)
	}
	id := randomHex(t, 4)
	// Unix socket paths are limited to 108 bytes; a test's TempDir can
	// be longer than that, so sockets get a short folder of their own.
	runDir, err := os.MkdirTemp("", "bh2n-")
	if err != nil {
		t.Fatalf("socket dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(runDir) })

	tp := &Topology{t: t, IdentitySource: cfg.IdentitySource, TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")}
	var sourceArgs [2][]string
	switch cfg.IdentitySource {
	case "":
	case "builtin":
		sourceArgs = [2][]string{{"--identity-source", "builtin"}, {"--identity-source", "builtin"}}
	case "spire":
		// Started before the nodes, so that it stops after them.
		tp.startSPIRE()
		for i, a := range tp.SPIREAgents {
			sourceArgs[i] = []string{"--identity-source", "spire", "--spire-admin-socket", a.AdminSocket(),
				"--trust-domain", SPIRETrustDomain}
		}
	default:
		t.Fatalf("twonode: identity source %q: want \"\", builtin or spire", cfg.IdentitySource)
	}
	for i, name := range []string{NodeA, NodeB} {
		letter := string(rune('a' + i))
		dir := t.TempDir()
		n := &Node{
			Name:       name,
			StoreDir:   filepath.Join(dir, "store"),
			StateDir:   filepath.Join(dir, "state"),
			FlowLog:    filepath.Join(dir, "flows.json"),
			Socket:     filepath.Join(runDir, letter+".sock"),
			BPFFS:      "/sys/fs/bpf/bulkhead-2n-" + id + "-" + letter,
			TransitIP4: transit4[i].Addr(),
			t:          t,
			bin:        agentBin,
			ipv6:       cfg.IPv6,
		}
		if cfg.IPv6 {
			n.TransitIP6 = transit6[i].Addr()
		}
		n.Args = slices.Clone(sourceArgs[i])
		if cfg.ExtraAgentArgs != nil {
			n.Args = append(n.Args, cfg.ExtraAgentArgs(name)...)
		}
		n.topo = tp
		if err := os.MkdirAll(n.StoreDir, 0o755); err != nil {
			t.Fatal(err)
		}
		n.NS = newNodeNetns(t)
		// The chain reserves the node's pod subnets from the pool every
		// harness and the demo share (demo/subnets), so two topologies,
		// or a topology and a one-node test, never hand out one address.
		n.Chain = cnichain.New(t, cnichain.Config{Primary: cfg.Primary, CNIVersion: "1.1.0", IPv6: cfg.IPv6,
			Bulkhead: &cnichain.BulkheadConfig{Socket: n.Socket, AgentWaitSeconds: 5}})
		n.PodCIDR4 = n.Chain.Subnet4
		if cfg.IPv6 {
			n.PodCIDR6 = n.Chain.Subnet6
		}
		n.Client = api.NewClient(api.ClientConfig{Socket: n.Socket, Timeout: 5 * time.Second})
		// Registered before any pod's cleanup, so it runs after the pods'
		// DELs went through the agent.
		t.Cleanup(n.cleanup)
		tp.Nodes[i] = n
	}
	tp.link(cfg.IPv6)
	if !cfg.NoStart {
		tp.StartAgents()
	}
	return tp
}

// newNodeNetns creates a named namespace (under /run/netns, so `ip netns
// exec` can inspect it while a test is paused) with loopback up, forwarding
// on and reverse-path filtering off: a node routes between its pods and the
// transit link, where asymmetric paths are normal.
func newNodeNetns(t testing.TB) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create node netns: %v", err)
	}
	// Registered first of the node's cleanups, so it runs last: the agent
	// and the pods' host-side veths are gone by then.
	t.Cleanup(func() {
		_ = n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("remove node netns %s: %v", n.Path(), err)
		}
	})
	err = n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("set lo up: %w", err)
		}
		// /proc/sys/net is the namespace of the thread that opens it, so
		// these writes land in the node's namespace.
		for path, v := range map[string]string{
			"net/ipv4/ip_forward":              "1",
			"net/ipv4/conf/all/rp_filter":      "0",
			"net/ipv4/conf/default/rp_filter":  "0",
			"net/ipv6/conf/all/forwarding":     "1",
			"net/ipv6/conf/default/forwarding": "1",
		} {
			if err := writeSysctl(path, v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("set up node netns %s: %v", n.Path(), err)
	}
	return n
}

func writeSysctl(path, value string) error {
	if err := os.WriteFile("/proc/sys/"+path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", strings.ReplaceAll(path, "/", "."), value, err)
	}
	return nil
}

// link creates the transit veth pair between the nodes, addresses it, and
// routes each node's pod CIDRs to the other through it.
func (tp *Topology) link(ipv6 bool) {
	tp.t.Helper()
	a, b := tp.Nodes[0], tp.Nodes[1]
	err := a.NS.Do(func(ns.NetNS) error {
		v := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: TransitLink},
			PeerName:      TransitLink,
			PeerNamespace: netlink.NsFd(int(b.NS.Fd())),
		}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("add transit veth: %w", err)
		}
		return nil
	})
	if err != nil {
		tp.t.Fatalf("node A: %v", err)
	}
	for i, n := range tp.Nodes {
		peer := tp.Nodes[1-i]
		err := n.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(TransitLink)
			if err != nil {
				return fmt.Errorf("find %s: %w", TransitLink, err)
			}
			if err := writeSysctl("net/ipv4/conf/"+TransitLink+"/rp_filter", "0"); err != nil {
				return err
			}
			addrs := []netip.Prefix{transit4[i]}
			if ipv6 {
				addrs = append(addrs, transit6[i])
			}
			for _, p := range addrs {
				a := &netlink.Addr{IPNet: prefixNet(p)}
				if p.Addr().Is6() {
					// Usable at once: DAD would hold it back a second.
					a.Flags = unix.IFA_F_NODAD
				}
				if err := netlink.AddrAdd(l, a); err != nil {
					return fmt.Errorf("address %s on %s: %w", p, TransitLink, err)
				}
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", TransitLink, err)
			}
			routes := map[netip.Prefix]netip.Addr{peer.PodCIDR4: peer.TransitIP4}
			if ipv6 {
				routes[peer.PodCIDR6] = peer.TransitIP6
			}
			for dst, via := range routes {
				r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(dst), Gw: via.AsSlice()}
				if err := netlink.RouteAdd(r); err != nil {
					return fmt.Errorf("route %s via %s: %w", dst, via, err)
				}
			}
			return nil
		})
		if err != nil {
			tp.t.Fatalf("%s: link: %v", n.Name, err)
		}
	}
}

// StartAgents starts both agents and waits until both are ready. With the
// built-in CA, node B's agent starts with a copy of the CA that node A's
// created (unless B has a CA folder already).
func (tp *Topology) StartAgents() {
	tp.t.Helper()
	a, b := tp.A(), tp.B()
	a.StartAgent()
	if tp.IdentitySource == "builtin" {
		dst := filepath.Join(b.StateDir, "ca")
		if _, err := os.Stat(dst); errors.Is(err, os.ErrNotExist) {
			if err := copyCA(filepath.Join(a.StateDir, "ca"), dst); err != nil {
				tp.t.Fatalf("share node A's CA with node B: %v\nnode A's agent log:\n%s", err, a.AgentLog())
			}
		}
	}
	b.StartAgent()
}

// copyCA copies the regular files of the CA folder src into dst (created
// 0700), each with its mode exactly: the CA refuses a key others may
// read.
func copyCA(src, dst string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return fmt.Errorf("read CA folder: %w", err)
	}
	if len(ents) == 0 {
		return fmt.Errorf("CA folder %s is empty", src)
	}
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return fmt.Errorf("create CA folder: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return fmt.Errorf("CA file %s: %w", e.Name(), err)
		}
		data, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return fmt.Errorf("CA file %s: %w", e.Name(), err)
		}
		to := filepath.Join(dst, e.Name())
		if err := os.WriteFile(to, data, info.Mode().Perm()); err != nil {
			return fmt.Errorf("CA file %s: %w", e.Name(), err)
		}
		// WriteFile's mode is masked by the umask: set it exactly.
		if err := os.Chmod(to, info.Mode().Perm()); err != nil {
			return fmt.Errorf("CA file %s: %w", e.Name(), err)
		}
	}
	return nil
}

// startSPIRE starts a SPIRE server and one SPIRE agent per node, makes
// this process's uid (the bulkhead agents run as it) an authorized
// delegate of each, and waits until each SPIRE agent serves it: until
// then it refuses the admin API.
func (tp *Topology) startSPIRE() {
	tp.t.Helper()
	tp.SPIRE = spiretest.StartServer(tp.t, spiretest.ServerConfig{TrustDomain: SPIRETrustDomain})
	tp.TrustDomain = tp.SPIRE.TrustDomain()
	for i := range tp.SPIREAgents {
		tp.SPIREAgents[i] = tp.SPIRE.StartAgent(tp.t, spiretest.AgentConfig{})
		tp.SPIRE.RegisterDelegate(tp.t, tp.SPIREAgents[i])
	}
	for _, a := range tp.SPIREAgents {
		a.WaitForSVID(tp.t, spiretest.DelegateID(tp.TrustDomain))
	}
}

// NamespacesFile holds the namespaces written by WriteNamespaces.
const NamespacesFile = "twonode-namespaces.yaml"

// WriteNamespaces writes the namespaces (name -> labels) into both nodes'
// stores (file NamespacesFile), replacing the ones written before.
func (tp *Topology) WriteNamespaces(namespaces map[string]map[string]string) {
	tp.t.Helper()
	var docs []string
	for _, name := range slices.Sorted(maps.Keys(namespaces)) {
		meta := map[string]any{"name": name}
		if l := namespaces[name]; len(l) > 0 {
			meta["labels"] = l
		}
		b, err := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
		if err != nil {
			tp.t.Fatalf("namespace %s: %v", name, err)
		}
		docs = append(docs, string(b))
	}
	for _, n := range tp.Nodes {
		n.WriteStore(NamespacesFile, "# written by tests/twonode\n"+strings.Join(docs, "\n---\n")+"\n")
	}
}

// SyncPeers writes, into each node's store (file PeersFile), a Pod for
// every pod of the other node, with its labels, service account, node
// name and status.podIPs: what a Kubernetes store would show a node about
// pods elsewhere, and what its ipcache learns remote addresses from. Call
// it again after adding or removing pods; the agents apply it within their
// store's reload time, so check the effect with Eventually.
func (tp *Topology) SyncPeers() {
	tp.t.Helper()
	for _, n := range tp.Nodes {
		tp.WritePeersOf(n, nil)
	}
}

// WritePeersOf writes n's PeersFile as SyncPeers does, except that the
// pods in override are listed with the addresses given there instead of
// their own (none: listed with no address). A test uses it to make n's
// view of the other node stale or wrong, as after an IP was reassigned
// and the store has not caught up.
func (tp *Topology) WritePeersOf(n *Node, override map[*Pod][]netip.Addr) {
	tp.t.Helper()
	other := tp.Nodes[0]
	if n == other {
		other = tp.Nodes[1]
	}
	docs, err := podDocs(other.Pods(), true, override)
	if err != nil {
		tp.t.Fatalf("peers of %s: %v", n.Name, err)
	}
	n.WriteStore(PeersFile, docs)
}

// Eventually retries cond every 50 ms until it holds or d has passed.
func Eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("random: %v", err)
	}
	return hex.EncodeToString(b)
}
