package twonode

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/netns"
	spiretest "github.com/bulkhead-io/bulkhead/tests/spire"
)

// Enrollment in the mTLS tunnel: a pod is enrolled when it, or its
// namespace, carries MTLSLabel=MTLSEnabled.
const (
	MTLSLabel   = "bulkhead.io/mtls"
	MTLSEnabled = "enabled"
)

// TunnelPort is where every node's tunnel endpoint listens (HBONE).
const TunnelPort = 15008

// Pod is a pod on one node, added through the node's CNI chain.
type Pod struct {
	Namespace, Name, UID string
	Labels               map[string]string
	// ServiceAccount is the pod's spec.serviceAccountName ("" for the
	// default one).
	ServiceAccount string
	// Annotations are written into the pod's store documents (its node's
	// PodsFile and, through SyncPeers, the other node's PeersFile). Set
	// them, then call SyncPeers (and AddPod or Remove rewrite PodsFile).
	Annotations map[string]string
	Node        *Node
	// NS is the pod's network namespace.
	NS ns.NetNS
	// IPv4 is the pod's IPv4 address; IPv6 its IPv6 address on IPv6
	// topologies.
	IPv4, IPv6 netip.Addr
	// SPIREEntry is the ID of the pod's SPIRE registration entry
	// (IdentitySource "spire"), which AddPod created.
	SPIREEntry string

	cni *cnichain.Pod
}

// IPs are the pod's addresses.
func (p *Pod) IPs() []netip.Addr {
	out := []netip.Addr{p.IPv4}
	if p.IPv6.IsValid() {
		out = append(out, p.IPv6)
	}
	return out
}

// AddPod declares the pod in the node's store (PodsFile: labels, service
// account), then runs CNI ADD for it through the node's chain from inside
// the node's namespace, as the node's container runtime would. The agent
// must be running (bulkhead-cni fails closed). When the test ends the pod
// gets a CNI DEL and its namespace is removed.
func (n *Node) AddPod(namespace, name string, labels map[string]string, serviceAccount string) *Pod {
	n.t.Helper()
	cp := n.Chain.NewPod(n.t)
	cp.Namespace, cp.Name = namespace, name
	p := &Pod{Namespace: namespace, Name: name, UID: cp.UID, Labels: maps.Clone(labels),
		ServiceAccount: serviceAccount, Node: n, NS: cp.NS, cni: cp}
	// Registered after cnichain's own cleanup, so it runs first: the DEL
	// runs in the node's namespace, and cnichain's then finds it done.
	n.t.Cleanup(func() {
		if err := p.remove(); err != nil {
			n.t.Errorf("%s: remove pod %s/%s: %v", n.Name, namespace, name, err)
		}
	})
	if n.topo != nil && n.topo.SPIRE != nil {
		// Created before the ADD, as for a pod of a registered workload:
		// the SPIRE agent picks it up on its next sync.
		p.SPIREEntry = n.topo.SPIRE.CreateEntry(n.t, spiretest.Entry{
			ParentID:  n.topo.SPIREAgents[n.index()].ID(),
			SPIFFEID:  p.SPIFFEID(),
			Selectors: []string{"k8s:ns:" + namespace, "k8s:pod-name:" + name},
		})
	}
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	n.writePods()

	var res types.Result
	err := n.NS.Do(func(ns.NetNS) error {
		var err error
		res, err = n.Chain.Add(context.Background(), cp)
		return err
	})
	if err != nil {
		n.t.Fatalf("%s: CNI ADD %s/%s: %v\nagent log:\n%s", n.Name, namespace, name, err, n.AgentLog())
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		n.t.Fatalf("%s: CNI ADD %s/%s: result: %v", n.Name, namespace, name, err)
	}
	for _, ipc := range r.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		switch a = a.Unmap(); {
		case !ok:
		case a.Is4() && !p.IPv4.IsValid():
			p.IPv4 = a
		case a.Is6() && !p.IPv6.IsValid():
			p.IPv6 = a
		}
	}
	if !p.IPv4.IsValid() || (n.ipv6 && !p.IPv6.IsValid()) {
		n.t.Fatalf("%s: CNI ADD %s/%s: addresses missing in result %v", n.Name, namespace, name, r)
	}
	return p
}

// index is 0 for node A, 1 for node B.
func (n *Node) index() int {
	if n.topo != nil && n == n.topo.Nodes[1] {
		return 1
	}
	return 0
}

// SPIFFEID is the ID the pod's SVID carries in IdentitySource topologies:
// spiffe://<trust domain>/ns/<namespace>/sa/<service account> (the
// agent's derived ID; SPIRE entries of AddPod use it too).
func (p *Pod) SPIFFEID() spiffeid.ID {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	if p.Node.topo != nil {
		td = p.Node.topo.TrustDomain
	}
	sa := p.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return spiffeid.RequireFromSegments(td, "ns", p.Namespace, "sa", sa)
}

