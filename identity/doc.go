// Package identity owns Bulkhead's identity model: the security-relevant label
// sets of workloads, their node-local numeric IDs (reference-counted
// allocation), their SPIFFE IDs and the SPIFFE ID globs policies match them
// with, the reserved identities (host, world, CIDR), and the longest-prefix
// resolution of addresses to identities that the ipcache implements.
package identity
