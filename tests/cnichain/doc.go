// Package cnichain drives CNI plugin chains through libcni, the library
// container runtimes use, so tests exercise bulkhead-cni exactly as
// containerd and CRI-O would: conflists of ptp or bridge, host-local and
// bulkhead-cni, "pods" that are fresh network namespaces, and CNI_ARGS with
// the Kubernetes pod keys. It also holds FakeAgent, an in-memory agent API
// server for tests below the end-to-end tier.
//
// Only tests import it. Everything it creates (namespaces, bridges,
// host-local state, libcni cache) lives under per-harness names and is
// removed in t.Cleanup. Subnets come from 10.213.0.0/16 and fd00:213::/32.
package cnichain
