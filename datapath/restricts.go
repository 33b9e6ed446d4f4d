package datapath

import "github.com/bulkhead-io/bulkhead/policy"

// Restricts reports whether the live policy generation restricts any
// endpoint: a direction at default deny, or a policy entry (an allow under
// default deny, or a Deny rule). An agent that re-opens such a datapath
// without a record of the store state it came from must not take it for an
// open node: a store state without policies would lift every restriction at
// once (agent/storeguard).
func (d *Datapath) Restricts() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	gen := &d.gens[d.liveGen()]
	for _, c := range gen.epConfigs {
		if c.DefIngress == uint8(policy.DefaultDeny) || c.DefEgress == uint8(policy.DefaultDeny) {
			return true
		}
	}
	for _, slot := range gen.slots {
		if len(slot) > 0 {
			return true
		}
	}
	return false
}
