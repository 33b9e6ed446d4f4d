package policy

import (
	"fmt"
	"slices"
)

// Validate checks the invariants the datapath relies on: entries in
// canonical order without duplicates, Proto 0 only with the full port range,
// PortLo <= PortHi, known actions, every RuleID in the rule table, only
// allow entries with FlagMTLSRequired, Enrolled holding only true values of
// workload identities, and each endpoint's Enrolled agreeing with it. The
// compiler's output always passes; the datapath may check what it is given.
func (m *MapState) Validate() error {
	for id, on := range m.Enrolled {
		if !on {
			return fmt.Errorf("enrolled: identity %d is stored as false", id)
		}
		if id.IsReserved() {
			return fmt.Errorf("enrolled: identity %d is reserved, not a workload", id)
		}
	}
	for ep, p := range m.Endpoints {
		if ep == 0 {
			return fmt.Errorf("endpoint 0 is not valid")
		}
		if p.Enrolled != m.Enrolled[p.Identity] {
			return fmt.Errorf("endpoint %d: enrolled is %v, but identity %d is enrolled=%v", ep, p.Enrolled, p.Identity, m.Enrolled[p.Identity])
		}
		if !slices.IsSortedFunc(p.Entries, CompareEntries) {
			return fmt.Errorf("endpoint %d: entries are not in canonical order", ep)
		}
		for i, e := range p.Entries {
			if i > 0 && e == p.Entries[i-1] {
				return fmt.Errorf("endpoint %d: duplicate entry %+v", ep, e)
			}
			if e.PortLo > e.PortHi {
				return fmt.Errorf("endpoint %d: entry %+v: port range is empty", ep, e)
			}
			if e.Proto == 0 && (e.PortLo != 0 || e.PortHi != 65535) {
				return fmt.Errorf("endpoint %d: entry %+v: any protocol needs the full port range", ep, e)
			}
			if e.Action != ActionAllow && e.Action != ActionDeny {
				return fmt.Errorf("endpoint %d: entry %+v: unknown action", ep, e)
			}
			if e.Flags&FlagMTLSRequired != 0 && e.Action != ActionAllow {
				return fmt.Errorf("endpoint %d: entry %+v: only an allow can require mTLS", ep, e)
			}
			if _, ok := m.Rules[e.Rule]; !ok && e.Rule != RuleDefault {
				return fmt.Errorf("endpoint %d: entry %+v: rule %d is not in the rule table", ep, e, e.Rule)
			}
		}
	}
	return nil
}
