// Package identity owns Bulkhead's identity model: the security-relevant label
// sets of workloads, their node-local numeric IDs, their SPIFFE IDs, and the
// reserved identities (host, world, CIDR).
package identity
