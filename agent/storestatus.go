package agent

import (
	"errors"

	"github.com/bulkhead-io/bulkhead/agent/k8s"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// appliedReporter is a Source that wants to know what the agent enforces of
// the states it hands over: the Kubernetes store writes this node's entry
// of each BulkheadPolicy's status from it. ReportApplied is called on the
// batch goroutine after every successful apply, with the store state
// folded last; it must not block.
type appliedReporter interface {
	ReportApplied(res *store.Result, applied store.Applied)
}

// The Kubernetes store takes reports: a change of either signature must
// not silently turn the policy status off.
var _ appliedReporter = (*k8s.Source)(nil)

// storeReport is the store state folded last and what folding it refused:
// an apply that fails leaves it unreported until a later apply (a retry,
// or any other change) enforces it.
type storeReport struct {
	res     *store.Result
	foldErr error
}

// reportStore tells the source what the datapath now enforces, once an
// apply succeeded (applyErr nil). Budget rejections follow the local
// endpoints, so every successful apply reports, store change or not; the
// source writes only what changed.
func (a *Agent) reportStore(changes []*change, errs []error, revision uint64, applyErr error) {
	r, ok := a.source.(appliedReporter)
	if !ok {
		return
	}
	for i, c := range changes {
		if c.store != nil {
			a.report = storeReport{res: c.store, foldErr: errs[i]}
		}
	}
	if applyErr != nil || a.report.res == nil {
		return
	}
	r.ReportApplied(a.report.res, store.Applied{Revision: revision,
		Rejected: rejections(a.report.foldErr, a.compiler.BudgetStatus())})
}

// rejections are the policies that folding refused (the compiler keeps
// their previous version) and those over their trie budget on this node.
func rejections(foldErr error, budget []policy.PolicyStatus) map[store.PolicyRef]store.Rejection {
	out := map[store.PolicyRef]store.Rejection{}
	var walk func(error)
	walk = func(err error) {
		if err == nil {
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		var ve *policy.ValidationError
		if errors.As(err, &ve) {
			out[store.PolicyRef{Kind: ve.Kind, Namespace: ve.Namespace, Name: ve.Name}] = store.Rejection{
				Reason: store.ReasonInvalid, Message: ve.Error(), KeptPrevious: true}
		}
	}
	walk(foldErr)
	for _, s := range budget {
		out[store.PolicyRef{Kind: s.Kind, Namespace: s.Namespace, Name: s.Name}] = store.Rejection{
			Reason: store.ReasonOverBudget, Message: s.Message, KeptPrevious: s.Kept}
	}
	return out
}
