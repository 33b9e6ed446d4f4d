package cnichain_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

func primaries() []string { return []string{"ptp", "bridge"} }

func hasCheck(ver string) bool { return ver != "0.3.1" }

// podAddrs returns the global addresses of ifName inside the pod.
func podAddrs(t *testing.T, p *cnichain.Pod) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	err := p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP)
			ones, _ := a.Mask.Size()
			if ip.Unmap().IsGlobalUnicast() || ip.Unmap().IsPrivate() {
				out = append(out, netip.PrefixFrom(ip.Unmap(), ones))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read %s addresses: %v", p.IfName, err)
	}
	return out
}

func podLinkExists(t *testing.T, p *cnichain.Pod) bool {
	t.Helper()
	var exists bool
	err := p.NS.Do(func(ns.NetNS) error {
		_, err := netlink.LinkByName(p.IfName)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		exists = err == nil
		return err
	})
	if err != nil {
		t.Fatalf("look up %s in pod: %v", p.IfName, err)
	}
	return exists
}

// checkResult verifies that ADD's result is in the requested version and
// that the pod really has the address it reports, inside the chain's subnet.
func checkResult(t *testing.T, c *cnichain.Chain, p *cnichain.Pod, ver string, res types.Result) *current.Result {
	t.Helper()
	if res.Version() != ver {
		t.Errorf("result version %s, want %s", res.Version(), ver)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatalf("convert result: %v", err)
	}
	if len(cur.IPs) == 0 {
		t.Fatalf("result has no IPs: %v", cur)
	}
	got := podAddrs(t, p)
	for _, ipc := range cur.IPs {
		a, _ := netip.AddrFromSlice(ipc.Address.IP)
		if a = a.Unmap(); !c.Subnet4.Contains(a) && !c.Subnet6.Contains(a) {
			t.Errorf("result IP %v outside %v/%v", a, c.Subnet4, c.Subnet6)
		}
		found := false
		for _, g := range got {
			found = found || g.Addr() == a
		}
		if !found {
			t.Errorf("result IP %v is not on %s in the pod (has %v)", a, p.IfName, got)
		}
	}
	return cur
}

// TestPrimaryAlone proves the harness: the reference chain alone, through
// libcni, for every supported spec version.
func TestPrimaryAlone(t *testing.T) {
	privileged.Require(t)
	for _, primary := range primaries() {
		for _, ver := range cnichain.SpecVersions() {
			t.Run(primary+"/"+ver, func(t *testing.T) {
				ctx := context.Background()
				c := cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: ver})
				p := c.NewPod(t)
				res, err := c.Add(ctx, p)
				if err != nil {
					t.Fatalf("ADD: %v", err)
				}
				checkResult(t, c, p, ver, res)
				if hasCheck(ver) {
					if err := c.Check(ctx, p); err != nil {
						t.Errorf("CHECK: %v", err)
					}
				}
				if err := c.Del(ctx, p); err != nil {
					t.Fatalf("DEL: %v", err)
				}
				if podLinkExists(t, p) {
					t.Errorf("pod still has %s after DEL", p.IfName)
				}
				if err := c.Del(ctx, p); err != nil {
					t.Errorf("second DEL: %v", err)
				}
			})
		}
	}
}

// hostPeerOf independently finds the host veth paired with the pod's
// interface, to compare with what bulkhead-cni told the agent.
func hostPeerOf(t *testing.T, p *cnichain.Pod) netlink.Link {
	t.Helper()
	var peerIndex int
	err := p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		peerIndex = l.Attrs().ParentIndex
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByIndex(peerIndex)
	if err != nil {
		t.Fatalf("host peer %d: %v", peerIndex, err)
	}
	return l
}

