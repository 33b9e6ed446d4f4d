// Package store loads a directory of Kubernetes-style YAML files (*.yaml and
// *.yml; Namespace, Pod, NetworkPolicy, BulkheadPolicy, BulkheadRuntimePolicy;
// DESIGN.md §5) into a
// policy.Snapshot. The CLI and the agent's dir: store both use it, so a file
// means the same thing to both. Errors name the file and line.
package store
