package cnichain

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/demo/subnets"
)

// DefaultCNIBin is where `make cni-plugins` puts the reference plugins when
// BULKHEAD_CNI_BIN is not set.
const DefaultCNIBin = "/var/cache/bulkhead/cni-plugins-v1.10.0"

// SpecVersions are the CNI spec versions bulkhead-cni supports (DESIGN.md §5).
func SpecVersions() []string { return []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} }

// Config describes one chain.
type Config struct {
	// Primary is "ptp" or "bridge".
	Primary string
	// CNIVersion is the conflist's cniVersion.
	CNIVersion string
	// Bulkhead, when set, appends bulkhead-cni to the chain.
	Bulkhead *BulkheadConfig
	// IPv6 adds an IPv6 range, making pods dual-stack.
	IPv6 bool
	// PluginDirs overrides DefaultPluginDirs.
	PluginDirs []string
}

// BulkheadConfig is bulkhead-cni's conflist entry.
type BulkheadConfig struct {
	Socket string
	// AgentWaitSeconds is omitted from the conflist when zero, so the
	// plugin's default applies.
	AgentWaitSeconds float64
}

// Chain is a conflist ready to run through libcni.
type Chain struct {
	Name    string
	Subnet4 netip.Prefix
	Subnet6 netip.Prefix
	// Bridge is the bridge device name (bridge chains only).
	Bridge string
	// Conflist is the JSON the runtime would read from /etc/cni/net.d.
	Conflist []byte

	// IPAMDir is host-local's data folder (one file per leased address,
	// under a folder per network).
	IPAMDir string
	// CacheDir is libcni's cache folder (results/ holds one file per
	// attachment), as a runtime's /var/lib/cni.
	CacheDir string

	list    *libcni.NetworkConfigList
	cni     *libcni.CNIConfig
	cfg     Config
	primary map[string]any
}

// DefaultPluginDirs are $BULKHEAD_CNI_BIN (the reference plugins) and the
// repository's bin/ (bulkhead-cni). It fails t when a plugin is missing and
// says how to build it.
func DefaultPluginDirs(t testing.TB, withBulkhead bool) []string {
	t.Helper()
	cniBin := os.Getenv("BULKHEAD_CNI_BIN")
	if cniBin == "" {
		cniBin = DefaultCNIBin
	}
	for _, p := range []string{"ptp", "bridge", "host-local"} {
		if _, err := os.Stat(filepath.Join(cniBin, p)); err != nil {
			t.Fatalf("reference CNI plugin %s missing in %s (run `make cni-plugins`): %v", p, cniBin, err)
		}
	}
	root := RepoRoot(t)
	bin := filepath.Join(root, "bin")
	if withBulkhead {
		fi, err := os.Stat(filepath.Join(bin, "bulkhead-cni"))
		if err != nil {
			t.Fatalf("bulkhead-cni missing in %s (run `make build`, or `CGO_ENABLED=0 go build -o bin/ ./cmd/bulkhead-cni`): %v", bin, err)
		}
		// A stale binary would make these tests pass or fail for code
		// that no longer exists.
		if newer := newestSource(t, root, "cni", "agent/api", "cmd/bulkhead-cni"); newer != "" {
			if si, err := os.Stat(newer); err == nil && si.ModTime().After(fi.ModTime()) {
				t.Fatalf("bin/bulkhead-cni is older than %s; rebuild it (`make build`, or `CGO_ENABLED=0 go build -o bin/ ./cmd/bulkhead-cni`)", newer)
			}
		}
	}
	return []string{cniBin, bin}
}

// newestSource returns the most recently modified non-test .go file in the
// given directories (not recursive), or "" if there is none.
func newestSource(t testing.TB, root string, dirs ...string) string {
	t.Helper()
	var newest string
	var newestTime time.Time
	for _, d := range dirs {
		files, err := filepath.Glob(filepath.Join(root, d, "*.go"))
		if err != nil {
			t.Fatalf("glob %s: %v", d, err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			fi, err := os.Stat(f)
			if err == nil && fi.ModTime().After(newestTime) {
				newest, newestTime = f, fi.ModTime()
			}
		}
	}
	return newest
}

// RepoRoot is the directory holding go.mod, found upwards from the test's
// working directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("getwd: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no go.mod above the working directory")
		}
		dir = parent
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

