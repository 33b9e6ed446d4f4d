package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// bridgedPod is a pod made by podVeth and the address it gets on its
// bridge's /24.
type bridgedPod struct {
	req api.EndpointAddRequest
	ip  string
}

// bridgePods makes the pods' host veths ports of one new bridge in the
// agent's namespace (pod to pod is switched, through both pods' programs),
// gives each pod its address on eth0, and static neighbours for the others,
// so that the first packets leave at once, without ARP. inPod runs f in a
// pod's netns (the path of its request's Netns).
func bridgePods(t *testing.T, pods []bridgedPod) (inPod func(path string, f func() error)) {
	t.Helper()
	br := fmt.Sprintf("bhbr%d", time.Now().UnixNano()%1e9)
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: br}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(br); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	brLink, err := netlink.LinkByName(br)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		l, err := netlink.LinkByName(p.req.HostVeth)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetMaster(l, brLink); err != nil {
			t.Fatal(err)
		}
	}
	if err := netlink.LinkSetUp(brLink); err != nil {
		t.Fatal(err)
	}
	inPod = func(path string, f func() error) {
		t.Helper()
		if err := ns.WithNetNSPath(path, func(ns.NetNS) error { return f() }); err != nil {
			t.Fatalf("in %s: %v", path, err)
		}
	}
	macs := map[string]net.HardwareAddr{}
	for _, p := range pods {
		inPod(p.req.Netns, func() error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			addr, err := netlink.ParseAddr(p.ip + "/24")
			if err != nil {
				return err
			}
			macs[p.ip] = l.Attrs().HardwareAddr
			return netlink.AddrAdd(l, addr)
		})
	}
	for _, p := range pods {
		inPod(p.req.Netns, func() error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			for _, q := range pods {
				if q.ip == p.ip {
					continue
				}
				if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, State: netlink.NUD_PERMANENT,
					IP: net.ParseIP(q.ip), HardwareAddr: macs[q.ip]}); err != nil {
					return err
				}
			}
			return nil
		})
	}
	return inPod
}

// podPair is pods shop/a and shop/b (labels app=a and app=b) on one bridge,
// both added to a running agent.
type podPair struct {
	a          *Agent
	stop       func()
	reqA, reqB api.EndpointAddRequest
	ipA, ipB   string
	inPod      func(path string, f func() error)
}

// startPodPair starts an agent (tune, when not nil, adjusts its config)
// whose store holds the two pods and objs, then adds them at 10.<net>.0.1
// and .2, with container IDs c0ffee<net>a and b.
func startPodPair(t *testing.T, net int, objs string, tune func(*Config)) *podPair {
	t.Helper()
	a, store := newTestAgentWith(t, tune)
	pods := "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, labels: {app: a}}\n---\n" +
		"apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop, labels: {app: b}}\n---\n"
	if err := os.WriteFile(filepath.Join(store, "objs.yaml"), []byte(pods+objs), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &podPair{a: a, stop: startTestAgent(t, a), ipA: fmt.Sprintf("10.%d.0.1", net), ipB: fmt.Sprintf("10.%d.0.2", net)}
	p.reqA = podVeth(t, fmt.Sprintf("c0ffee%da", net), "a", p.ipA+"/32")
	p.reqB = podVeth(t, fmt.Sprintf("c0ffee%db", net), "b", p.ipB+"/32")
	p.inPod = bridgePods(t, []bridgedPod{{p.reqA, p.ipA}, {p.reqB, p.ipB}})
	for _, req := range []api.EndpointAddRequest{p.reqA, p.reqB} {
		if _, err := a.AddEndpoint(context.Background(), req); err != nil {
			t.Fatalf("ADD %s: %v", req.Pod.Name, err)
		}
	}
	return p
}