func TestChainWithBulkhead(t *testing.T) {
	privileged.Require(t)
	for _, primary := range primaries() {
		for _, ver := range cnichain.SpecVersions() {
			t.Run(primary+"/"+ver, func(t *testing.T) {
				ctx := context.Background()
				sock := cnichain.SocketPath(t)
				agent := cnichain.StartFakeAgent(t, sock)
				c := cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: ver,
					Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 2}})
				p := c.NewPod(t)
				res, err := c.Add(ctx, p)
				if err != nil {
					t.Fatalf("ADD: %v", err)
				}
				cur := checkResult(t, c, p, ver, res)

				key := api.EndpointKey{ContainerID: p.ContainerID, IfName: p.IfName}
				ep, ok := agent.Endpoints()[key]
				if !ok {
					t.Fatalf("agent has no endpoint for %v", key)
				}
				host := hostPeerOf(t, p)
				if ep.HostIfIndex != host.Attrs().Index || ep.HostVeth != host.Attrs().Name {
					t.Errorf("agent got host veth %s/%d, want %s/%d", ep.HostVeth, ep.HostIfIndex, host.Attrs().Name, host.Attrs().Index)
				}
				if primary == "bridge" && host.Attrs().MasterIndex == 0 {
					t.Errorf("bridge chain: host veth %s is not enslaved", host.Attrs().Name)
				}
				if ep.Pod != (api.PodRef{Namespace: p.Namespace, Name: p.Name, UID: p.UID}) || ep.Netns != p.NS.Path() || ep.Network != c.Name {
					t.Errorf("endpoint identity = %+v", ep)
				}
				if len(ep.IPs) != len(cur.IPs) || ep.IPs[0].Addr().String() != cur.IPs[0].Address.IP.String() {
					t.Errorf("endpoint IPs %v, result IPs %v", ep.IPs, cur.IPs)
				}

				if hasCheck(ver) {
					if err := c.Check(ctx, p); err != nil {
						t.Errorf("CHECK: %v", err)
					}
					agent.Detach(key)
					if err := c.Check(ctx, p); err == nil || !strings.Contains(err.Error(), "not attached") {
						t.Errorf("CHECK with detached programs: %v", err)
					}
				}
				if err := c.Del(ctx, p); err != nil {
					t.Fatalf("DEL: %v", err)
				}
				if _, ok := agent.Endpoints()[key]; ok {
					t.Errorf("agent still has %v after DEL", key)
				}
			})
		}
	}
}

func TestChainDualStack(t *testing.T) {
	privileged.Require(t)
	for _, primary := range primaries() {
		t.Run(primary, func(t *testing.T) {
			ctx := context.Background()
			sock := cnichain.SocketPath(t)
			agent := cnichain.StartFakeAgent(t, sock)
			c := cnichain.New(t, cnichain.Config{Primary: primary, CNIVersion: "1.0.0", IPv6: true,
				Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 2}})
			p := c.NewPod(t)
			res, err := c.Add(ctx, p)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			checkResult(t, c, p, "1.0.0", res)
			ep := agent.Endpoints()[api.EndpointKey{ContainerID: p.ContainerID, IfName: p.IfName}]
			var v4, v6 bool
			for _, ip := range ep.IPs {
				v4 = v4 || (ip.Addr().Is4() && c.Subnet4.Contains(ip.Addr()))
				v6 = v6 || (ip.Addr().Is6() && c.Subnet6.Contains(ip.Addr()))
			}
			if !v4 || !v6 {
				t.Errorf("endpoint IPs %v, want one from %v and one from %v", ep.IPs, c.Subnet4, c.Subnet6)
			}
			if err := c.Check(ctx, p); err != nil {
				t.Errorf("CHECK: %v", err)
			}
		})
	}
}