// New builds a chain with its own network name, subnets, host-local data
// dir, libcni cache dir and (for bridge) bridge name, all removed when t
// ends.
func New(t testing.TB, cfg Config) *Chain {
	t.Helper()
	if cfg.Primary != "ptp" && cfg.Primary != "bridge" {
		t.Fatalf("cnichain: primary %q: want ptp or bridge", cfg.Primary)
	}
	dirs := cfg.PluginDirs
	if dirs == nil {
		dirs = DefaultPluginDirs(t, cfg.Bulkhead != nil)
	}
	id := randomHex(t, 4)
	c := &Chain{Name: "bh-" + cfg.Primary + "-" + id}
	octet := reserveSubnet(t)
	c.Subnet4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 213, octet, 0}), 24)
	c.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:213:0:%x::/64", octet))
	dataDir := t.TempDir()
	cacheDir := t.TempDir()

	ranges := []any{[]any{map[string]any{"subnet": c.Subnet4.String()}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}}
	if cfg.IPv6 {
		ranges = append(ranges, []any{map[string]any{"subnet": c.Subnet6.String()}})
		routes = append(routes, map[string]any{"dst": "::/0"})
	}
	primary := map[string]any{
		"type":   cfg.Primary,
		"ipMasq": false,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": dataDir,
			"ranges":  ranges,
			"routes":  routes,
		},
	}
	if cfg.Primary == "bridge" {
		c.Bridge = "bhbr" + id
		primary["bridge"] = c.Bridge
		primary["isGateway"] = true
		t.Cleanup(func() {
			if l, err := netlink.LinkByName(c.Bridge); err == nil {
				if err := netlink.LinkDel(l); err != nil {
					t.Errorf("delete bridge %s: %v", c.Bridge, err)
				}
			}
		})
	}
	c.IPAMDir, c.CacheDir, c.cfg, c.primary = dataDir, cacheDir, cfg, primary
	c.build(t, dirs)
	return c
}

// build writes the conflist of c.cfg around c.primary and the libcni
// config that runs it.
func (c *Chain) build(t testing.TB, dirs []string) {
	t.Helper()
	plugins := []any{c.primary}
	if b := c.cfg.Bulkhead; b != nil {
		entry := map[string]any{"type": "bulkhead-cni", "socket": b.Socket}
		if b.AgentWaitSeconds != 0 {
			entry["agentWaitSeconds"] = b.AgentWaitSeconds
		}
		plugins = append(plugins, entry)
	}
	conflist, err := json.Marshal(map[string]any{
		"cniVersion": c.cfg.CNIVersion,
		"name":       c.Name,
		"plugins":    plugins,
	})
	if err != nil {
		t.Fatalf("marshal conflist: %v", err)
	}
	c.Conflist = conflist
	c.list, err = libcni.NetworkConfFromBytes(conflist)
	if err != nil {
		t.Fatalf("parse conflist: %v\n%s", err, conflist)
	}
	// An explicit exec: libcni creates its default lazily without a lock,
	// which races when pods are added concurrently.
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	c.cni = libcni.NewCNIConfigWithCacheDir(dirs, c.CacheDir, exec)
}

// WithBulkhead is the same network (name, subnets, IPAM data, libcni cache,
// bridge) with bulkhead-cni chained after the primary, as the installer
// leaves a node's conflist: pods added through c before are the running
// pods an install finds.
func (c *Chain) WithBulkhead(t testing.TB, b BulkheadConfig) *Chain {
	t.Helper()
	cfg := c.cfg
	cfg.Bulkhead = &b
	dirs := cfg.PluginDirs
	if dirs == nil {
		dirs = DefaultPluginDirs(t, true)
	}
	n := &Chain{Name: c.Name, Subnet4: c.Subnet4, Subnet6: c.Subnet6, Bridge: c.Bridge, IPAMDir: c.IPAMDir, CacheDir: c.CacheDir, cfg: cfg, primary: c.primary}
	n.build(t, dirs)
	return n
}

