package agent

import (
	"errors"
	"fmt"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// reportingSource records what the agent reports back.
type reportingSource struct {
	DirSource
	got []reported
}

type reported struct {
	res     *store.Result
	applied store.Applied
}

func (s *reportingSource) ReportApplied(res *store.Result, a store.Applied) {
	s.got = append(s.got, reported{res, a})
}

// TestReportStore checks what the source hears after applies: nothing
// while an apply fails, the state folded last once one succeeds (even a
// later apply that has no store change in it), and the compiler's
// rejections by policy.
func TestReportStore(t *testing.T) {
	src := &reportingSource{}
	a := &Agent{source: src, compiler: policy.NewCompiler(policy.Config{})}
	s1, s2 := &store.Result{}, &store.Result{}

	a.reportStore([]*change{{store: s1}}, []error{nil}, 1, nil)
	a.reportStore([]*change{{store: s2}}, []error{nil}, 2, errors.New("map full"))
	if len(src.got) != 1 || src.got[0].res != s1 || src.got[0].applied.Revision != 1 {
		t.Fatalf("reports %+v, want s1 at revision 1 only: a failed apply reports nothing", src.got)
	}
	// The retry (a refresh, no store change) enforces s2 at last.
	a.reportStore([]*change{{refresh: true}}, []error{nil}, 3, nil)
	if len(src.got) != 2 || src.got[1].res != s2 || src.got[1].applied.Revision != 3 {
		t.Fatalf("after the retry: %+v, want s2 at revision 3", src.got[1:])
	}

	// A policy the compiler refused while folding keeps its previous
	// version; the error names it.
	bp := &v1alpha1.BulkheadPolicy{}
	bp.Namespace, bp.Name = "shop", "broken"
	verr := policy.ValidateBulkheadPolicy(bp)
	if verr == nil {
		t.Fatal("an empty BulkheadPolicy is valid")
	}
	a.reportStore([]*change{{store: s2}}, []error{errors.Join(fmt.Errorf("fold: %w", verr), errors.New("pod x: other"))}, 4, nil)
	got := src.got[len(src.got)-1].applied.Rejected
	r, ok := got[store.PolicyRef{Kind: policy.KindBulkheadPolicy, Namespace: "shop", Name: "broken"}]
	if len(got) != 1 || !ok || r.Reason != store.ReasonInvalid || !r.KeptPrevious || r.Message != verr.Error() {
		t.Errorf("rejected %+v, want shop/broken Invalid with the compiler's message", got)
	}

	// Budget rejections come from the compiler's status.
	rj := rejections(nil, []policy.PolicyStatus{{Kind: policy.KindBulkheadPolicy, Namespace: "shop", Name: "big", Message: "too big", Kept: true}})
	if r := rj[store.PolicyRef{Kind: policy.KindBulkheadPolicy, Namespace: "shop", Name: "big"}]; r.Reason != store.ReasonOverBudget || r.Message != "too big" || !r.KeptPrevious {
		t.Errorf("budget rejection %+v", r)
	}

	// A source that does not take reports (the dir store) is left alone.
	d := &Agent{source: &DirSource{}, compiler: policy.NewCompiler(policy.Config{})}
	d.reportStore([]*change{{store: s1}}, []error{nil}, 1, nil)
	if d.report.res != nil {
		t.Error("the dir store's state was kept for a report")
	}
}
