package cni_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/cni"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

const prevResult = `{
	"cniVersion": %[1]q,
	"interfaces": [
		{"name": "veth0abc", "mac": "aa:bb:cc:dd:ee:01"},
		{"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod"}
	],
	"ips": [{%[2]s"address": "10.213.7.5/24", "gateway": "10.213.7.1", "interface": 1}],
	"routes": [{"dst": "0.0.0.0/0"}]
}`

func stdin(ver, socket string, wait float64, withPrev bool) []byte {
	conf := map[string]any{"cniVersion": ver, "name": "pods", "type": "bulkhead-cni", "socket": socket, "agentWaitSeconds": wait}
	if withPrev {
		ipVer := ""
		if ver < "1.0.0" {
			ipVer = `"version": "4", `
		}
		var prev map[string]any
		if err := json.Unmarshal([]byte(fmt.Sprintf(prevResult, ver, ipVer)), &prev); err != nil {
			panic(err)
		}
		conf["prevResult"] = prev
	}
	b, err := json.Marshal(conf)
	if err != nil {
		panic(err)
	}
	return b
}

// fakePeer stands in for veth discovery, which veth_test.go covers against
// real namespaces.
func fakePeer(netnsPath, ifName string) (cni.Peer, error) {
	if netnsPath == "/gone" {
		return cni.Peer{}, fmt.Errorf("open netns: %w", cni.ErrNetnsGone)
	}
	return cni.Peer{PodIfName: ifName, PodIfIndex: 2, HostIfName: "veth0abc", HostIfIndex: 17}, nil
}

func newPlugin() (*cni.Plugin, *bytes.Buffer) {
	var out bytes.Buffer
	return cni.New(cni.Options{Stdout: &out, FindPeer: fakePeer}), &out
}

func cmdArgs(data []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: "c0ffee",
		Netns:       "/var/run/netns/pod",
		IfName:      "eth0",
		Args:        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=uid-1",
		Path:        "/opt/cni/bin",
		StdinData:   data,
	}
}

var key = api.EndpointKey{ContainerID: "c0ffee", IfName: "eth0"}

func cniCode(t *testing.T, err error) uint {
	t.Helper()
	var ce *types.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a *types.Error", err, err)
	}
	return ce.Code
}

func TestAddEnforcesAndPrintsPrevResult(t *testing.T) {
	for _, ver := range cni.SupportedVersions() {
		t.Run(ver, func(t *testing.T) {
			sock := cnichain.SocketPath(t)
			agent := cnichain.StartFakeAgent(t, sock)
			p, out := newPlugin()
			if err := p.Add(cmdArgs(stdin(ver, sock, 1, true))); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			ep, ok := agent.Endpoints()[key]
			if !ok {
				t.Fatalf("agent has no endpoint %v after ADD", key)
			}
			want := api.EndpointAddRequest{
				EndpointKey: key, Network: "pods", Netns: "/var/run/netns/pod", PodIfIndex: 2,
				HostVeth: "veth0abc", HostIfIndex: 17,
				Pod: api.PodRef{Namespace: "shop", Name: "cart-0", UID: "uid-1"},
				MAC: "aa:bb:cc:dd:ee:02",
			}
			if len(ep.IPs) != 1 || ep.IPs[0] != netip.MustParsePrefix("10.213.7.5/24") {
				t.Errorf("endpoint IPs = %v", ep.IPs)
			}
			ep.IPs = nil
			if fmt.Sprint(ep) != fmt.Sprint(want) {
				t.Errorf("endpoint = %+v\nwant       %+v", ep, want)
			}
			// The output is prevResult, unchanged, in the config's version,
			// serialized the way the CNI types library does (0.x results
			// always carry "dns": {}), so compare through that library.
			var got map[string]any
			if err := json.Unmarshal(out.Bytes(), &got); err != nil {
				t.Fatalf("output %q: %v", out.String(), err)
			}
			ipVer := ""
			if ver < "1.0.0" {
				ipVer = `"version": "4", `
			}
			wantRes, err := version.NewResult(ver, []byte(fmt.Sprintf(prevResult, ver, ipVer)))
			if err != nil {
				t.Fatal(err)
			}
			gotRes, err := version.NewResult(ver, out.Bytes())
			if err != nil {
				t.Fatalf("output is not a %s result: %v\n%s", ver, err, out.Bytes())
			}
			gb, _ := json.Marshal(gotRes)
			wb, _ := json.Marshal(wantRes)
			if !bytes.Equal(gb, wb) || got["cniVersion"] != ver {
				t.Errorf("ADD output\n%s\nwant prevResult\n%s", out.Bytes(), wb)
			}
		})
	}
}

