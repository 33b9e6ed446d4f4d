package agent

import (
	"context"
	"errors"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// rollbackAdd undoes a failed ADD completely and only it: the registration
// goes back to what it was before (the earlier ADD of the same key, or
// nothing), the programs are detached only from a veth the earlier
// registration does not use, and the record is restored or deleted. The
// caller holds the key's lock, so no other ADD or DEL of the key runs
// meanwhile, and an ADD that answered "enforced" before this one started is
// what the rollback restores.
func (a *Agent) rollbackAdd(ctx context.Context, rec, prior *endpointRecord) error {
	c := &change{del: &rec.Key, delIf: func(cur *endpointRecord) bool { return cur == rec }, restore: prior}
	if err := a.submit(ctx, c); err != nil {
		return err
	}
	var errs []error
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
	if sameVeth {
		// The failed ADD may have rewritten the veth's endpoint entry;
		// re-attaching the earlier registration is idempotent.
		if _, err := a.dp.Attach(prior.dpEndpoint()); err != nil {
			errs = append(errs, err)
		}
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

// removeIf removes k's endpoint when cond holds for the registered one, and
// retires its ID for the grace period.
func (a *Agent) removeIf(ctx context.Context, k api.EndpointKey, cond func(*endpointRecord) bool) error {
	c := &change{del: &k, delIf: cond}
	if err := a.submit(ctx, c); err != nil {
		return err
	}
	rec := c.removed
	if rec == nil {
		return errUnknownEndpoint
	}
	a.mu.Lock()
	a.retireIDLocked(rec.ID)
	a.mu.Unlock()
	return errors.Join(a.dp.Forget(rec.dpEndpoint()), a.records.Delete(recordKey(rec.Key)))
}
