package k8s

import (
	"maps"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"k8s.io/apimachinery/pkg/types"
)

// maxHanded bounds the states kept for a report that may never come (the
// agent holds a state back, or drops it for a newer one).
const maxHanded = 16

// handedOver remembers a state before it is handed over: the agent may
// report it before update returns.
func (s *Source) handedOver(res *store.Result, policies map[types.NamespacedName]policyState) {
	if s.status == nil {
		return
	}
	s.hmu.Lock()
	defer s.hmu.Unlock()
	s.handed = append(s.handed, handedState{res: res, policies: policies})
	if len(s.handed) > maxHanded {
		s.handed = s.handed[len(s.handed)-maxHanded:]
	}
}

// ReportApplied is told by the agent, after each successful apply, which
// state the datapath enforces (res, one this source handed over), at which
// revision, and which of its policies the compiler refused or holds back.
// This node's entry of each BulkheadPolicy's status follows: accepted, or
// not with the reason, and the generation and revision enforced. It does
// not block: the status writer writes what changed, at its own pace.
func (s *Source) ReportApplied(res *store.Result, applied store.Applied) {
	if s.status == nil {
		return
	}
	s.hmu.Lock()
	i := len(s.handed) - 1
	for i >= 0 && s.handed[i].res != res {
		i--
	}
	if i < 0 {
		s.hmu.Unlock()
		return // not a state of this source, or one long replaced
	}
	// Older states will not be enforced any more; this one is reported
	// again after later applies.
	s.handed = s.handed[i:]
	policies := s.handed[0].policies
	if s.reported == res && maps.Equal(s.reportedRejected, applied.Rejected) {
		// Another apply of the same state (a pod came or went): the
		// entries are as they were.
		s.hmu.Unlock()
		return
	}
	s.reported, s.reportedRejected = res, applied.Rejected
	s.hmu.Unlock()

	want := make(map[types.NamespacedName]verdict, len(policies))
	for key, p := range policies {
		v := verdict{uid: p.uid, observed: p.generation, enforced: p.enforced, accepted: true, reason: v1alpha1.ReasonAccepted,
			message: "enforced on this node"}
		if p.invalid != "" {
			v.accepted, v.reason, v.message = false, v1alpha1.ReasonInvalid, p.invalid
		} else if r, ok := applied.Rejected[store.PolicyRef{Kind: policy.KindBulkheadPolicy, Namespace: key.Namespace, Name: key.Name}]; ok {
			v.accepted, v.reason, v.message = false, r.Reason, r.Message
			v.enforced, v.keepEnforced = 0, r.KeptPrevious
		}
		want[key] = v
	}
	s.status.set(want, applied.Revision)
}

// StatusWrites counts this node's BulkheadPolicy status writes (each
// apply request, failed ones too).
func (s *Source) StatusWrites() int64 {
	if s.status == nil {
		return 0
	}
	return s.status.writes.Load()
}
