// Package install puts bulkhead-cni into a node's CNI configuration as a
// chained plugin, keeps it there while the primary CNI rewrites its own
// file, and takes it out again. It owns the plugin binary's copy in the CNI
// bin folder, the choice of the primary network config (the file the
// container runtime uses: the lexically first *.conflist, *.conf or *.json),
// the conversion of a single-plugin config to a list, and the record of what
// it changed, so that an uninstall gives the primary its file back byte for
// byte.
//
// It imports only the standard library and golang.org/x/sys: it runs as an
// init container or a sidecar of the agent's DaemonSet, and needs neither
// BPF nor Kubernetes.
package install
