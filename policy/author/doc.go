// Package author helps people write policy with the engine that enforces
// it: the semantic diff of two store states (`bulkhead policy diff`) and
// policies generated from observed flows (`bulkhead policy generate`). Every
// verdict it reports comes from policy.Compile and explain.Verdict, the
// same path as `policy explain` and `policy matrix`; it never reads a policy
// a second way.
//
// It imports policy, policy/explain and policy/store only: flow records are
// read from their documented JSON (DESIGN.md §5), not through agent/flows,
// which this layer must not import.
package author
