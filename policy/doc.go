// Package policy owns Bulkhead's policy layer: the policy API types
// (Kubernetes NetworkPolicy and our BulkheadPolicy CRD in api/v1alpha1), the
// compiler that turns workloads and policies into a MapState, and (in
// explain) the engine that answers from the same MapState. It never imports
// cilium/ebpf.
//
// Semantics the compiler settles, beyond NetworkPolicy's own:
//   - Deny (BulkheadPolicy) beats any Allow from any policy, as Lookup does.
//   - A BulkheadPolicy makes its pods default-deny in a direction only when
//     it has an Allow rule there; deny-only policies just subtract.
//   - Audit-mode rules: an audit Deny passes as AUDIT; an audit Allow only
//     counts where no enforcing policy selects the pod in that direction
//     (it must not open what an enforced policy closes).
//   - The datapath resolves one identity per address, so a numeric identity
//     is a label set refined by what policy can tell apart below labels: the
//     ipBlock prefixes its pods' IPs fall in, and its named ports (see
//     ident). Pods of one workload still share one ID.
//   - An Allow rule with `mtls: Required` matches only TCP that the mTLS
//     tunnel delivers (or, on egress, may still carry); plaintext TCP that
//     only such a rule would allow is denied with AuthRequired (see
//     MapState.LookupFlow). Its peers must be workloads, never cidr, and
//     its ports must include TCP. A pod is enrolled by the label
//     bulkhead.io/mtls=enabled on it or its namespace (MapState.Enrolled).
package policy