// Relabel replaces the pod's labels in its node's store (PodsFile). Call
// SyncPeers afterwards to tell the other node.
func (p *Pod) Relabel(labels map[string]string) {
	p.Node.t.Helper()
	p.Node.mu.Lock()
	p.Labels = maps.Clone(labels)
	p.Node.mu.Unlock()
	p.Node.writePods()
}

// SetServiceAccount changes the pod's service account in its node's store
// (PodsFile), and so its derived SPIFFE ID. Call SyncPeers afterwards to
// tell the other node.
func (p *Pod) SetServiceAccount(sa string) {
	p.Node.t.Helper()
	p.Node.mu.Lock()
	p.ServiceAccount = sa
	p.Node.mu.Unlock()
	p.Node.writePods()
}

// Remove deletes the pod now, as a runtime does: CNI DEL from inside the
// node's namespace, then the namespace goes, and the pod leaves the node's
// PodsFile. Call SyncPeers afterwards to tell the other node.
func (p *Pod) Remove() {
	n := p.Node
	n.t.Helper()
	if err := p.remove(); err != nil {
		n.t.Fatalf("%s: remove pod %s/%s: %v", n.Name, p.Namespace, p.Name, err)
	}
	n.mu.Lock()
	n.pods = slices.DeleteFunc(n.pods, func(q *Pod) bool { return q == p })
	n.mu.Unlock()
	n.writePods()
}

func (p *Pod) remove() error {
	return p.Node.NS.Do(func(ns.NetNS) error {
		return p.Node.Chain.Remove(context.Background(), p.cni)
	})
}

// Serve echoes TCP and UDP on port inside the pod, on each of its address
// families, until the test ends.
func (p *Pod) Serve(port int) {
	p.Node.t.Helper()
	families := []string{"4"}
	if p.IPv6.IsValid() {
		families = append(families, "6")
	}
	netns.ServeEcho(p.Node.t, p.NS, port, families...)
}

// Dial connects from inside the pod ("tcp" or "udp").
func (p *Pod) Dial(network string, to netip.Addr, port int, timeout time.Duration) (net.Conn, error) {
	return netns.Dial(p.NS, network, to, port, timeout)
}

// TCPWorks reports whether a TCP connection from p to to:port carries an
// echo (Serve) within a second.
func (p *Pod) TCPWorks(to netip.Addr, port int) bool {
	c, err := p.Dial("tcp", to, port, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

// UDPWorks reports whether a datagram from p to to:port comes back.
func (p *Pod) UDPWorks(to netip.Addr, port int) bool {
	c, err := p.Dial("udp", to, port, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echo(c)
}

func echo(c net.Conn) bool { return netns.Echo(c, time.Second) }

// podDocs renders pods as store YAML (JSON documents, which YAML reads as
// they are), with their addresses when withIPs is set: peers' addresses
// are what a node's ipcache learns them from, while a node learns its own
// pods' addresses from CNI. override replaces the addresses of the pods
// in it. Peers also carry status.hostIP and status.hostIPs, their node's
// transit addresses: where the node's tunnel endpoint listens.
func podDocs(pods []*Pod, withIPs bool, override map[*Pod][]netip.Addr) (string, error) {
	var docs []string
	for _, p := range pods {
		meta := map[string]any{"name": p.Name, "namespace": p.Namespace, "uid": p.UID}
		if len(p.Labels) > 0 {
			meta["labels"] = p.Labels
		}
		if len(p.Annotations) > 0 {
			meta["annotations"] = p.Annotations
		}
		spec := map[string]any{"nodeName": p.Node.Name}
		if p.ServiceAccount != "" {
			spec["serviceAccountName"] = p.ServiceAccount
		}
		doc := map[string]any{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
		if withIPs {
			addrs := p.IPs()
			if o, ok := override[p]; ok {
				addrs = o
			}
			status := map[string]any{}
			if len(addrs) > 0 {
				var ips []map[string]string
				for _, a := range addrs {
					ips = append(ips, map[string]string{"ip": a.String()})
				}
				status["podIP"], status["podIPs"] = addrs[0].String(), ips
			}
			hosts := []map[string]string{{"ip": p.Node.TransitIP4.String()}}
			if p.Node.TransitIP6.IsValid() {
				hosts = append(hosts, map[string]string{"ip": p.Node.TransitIP6.String()})
			}
			status["hostIP"], status["hostIPs"] = p.Node.TransitIP4.String(), hosts
			doc["status"] = status
		}
		b, err := json.Marshal(doc)
		if err != nil {
			return "", fmt.Errorf("pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		docs = append(docs, string(b))
	}
	return "# written by tests/twonode\n" + strings.Join(docs, "\n---\n") + "\n", nil
}
