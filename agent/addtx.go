package agent

import (
	"context"
	"errors"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// rollbackAdd undoes a failed ADD completely and only it: the registration
// goes back to what it was before (the earlier ADD of the same key, or
// nothing), and what this ADD did to the datapath and the records is
// undone. attached says whether this ADD called Attach; without it the
// veth's programs are not this ADD's (an endpoint held at default deny, an
// earlier ADD's), and are left alone. The caller holds the key's lock, so
// no other ADD or DEL of the key runs meanwhile, and an ADD that answered
// "enforced" before this one started is what the rollback restores.
//
// The registration is removed even when the apply that follows fails (the
// batch folds it first); the rest of the rollback then still runs: programs
// left attached with no endpoint registered would lose their config at the
// next apply, and an endpoint whose programs run without a config passes
// everything.
func (a *Agent) rollbackAdd(ctx context.Context, rec, prior *endpointRecord, attached bool) error {
	c := &change{del: &rec.Key, delIf: func(cur *endpointRecord) bool { return cur == rec }, restore: prior}
	// Without a cancel, submit returns only once the change is processed
	// (or was never queued), so c.removed is final.
	err := a.submit(context.WithoutCancel(ctx), c)
	if err != nil && c.removed == nil {
		// Not processed (the agent is shutting down): the endpoint stays
		// registered, recorded and attached, a consistent state a
		// restarted agent restores.
		return err
	}
	errs := []error{err}
	if c.removed != nil && prior == nil {
		a.mu.Lock()
		a.retireIDLocked(c.removed.ID)
		a.mu.Unlock()
	}
	if !attached {
		// The record is written alongside the attach: neither happened.
		return errors.Join(errs...)
	}
	sameVeth := prior != nil && prior.HostIfIndex == rec.HostIfIndex && prior.Netns == rec.Netns
	if !sameVeth {
		if err := a.dp.Forget(rec.dpEndpoint()); err != nil {
			errs = append(errs, err)
		}
	}
	if prior == nil {
		if err := a.records.Delete(recordKey(rec.Key)); err != nil {
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	}
	// The failed ADD shares the earlier endpoint's ID: its attach rewrote
	// that ID's source addresses (and, on the same veth, the veth's
	// endpoint entry), and the Forget above cleared them. Re-attaching the
	// earlier registration, which is idempotent, writes them back.
	if _, err := a.dp.Attach(prior.dpEndpoint()); err != nil {
		errs = append(errs, err)
	}
	if err := a.records.Put(recordKey(prior.Key), *prior); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// priorEndpoint returns a copy of the endpoint registered under k, if any.
func (a *Agent) priorEndpoint(k api.EndpointKey) *endpointRecord {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e := a.endpoints[k]; e != nil {
		cp := *e
		return &cp
	}
	return nil
}

// removeIf removes k's endpoint when cond (nil: always) holds for the
// registered one, detaches its programs, deletes its record and retires
// its ID for the grace period. DEL, GC and the reconciliation of vanished
// veths all remove endpoints this way.
//
// The batch unregisters the endpoint before it applies, so a failed apply
// still removed it: the detach and the record's deletion then run all the
// same (programs must never stay attached once the endpoint's config can
// go), and the apply's error is returned with theirs. A retried DEL then
// finds nothing to do.
func (a *Agent) removeIf(ctx context.Context, k api.EndpointKey, cond func(*endpointRecord) bool) (*endpointRecord, error) {
	c := &change{del: &k, delIf: cond}
	// Without a cancel, submit returns only once the change is processed
	// (or was never queued): a change processed after its caller gave up
	// would unregister the endpoint with no one left to detach it.
	err := a.submit(context.WithoutCancel(ctx), c)
	rec := c.removed
	if rec == nil {
		if err != nil {
			return nil, err
		}
		return nil, errUnknownEndpoint
	}
	a.mu.Lock()
	a.retireIDLocked(rec.ID)
	a.tombstoneLocked(rec)
	a.mu.Unlock()
	if rec.Quarantine != nil {
		a.countQuarantines()
	}
	return rec, errors.Join(err, a.dp.Forget(rec.dpEndpoint()), a.records.Delete(recordKey(rec.Key)))
}
