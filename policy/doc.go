// Package policy owns Bulkhead's policy layer: the policy API types
// (Kubernetes NetworkPolicy and our BulkheadPolicy CRD), the compiler that
// turns workloads and policies into a MapState, and the explain engine that
// answers from the same MapState. It never imports cilium/ebpf.
package policy
