package cni_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/bulkhead-io/bulkhead/cni"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// withIPs replaces prevResult's addresses.
func withIPs(t *testing.T, data []byte, ips ...string) []byte {
	t.Helper()
	var conf map[string]any
	if err := json.Unmarshal(data, &conf); err != nil {
		t.Fatal(err)
	}
	prev := conf["prevResult"].(map[string]any)
	var list []any
	for _, ip := range ips {
		list = append(list, map[string]any{"address": ip, "interface": 1})
	}
	prev["ips"] = list
	out, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// An ADD whose prevResult gives the pod no usable address of its own, or
// whose CNI_ARGS do not name the pod, fails with a CNI error and never
// reaches the agent. Before the fix 0.0.0.0/0 became the pod's host entry
// 0.0.0.0, no address at all made an endpoint without one, and a missing
// pod became "default/container-<id>".
func TestAddRejectsUnusablePodIPsAndMissingPod(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	base := stdin("1.0.0", sock, 1, true)
	noPod := func(a *skel.CmdArgs) *skel.CmdArgs { a.Args = "IgnoreUnknown=1"; return a }
	for _, tt := range []struct {
		name string
		args *skel.CmdArgs
		code uint
		msg  string
	}{
		{"no IP", cmdArgs(withIPs(t, base)), types.ErrInvalidNetworkConfig, "no pod IP"},
		{"0.0.0.0/0", cmdArgs(withIPs(t, base, "0.0.0.0/0")), types.ErrInvalidNetworkConfig, "0.0.0.0/0"},
		{"::/0", cmdArgs(withIPs(t, base, "10.213.7.5/24", "::/0")), types.ErrInvalidNetworkConfig, "::/0"},
		{"/0 mask", cmdArgs(withIPs(t, base, "10.213.7.5/0")), types.ErrInvalidNetworkConfig, "/0"},
		{"network address", cmdArgs(withIPs(t, base, "10.213.7.0/24")), types.ErrInvalidNetworkConfig, "network address"},
		{"broadcast", cmdArgs(withIPs(t, base, "10.213.7.255/24")), types.ErrInvalidNetworkConfig, "broadcast"},
		{"loopback", cmdArgs(withIPs(t, base, "127.0.0.1/8")), types.ErrInvalidNetworkConfig, "127.0.0.1"},
		{"multicast", cmdArgs(withIPs(t, base, "ff02::1/128")), types.ErrInvalidNetworkConfig, "ff02::1"},
		{"no pod args", noPod(cmdArgs(base)), types.ErrInvalidEnvironmentVariables, "K8S_POD_NAME"},
		{"half pod args", func() *skel.CmdArgs { a := cmdArgs(base); a.Args = "K8S_POD_NAMESPACE=shop"; return a }(),
			types.ErrInvalidEnvironmentVariables, "K8S_POD_NAME"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, out := newPlugin()
			err := p.Add(tt.args)
			if err == nil {
				t.Fatal("ADD succeeded")
			}
			if c := cniCode(t, err); c != tt.code {
				t.Errorf("code %d, want %d: %v", c, tt.code, err)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not mention %q", err, tt.msg)
			}
			if out.Len() != 0 {
				t.Errorf("ADD printed %q on failure", out.String())
			}
		})
	}
	if n := agent.TotalCalls(); n != 0 {
		t.Errorf("agent was called %d times for bad input", n)
	}
}

// allowMissingPodArgs is the one documented way to ADD without K8S_POD_*.
func TestAllowMissingPodArgs(t *testing.T) {
	var conf map[string]any
	if err := json.Unmarshal(stdin("1.0.0", "/run/x.sock", 1, true), &conf); err != nil {
		t.Fatal(err)
	}
	conf["allowMissingPodArgs"] = true
	data, _ := json.Marshal(conf)
	c, err := cni.ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	if !c.AllowMissingPodArgs {
		t.Fatal("allowMissingPodArgs parsed but ignored")
	}
}
