package store

// Applied is what an agent enforces of a Result that a source handed over:
// the agent reports it back to a source that wants it (the Kubernetes store
// writes each BulkheadPolicy's per-node status from it). It says only what
// the Result does not: the source built the Result, and knows which of its
// objects it rejected itself (Result.Rejected).
type Applied struct {
	// Revision is the policy revision (policy.MapState.Revision) that the
	// datapath enforces.
	Revision uint64
	// Rejected are policies of the Result that the agent's compiler
	// refused or holds back on this node.
	Rejected map[PolicyRef]Rejection
}

// PolicyRef names a policy: Kind is policy.KindNetworkPolicy or
// policy.KindBulkheadPolicy.
type PolicyRef struct {
	Kind, Namespace, Name string
}

// Rejection is why the agent does not enforce a policy as it is.
type Rejection struct {
	// Reason is one word, as a Kubernetes condition's reason
	// (ReasonInvalid, ReasonOverBudget).
	Reason string
	// Message says it in words.
	Message string
	// KeptPrevious says that the previous version of the policy stays
	// enforced; otherwise its rules are not enforced at all.
	KeptPrevious bool
}

// Reasons of a Rejection.
const (
	ReasonInvalid    = "Invalid"
	ReasonOverBudget = "OverBudget"
)
