package policy

import (
	"fmt"
	"slices"
)

// Validate checks the invariants the datapath relies on: entries in
// canonical order without duplicates, Proto 0 only with the full port range,
// PortLo <= PortHi, known actions, and every RuleID in the rule table. The
// compiler's output always passes; the datapath may check what it is given.
func (m *MapState) Validate() error {
	for ep, p := range m.Endpoints {
		if ep == 0 {
			return fmt.Errorf("endpoint 0 is not valid")
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
			if _, ok := m.Rules[e.Rule]; !ok && e.Rule != RuleDefault {
				return fmt.Errorf("endpoint %d: entry %+v: rule %d is not in the rule table", ep, e, e.Rule)
			}
		}
	}
	return nil
}