func TestAddRejectsBadInputWithoutCallingAgent(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	tests := []struct {
		name string
		args *skel.CmdArgs
		code uint
		msg  string
	}{
		{"no prevResult", cmdArgs(stdin("1.0.0", sock, 1, false)), types.ErrInvalidNetworkConfig, "prevResult"},
		{"bad json", cmdArgs([]byte(`{"cniVersion":`)), types.ErrDecodingFailure, "JSON"},
		{"wrong type", cmdArgs([]byte(`{"cniVersion":"1.0.0","name":"n","socket":true}`)), types.ErrDecodingFailure, "socket"},
		{"bad CNI_ARGS", func() *skel.CmdArgs { a := cmdArgs(stdin("1.0.0", sock, 1, true)); a.Args = "K8S_POD_NAME"; return a }(), types.ErrInvalidEnvironmentVariables, "CNI_ARGS"},
		{"netns gone", func() *skel.CmdArgs { a := cmdArgs(stdin("1.0.0", sock, 1, true)); a.Netns = "/gone"; return a }(), types.ErrInvalidNetNS, "not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, out := newPlugin()
			err := p.Add(tt.args)
			if err == nil {
				t.Fatalf("ADD succeeded")
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

func TestAddWaitsForLateAgent(t *testing.T) {
	sock := cnichain.SocketPath(t)
	const delay = 400 * time.Millisecond
	started := make(chan *cnichain.FakeAgent, 1)
	go func() {
		time.Sleep(delay)
		// Not t.Fatal-safe from a goroutine; StartFakeAgent only fails
		// on a broken socket dir, which the ADD below then reports.
		started <- cnichain.StartFakeAgent(t, sock)
	}()
	p, out := newPlugin()
	start := time.Now()
	err := p.Add(cmdArgs(stdin("1.1.0", sock, 10, true)))
	elapsed := time.Since(start)
	agent := <-started
	if err != nil {
		t.Fatalf("ADD with agent starting after %v: %v", delay, err)
	}
	if elapsed < delay {
		t.Errorf("ADD returned after %v, before the agent existed", elapsed)
	}
	if _, ok := agent.Endpoints()[key]; !ok || out.Len() == 0 {
		t.Errorf("endpoint not enforced or no result printed")
	}
}

func TestAddWaitsForAgentReady(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	agent.SetReady(false)
	time.AfterFunc(300*time.Millisecond, func() { agent.SetReady(true) })
	p, _ := newPlugin()
	if err := p.Add(cmdArgs(stdin("1.0.0", sock, 10, true))); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if n := agent.Calls("AddEndpoint"); n < 2 {
		t.Errorf("AddEndpoint called %d times, want retries while not ready", n)
	}
	if _, ok := agent.Endpoints()[key]; !ok {
		t.Errorf("endpoint missing")
	}
}

func TestAddFailsClearlyAfterWindow(t *testing.T) {
	for _, tt := range []struct {
		name     string
		up       bool
		contains string
	}{
		{"no agent", false, "not reachable"},
		{"agent not ready", true, "not ready"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sock := cnichain.SocketPath(t)
			if tt.up {
				cnichain.StartFakeAgent(t, sock).SetReady(false)
			}
			p, out := newPlugin()
			const wait = 0.3
			start := time.Now()
			err := p.Add(cmdArgs(stdin("1.0.0", sock, wait, true)))
			if err == nil {
				t.Fatal("ADD succeeded without an agent")
			}
			if time.Since(start) < time.Duration(wait*float64(time.Second)) {
				t.Errorf("gave up after %v, before the %vs window", time.Since(start), wait)
			}
			if c := cniCode(t, err); c != types.ErrTryAgainLater {
				t.Errorf("code %d, want %d", c, types.ErrTryAgainLater)
			}
			for _, s := range []string{tt.contains, sock, "start bulkhead-agent", "agentWaitSeconds"} {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if out.Len() != 0 {
				t.Errorf("printed %q", out.String())
			}
		})
	}
}

func TestAddFailsWithoutEnforcement(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	p, out := newPlugin()

	agent.SetEnforce(false)
	if err := p.Add(cmdArgs(stdin("1.0.0", sock, 5, true))); err == nil || !strings.Contains(err.Error(), "not enforced") {
		t.Errorf("ADD with Enforced=false: %v", err)
	}
	agent.SetEnforce(true)
	agent.FailAdd(errors.New("compile failed"))
	start := time.Now()
	err := p.Add(cmdArgs(stdin("1.0.0", sock, 5, true)))
	if err == nil || !strings.Contains(err.Error(), "compile failed") {
		t.Errorf("ADD refused by agent: %v", err)
	}
	// A refusal is final: retrying for the whole window would only delay
	// the runtime's own retry.
	if n := agent.Calls("AddEndpoint"); n != 2 || time.Since(start) > 4*time.Second {
		t.Errorf("refusal retried: %d calls", n)
	}
	if out.Len() != 0 {
		t.Errorf("printed %q", out.String())
	}
}

func TestDel(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	p, _ := newPlugin()
	if err := p.Add(cmdArgs(stdin("1.0.0", sock, 5, true))); err != nil {
		t.Fatal(err)
	}
	del := cmdArgs(stdin("1.0.0", sock, 5, false))
	del.Netns = "" // runtimes may DEL after the netns is gone
	if err := p.Del(del); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, ok := agent.Endpoints()[key]; ok {
		t.Errorf("endpoint still known after DEL")
	}
	if err := p.Del(del); err != nil {
		t.Errorf("second DEL: %v", err)
	}
	agent.SetReady(false)
	if err := p.Del(del); err != nil {
		t.Errorf("DEL with agent not ready: %v", err)
	}
	agent.Stop()
	if err := p.Del(del); err != nil {
		t.Errorf("DEL with agent down: %v", err)
	}
	if err := p.Del(cmdArgs([]byte(`{"cniVersion":"1.0.0"}`))); err == nil {
		t.Errorf("DEL with bad config succeeded")
	}
}

func TestDelReportsAgentFailure(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	p, _ := newPlugin()
	args := cmdArgs(stdin("1.0.0", sock, 5, false))
	args.ContainerID = "unknown"
	if err := p.Del(args); err != nil {
		t.Errorf("DEL of unknown endpoint: %v", err)
	}
	// A running agent that fails to remove an endpoint is reported, so
	// the runtime retries DEL instead of leaking enforcement state.
	agent.FailDel(errors.New("detach failed"))
	if err := p.Del(args); err == nil || !strings.Contains(err.Error(), "detach failed") {
		t.Errorf("DEL with agent failure: %v", err)
	}
}

func TestCheck(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	p, _ := newPlugin()
	check := func() error { return p.Check(cmdArgs(stdin("1.0.0", sock, 5, true))) }

	if err := check(); err == nil || cniCode(t, err) != types.ErrUnknownContainer {
		t.Errorf("CHECK of unknown endpoint: %v", err)
	}
	if err := p.Add(cmdArgs(stdin("1.0.0", sock, 5, true))); err != nil {
		t.Fatal(err)
	}
	if err := check(); err != nil {
		t.Errorf("CHECK of healthy endpoint: %v", err)
	}
	if err := p.Check(cmdArgs(stdin("1.0.0", sock, 5, false))); err == nil {
		t.Errorf("CHECK without prevResult succeeded")
	}
	agent.MakeStale(key)
	if err := check(); err == nil || !strings.Contains(err.Error(), "identity is stale") {
		t.Errorf("CHECK with stale identity: %v", err)
	}
	if err := p.Add(cmdArgs(stdin("1.0.0", sock, 5, true))); err != nil {
		t.Fatal(err)
	}
	agent.Detach(key)
	if err := check(); err == nil || !strings.Contains(err.Error(), "not attached to host veth veth0abc") {
		t.Errorf("CHECK with detached programs: %v", err)
	}
	agent.Stop()
	if err := check(); err == nil || cniCode(t, err) != types.ErrTryAgainLater {
		t.Errorf("CHECK with agent down: %v", err)
	}
}

func TestStatus(t *testing.T) {
	sock := cnichain.SocketPath(t)
	p, _ := newPlugin()
	status := func() error { return p.Status(cmdArgs(stdin("1.1.0", sock, 5, false))) }
	if err := status(); err == nil || cniCode(t, err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "start bulkhead-agent") {
		t.Errorf("STATUS without agent: %v", err)
	}
	agent := cnichain.StartFakeAgent(t, sock)
	if err := status(); err != nil {
		t.Errorf("STATUS with ready agent: %v", err)
	}
	agent.SetReady(false)
	if err := status(); err == nil || cniCode(t, err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "not ready") {
		t.Errorf("STATUS with agent not ready: %v", err)
	}
}

func TestGC(t *testing.T) {
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	p, _ := newPlugin()
	for _, id := range []string{"keep", "drop"} {
		a := cmdArgs(stdin("1.1.0", sock, 5, true))
		a.ContainerID = id
		if err := p.Add(a); err != nil {
			t.Fatal(err)
		}
	}
	gc := func(extra string) error {
		return p.GC(&skel.CmdArgs{StdinData: []byte(fmt.Sprintf(`{"cniVersion":"1.1.0","name":"pods","type":"bulkhead-cni","socket":%q%s}`, sock, extra))})
	}
	// No list: nothing may be removed.
	if err := gc(""); err != nil {
		t.Fatalf("GC without list: %v", err)
	}
	if n := len(agent.Endpoints()); n != 2 {
		t.Fatalf("GC without list left %d endpoints, want 2", n)
	}
	if err := gc(`,"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]`); err != nil {
		t.Fatalf("GC: %v", err)
	}
	eps := agent.Endpoints()
	if _, ok := eps[api.EndpointKey{ContainerID: "keep", IfName: "eth0"}]; !ok || len(eps) != 1 {
		t.Errorf("after GC endpoints = %v, want only keep", eps)
	}
	agent.Stop()
	if err := gc(`,"cni.dev/valid-attachments":[]`); err == nil {
		t.Errorf("GC with agent down succeeded")
	}
}