// TestChainConcurrentAdds starts pods the way kubelet does, many at once.
func TestChainConcurrentAdds(t *testing.T) {
	privileged.Require(t)
	const n = 20
	ctx := context.Background()
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	c := cnichain.New(t, cnichain.Config{Primary: "bridge", CNIVersion: "1.1.0",
		Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 5}})
	pods := make([]*cnichain.Pod, n)
	for i := range pods {
		pods[i] = c.NewPod(t)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Go(func() { _, errs[i] = c.Add(ctx, p) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent ADD: %v", err)
	}
	eps := agent.Endpoints()
	veths := map[int]bool{}
	for _, p := range pods {
		ep, ok := eps[api.EndpointKey{ContainerID: p.ContainerID, IfName: p.IfName}]
		if !ok {
			t.Errorf("no endpoint for %s", p.ContainerID)
			continue
		}
		if want := hostPeerOf(t, p).Attrs().Index; ep.HostIfIndex != want {
			t.Errorf("%s: agent got host veth %d, want %d", p.ContainerID, ep.HostIfIndex, want)
		}
		veths[ep.HostIfIndex] = true
	}
	if len(veths) != n {
		t.Errorf("%d distinct host veths for %d pods", len(veths), n)
	}
	for i, p := range pods {
		wg.Go(func() { errs[i] = c.Del(ctx, p) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent DEL: %v", err)
	}
	if left := agent.Endpoints(); len(left) != 0 {
		t.Errorf("agent still has %d endpoints after DEL", len(left))
	}
}

// TestChainDelIsIdempotent covers the DELs a runtime sends after things
// are already gone: the netns, the endpoint, or the agent itself.
func TestChainDelIsIdempotent(t *testing.T) {
	privileged.Require(t)
	ctx := context.Background()
	sock := cnichain.SocketPath(t)
	agent := cnichain.StartFakeAgent(t, sock)
	c := cnichain.New(t, cnichain.Config{Primary: "ptp", CNIVersion: "1.0.0",
		Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 2}})

	gone := c.NewPod(t)
	if _, err := c.Add(ctx, gone); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := c.RemoveNetns(gone); err != nil {
		t.Fatal(err)
	}
	if err := c.Del(ctx, gone); err != nil {
		t.Errorf("DEL after the netns is gone: %v", err)
	}
	if len(agent.Endpoints()) != 0 {
		t.Errorf("agent kept the endpoint of a deleted pod")
	}
	if err := c.Del(ctx, gone); err != nil {
		t.Errorf("DEL of an unknown endpoint: %v", err)
	}

	down := c.NewPod(t)
	if _, err := c.Add(ctx, down); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	agent.Stop()
	if err := c.Del(ctx, down); err != nil {
		t.Errorf("DEL with the agent down: %v", err)
	}
	if podLinkExists(t, down) {
		t.Errorf("ptp did not run its DEL: %s still exists", down.IfName)
	}
}

func TestChainAgentStartup(t *testing.T) {
	privileged.Require(t)
	ctx := context.Background()

	t.Run("agent comes up within the window", func(t *testing.T) {
		sock := cnichain.SocketPath(t)
		c := cnichain.New(t, cnichain.Config{Primary: "ptp", CNIVersion: "1.1.0",
			Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 20}})
		p := c.NewPod(t)
		const delay = 700 * time.Millisecond
		up := make(chan *cnichain.FakeAgent, 1)
		time.AfterFunc(delay, func() { up <- cnichain.StartFakeAgent(t, sock) })
		start := time.Now()
		if _, err := c.Add(ctx, p); err != nil {
			t.Fatalf("ADD before the agent starts: %v", err)
		}
		if time.Since(start) < delay {
			t.Errorf("ADD returned before the agent started")
		}
		agent := <-up
		if len(agent.Endpoints()) != 1 {
			t.Errorf("agent has %d endpoints, want 1", len(agent.Endpoints()))
		}
	})

	t.Run("agent never comes up", func(t *testing.T) {
		sock := cnichain.SocketPath(t)
		c := cnichain.New(t, cnichain.Config{Primary: "ptp", CNIVersion: "1.0.0",
			Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 0.5}})
		p := c.NewPod(t)
		_, err := c.Add(ctx, p)
		var ce *types.Error
		if !errors.As(err, &ce) || ce.Code != types.ErrTryAgainLater {
			t.Fatalf("ADD without agent: %v (%T), want CNI error %d", err, err, types.ErrTryAgainLater)
		}
		for _, s := range []string{"not reachable", sock, "start bulkhead-agent"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not mention %q", err, s)
			}
		}
		// The runtime cleans up a failed ADD with DEL; it must succeed
		// with the agent down.
		if err := c.Del(ctx, p); err != nil {
			t.Errorf("DEL with agent down: %v", err)
		}
	})
}

func TestChainStatusAndGC(t *testing.T) {
	privileged.Require(t)
	ctx := context.Background()
	sock := cnichain.SocketPath(t)
	c := cnichain.New(t, cnichain.Config{Primary: "bridge", CNIVersion: "1.1.0",
		Bulkhead: &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 2}})

	if err := c.Status(ctx); err == nil {
		t.Errorf("STATUS without agent succeeded")
	}
	agent := cnichain.StartFakeAgent(t, sock)
	if err := c.Status(ctx); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	agent.SetReady(false)
	if err := c.Status(ctx); err == nil || !strings.Contains(err.Error(), "not ready") {
		t.Errorf("STATUS with agent not ready: %v", err)
	}
	agent.SetReady(true)

	keep, drop := c.NewPod(t), c.NewPod(t)
	for _, p := range []*cnichain.Pod{keep, drop} {
		if _, err := c.Add(ctx, p); err != nil {
			t.Fatalf("ADD: %v", err)
		}
	}
	// An endpoint the runtime never cached (say, left over from before a
	// node reboot) is only removed by the plugin's GC, not by libcni's DEL.
	stray := api.EndpointAddRequest{EndpointKey: api.EndpointKey{ContainerID: "stray", IfName: "eth0"}, Network: c.Name,
		Netns: "/var/run/netns/none", HostVeth: "none", HostIfIndex: 1}
	client := api.NewClient(api.ClientConfig{Socket: sock})
	defer client.Close()
	if _, err := client.AddEndpoint(ctx, stray); err != nil {
		t.Fatal(err)
	}
	if err := c.GC(ctx, keep); err != nil {
		t.Fatalf("GC: %v", err)
	}
	eps := agent.Endpoints()
	if _, ok := eps[api.EndpointKey{ContainerID: keep.ContainerID, IfName: "eth0"}]; !ok || len(eps) != 1 {
		t.Errorf("after GC the agent has %v, want only %s", eps, keep.ContainerID)
	}
	if agent.Calls("GCEndpoints") != 1 {
		t.Errorf("plugin GC reached the agent %d times, want 1", agent.Calls("GCEndpoints"))
	}
}
