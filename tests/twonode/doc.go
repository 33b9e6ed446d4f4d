// Package twonode is a test helper: two "nodes" on one machine, each a
// network namespace with its own real bulkhead-agent, its own store folder
// and its own pod CIDR, joined by a veth pair and routed to each other.
// Pods are added through the real CNI chain (ptp or bridge, host-local and
// bulkhead-cni, run by libcni) from inside their node's namespace, so the
// datapath sees cross-node traffic as it would between two hosts: a remote
// pod arrives from the transit link with its own source address, and only
// the store (status.podIPs, written by SyncPeers) tells the receiving node
// who it is.
//
// Everything runs in namespaces: the host's own interfaces and routes are
// never touched. Agents are started from a locked OS thread that entered
// the node's namespace (not `ip netns exec`, which remounts /sys and hides
// bpffs). Everything it creates (pods, agents, pins, namespaces, the
// transit link, folders) is removed in t.Cleanup, also when the test
// fails; then the agents' logs and flow logs are printed. Only tests
// import it.
package twonode