// reserveSubnet picks a /24 index in 10.213.0.0/16 that no other harness
// or demo (in any process on this host) holds and no host route overlaps.
func reserveSubnet(t testing.TB) byte {
	t.Helper()
	var seed [1]byte
	if _, err := rand.Read(seed[:]); err != nil {
		t.Fatalf("random: %v", err)
	}
	// Start at a random /24 so concurrent runs rarely contend for locks.
	octets := make([]int, 256)
	for i := range octets {
		octets[i] = int(seed[0] + byte(i))
	}
	pfx, release, err := subnets.Reserve(octets)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = release() })
	return pfx.Addr().As4()[2]
}

// Pod is a sandbox: a network namespace plus the identity a runtime passes.
type Pod struct {
	Namespace   string
	Name        string
	UID         string
	ContainerID string
	IfName      string
	NS          ns.NetNS

	removed bool
	nsGone  bool
}

// NewPod creates a network namespace for a pod. When t ends it runs a
// best-effort DEL through the chain and removes the namespace.
func (c *Chain) NewPod(t testing.TB) *Pod {
	t.Helper()
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	id := randomHex(t, 8)
	p := &Pod{
		Namespace:   "default",
		Name:        "pod-" + id[:8],
		UID:         id[:8] + "-0000-4000-8000-" + id[4:16],
		ContainerID: "bh" + id,
		IfName:      "eth0",
		NS:          netns,
	}
	t.Cleanup(func() {
		if err := c.Remove(context.Background(), p); err != nil {
			t.Errorf("remove pod %s: %v", p.Name, err)
		}
	})
	return p
}

// Remove tears a pod down now, as a runtime does when it deletes the
// sandbox: a best-effort DEL through the chain, then the namespace goes.
// Loops that create many pods (benchmarks) call it to release addresses.
func (c *Chain) Remove(ctx context.Context, p *Pod) error {
	if p.removed {
		return nil
	}
	p.removed = true
	_ = c.cni.DelNetworkList(ctx, c.list, c.RuntimeConf(p))
	return c.RemoveNetns(p)
}

// RemoveNetns deletes the pod's network namespace without a CNI DEL, as
// when a runtime destroys the sandbox first or a node loses it in a crash.
// The kernel then deletes the pod's veth pair.
func (c *Chain) RemoveNetns(p *Pod) error {
	if p.nsGone {
		return nil
	}
	p.nsGone = true
	_ = p.NS.Close()
	if err := testutils.UnmountNS(p.NS); err != nil {
		return fmt.Errorf("remove netns %s: %w", p.NS.Path(), err)
	}
	return nil
}

// RuntimeConf is what a CRI runtime passes for p, including the Kubernetes
// CNI_ARGS keys.
func (c *Chain) RuntimeConf(p *Pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.ContainerID,
		NetNS:       p.NS.Path(),
		IfName:      p.IfName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
			{"K8S_POD_UID", p.UID},
		},
	}
}

// Add runs ADD through the whole chain.
func (c *Chain) Add(ctx context.Context, p *Pod) (types.Result, error) {
	return c.cni.AddNetworkList(ctx, c.list, c.RuntimeConf(p))
}

// Check runs CHECK through the whole chain (spec 0.4.0 and later).
func (c *Chain) Check(ctx context.Context, p *Pod) error {
	return c.cni.CheckNetworkList(ctx, c.list, c.RuntimeConf(p))
}

// Del runs DEL through the whole chain.
func (c *Chain) Del(ctx context.Context, p *Pod) error {
	return c.cni.DelNetworkList(ctx, c.list, c.RuntimeConf(p))
}

// GC runs GC with valid as the only valid attachments (spec 1.1.0). Like
// libcni, it first DELs cached attachments that are not valid.
func (c *Chain) GC(ctx context.Context, valid ...*Pod) error {
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{}}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.ContainerID, IfName: p.IfName})
	}
	return c.cni.GCNetworkList(ctx, c.list, args)
}

// Status runs STATUS through the whole chain (spec 1.1.0).
func (c *Chain) Status(ctx context.Context) error {
	return c.cni.GetStatusNetworkList(ctx, c.list)
}
