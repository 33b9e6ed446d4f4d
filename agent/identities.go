package agent

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/state"
	"github.com/bulkhead-io/bulkhead/policy"
)

// DefaultIdentityGrace is how long an identity number that nothing uses any
// more stays reserved for its label set.
const DefaultIdentityGrace = 15 * time.Minute

// allocationKey names the one record of the identities folder.
const allocationKey = "allocation"

// numbering persists the compiler's identity numbers and rule IDs
// (policy.Allocation) under --state-dir, so that a restarted agent compiles
// an unchanged store to the very entries the pinned maps hold: its first
// apply writes nothing, and no packet is judged by a mix of two numberings.
//
// The allocation is saved before every apply that uses a number it did not
// save yet (write-ahead): the pinned maps never carry a number that a crash
// could make the next agent hand to another label set.
type numbering struct {
	dir   *state.Dir[policy.Allocation]
	grace time.Duration
	// saved is the compiler's AllocationVersion last written.
	saved uint64
}

// openNumbering loads the saved allocation into c. A record that cannot be
// read is quarantined, not deleted, and the numbering starts afresh
// (reported in the returned warning).
func openNumbering(stateDir string, grace time.Duration, c *policy.Compiler) (*numbering, string, error) {
	dir, err := state.Open[policy.Allocation](filepath.Join(stateDir, "identities"))
	if err != nil {
		return nil, "", err
	}
	n := &numbering{dir: dir, grace: grace}
	alloc, err := dir.Get(allocationKey)
	switch {
	case errors.Is(err, state.ErrNotFound):
		return n, "", nil
	case err == nil:
		err = c.RestoreAllocation(alloc)
		if err == nil {
			n.saved = c.AllocationVersion()
			return n, "", nil
		}
	}
	moved, qerr := dir.Quarantine(allocationKey)
	if qerr != nil {
		return nil, "", fmt.Errorf("quarantine unreadable identity numbering: %w (after %w)", qerr, err)
	}
	return n, fmt.Sprintf("identity numbering unreadable (%v), kept as %s; identities are numbered afresh", err, moved), nil
}

// save expires numbers unused for longer than the grace period and writes
// the allocation if it changed. It runs on the batch goroutine before Apply.
func (n *numbering) save(c *policy.Compiler, now time.Time) error {
	c.ExpireIdentities(now.Add(-n.grace))
	v := c.AllocationVersion()
	if v == n.saved {
		return nil
	}
	if err := n.dir.Put(allocationKey, c.Allocation()); err != nil {
		return fmt.Errorf("save identity numbering: %w", err)
	}
	n.saved = v
	return nil
}
