// Package e2e holds end-to-end tests: the built binaries (bulkhead-agent,
// bulkhead-cni), the reference CNI plugins driven through libcni, real
// network namespaces and real traffic, as a user runs them.
package e2e
