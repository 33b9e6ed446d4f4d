// Package k8s is the agent's Kubernetes store (--store kubernetes): shared
// informers on Namespaces, Pods, NetworkPolicies and BulkheadPolicies, whose
// caches become the same store.Result that the dir store builds from files
// (policy/store builds and validates both). It hands over a state only
// once every informer has synced, coalesces bursts of events into one
// state, keeps the last state while the apiserver is away, and reports
// whether it is connected.
package k8s
