// Package demo is `bulkhead demo`: a tiny container runtime for one machine
// that shows Bulkhead working end to end. It creates pod network namespaces,
// adds them through the real CNI chain (ptp + host-local + bulkhead-cni) with
// libcni, runs the real bulkhead-agent binary on a private store, socket and
// bpffs directory, probes every pod pair with real TCP and UDP traffic, and
// checks what it observed against both a hand-written expectation and the
// offline policy engine. It is neither the agent nor the plugin: it only
// drives them the way a runtime and a user would, and it removes everything
// it created when it ends.
package demo
