// Package cni is the bulkhead-cni plugin: a chained CNI plugin that hands
// each pod's endpoint to bulkhead-agent and succeeds only once the agent
// enforces policy on it. It owns the plugin's config parsing, the discovery
// of the pod's host-side veth, and the CNI command handlers that
// cmd/bulkhead-cni wires into skel.
//
// It talks to the agent only through agent/api, and imports no BPF or
// Kubernetes code, so the binary starts fast and stays small.
package cni
