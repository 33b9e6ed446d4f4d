package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// chain is the conflist a runtime would read from /etc/cni/net.d, run
// through libcni exactly as containerd and CRI-O do.
type chain struct {
	list *libcni.NetworkConfigList
	cni  *libcni.CNIConfig
}

// chainConfig says where the plugins are and what they may use.
type chainConfig struct {
	// PluginDirs hold ptp, host-local and bulkhead-cni.
	PluginDirs []string
	Subnet     netip.Prefix
	// DataDir is host-local's lease directory, CacheDir libcni's cache:
	// both private to one demo run, so a crashed run cannot leak leases
	// into the next.
	DataDir, CacheDir string
	Socket            string
	// Stderr receives the plugins' stderr.
	Stderr io.Writer
}

func newChain(cfg chainConfig) (*chain, error) {
	for _, p := range []string{"ptp", "host-local", "bulkhead-cni"} {
		if _, err := findPlugin(cfg.PluginDirs, p); err != nil {
			return nil, err
		}
	}
	conflist, err := json.Marshal(map[string]any{
		"cniVersion": "1.1.0",
		"name":       "bulkhead-demo",
		"plugins": []any{
			map[string]any{
				"type":   "ptp",
				"ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": cfg.DataDir,
					// No "routes": ptp then routes only the pod subnet, so
					// the pods have no default route and nothing they send
					// can leave the machine.
					"ranges": []any{[]any{map[string]any{"subnet": cfg.Subnet.String()}}},
				},
			},
			map[string]any{"type": "bulkhead-cni", "socket": cfg.Socket, "agentWaitSeconds": 5},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("encode conflist: %w", err)
	}
	list, err := libcni.NetworkConfFromBytes(conflist)
	if err != nil {
		return nil, fmt.Errorf("parse conflist: %w", err)
	}
	// An explicit exec: libcni creates its default lazily without a lock,
	// which races when pods are added concurrently.
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: cfg.Stderr}, PluginDecoder: version.PluginDecoder{}}
	return &chain{list: list, cni: libcni.NewCNIConfigWithCacheDir(cfg.PluginDirs, cfg.CacheDir, exec)}, nil
}

func findPlugin(dirs []string, name string) (string, error) {
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	hint := "run `make cni-plugins`, or pass --cni-bin"
	if name == "bulkhead-cni" {
		hint = "run `make build`, or pass --bin-dir"
	}
	return "", fmt.Errorf("CNI plugin %s not found in %v: %s", name, dirs, hint)
}

// runtimeConf is what a CRI runtime passes for a pod sandbox, including the
// Kubernetes CNI_ARGS that bulkhead-cni reads the pod's name from.
func (p *pod) runtimeConf() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.containerID,
		NetNS:       p.netns.Path(),
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.spec.Namespace},
			{"K8S_POD_NAME", p.spec.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.containerID},
			{"K8S_POD_UID", p.uid},
		},
	}
}

// add runs ADD through the chain and returns the pod's IPv4 address.
func (c *chain) add(ctx context.Context, p *pod) (netip.Addr, error) {
	r, err := c.cni.AddNetworkList(ctx, c.list, p.runtimeConf())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("CNI ADD %s: %w", p.spec.Ref(), err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("CNI ADD %s: result: %w", p.spec.Ref(), err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("CNI ADD %s: no IPv4 address in the result", p.spec.Ref())
}

// del runs DEL through the chain: ptp removes the veth, host-local the
// lease, bulkhead-cni the agent's endpoint.
func (c *chain) del(ctx context.Context, p *pod) error {
	if err := c.cni.DelNetworkList(ctx, c.list, p.runtimeConf()); err != nil {
		return fmt.Errorf("CNI DEL %s: %w", p.spec.Ref(), err)
	}
	return nil
}
