// Package devca owns Bulkhead's embedded development CA: the folder that holds
// its key and trust bundle (created on first use, shared between nodes by
// copying it), the minting of X.509-SVIDs for workloads of its trust domain,
// and the "builtin" identity.SVIDSource that the dir store and `make demo` use
// when no SPIRE is running.
//
// It is not for production. There is no revocation, no CA rotation, no
// attestation of its own (it issues whatever Derived ID the agent asks for),
// and the one long-lived CA key sits on disk on every node that shares the
// folder. Use SPIRE for anything that matters.
//
// SVID keys live in memory only: nothing in this package writes them to disk
// or logs them.
package devca
