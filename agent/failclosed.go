package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// failClosed is the agent's state for keeping enforcement when its own
// records fall short. Its maps are guarded by Agent.mu.
type failClosed struct {
	// orphans are endpoints the pinned maps configure and whose programs
	// are attached to a veth, but which no readable record names (a
	// corrupt record, a state dir that did not survive while bpffs did).
	// Each is held at default deny, never dropped to identity 0 (which
	// passes everything), until its veth goes away.
	orphans map[policy.EndpointID]*orphan
	// retiredIDs are endpoint IDs whose veth vanished, kept from reuse for
	// the grace period: a packet or conntrack entry in flight for the old
	// pod must not be judged as a new one.
	retiredIDs map[policy.EndpointID]time.Time
	// warnings are lasting problems for status: quarantined records.
	warnings []string
	// conflicts are the contested addresses (ipOwners.conflicts), for status.
	conflicts []string
	// keyLocks serialise ADD and DEL of one attachment: an ADD's rollback
	// then never undoes a later ADD of the same key.
	keyMu    sync.Mutex
	keyLocks map[api.EndpointKey]*keyLock
}

type orphan struct {
	id       policy.EndpointID
	hostVeth string
	ifindex  int
	// policy is what the orphan is held at: its last identity, deny in
	// both directions. One pointer, so the datapath writes it once.
	policy *policy.EndpointPolicy
}

type keyLock struct {
	mu   sync.Mutex
	refs int
}

// lockKey serialises the changes of one attachment.
func (f *failClosed) lockKey(k api.EndpointKey) func() {
	f.keyMu.Lock()
	if f.keyLocks == nil {
		f.keyLocks = map[api.EndpointKey]*keyLock{}
	}
	l := f.keyLocks[k]
	if l == nil {
		l = &keyLock{}
		f.keyLocks[k] = l
	}
	l.refs++
	f.keyMu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		f.keyMu.Lock()
		if l.refs--; l.refs == 0 {
			delete(f.keyLocks, k)
		}
		f.keyMu.Unlock()
	}
}

// quarantineRecords moves unreadable endpoint records aside (never deletes
// them) and reports them.
//
// Records quarantined by an earlier run stay reported until an operator
// removes them.
func (a *Agent) quarantineRecords(bad map[string]error) {
	if earlier, err := a.records.Quarantined(); err == nil {
		for _, f := range earlier {
			a.fc.warnings = append(a.fc.warnings, fmt.Sprintf("endpoint record quarantined earlier: %s (delete it once inspected)", f))
		}
	}
	for k, err := range bad {
		moved, qerr := a.records.Quarantine(k)
		if qerr != nil {
			a.log.Error("unreadable endpoint record could not be quarantined", "record", k, "error", err, "quarantine", qerr)
			a.fc.warnings = append(a.fc.warnings, fmt.Sprintf("endpoint record %s is unreadable (%v) and could not be moved aside: %v", k, err, qerr))
			continue
		}
		a.log.Error("unreadable endpoint record quarantined; its endpoint stays denied until its veth goes", "record", k, "error", err, "file", moved)
		a.fc.warnings = append(a.fc.warnings, fmt.Sprintf("endpoint record %s is unreadable (%v), kept as %s", k, err, moved))
	}
}

// findOrphans looks for endpoints the pinned maps still enforce that no
// record names, and holds each at default deny. Called by New, after the
// records are restored.
func (a *Agent) findOrphans() error {
	known := map[policy.EndpointID]bool{}
	for _, e := range a.endpoints {
		known[e.ID] = true
	}
	configured := map[policy.EndpointID]identity.NumericID{}
	// Every ID the datapath holds: an error is no end of the range. A
	// configured endpoint skipped here would have its config removed by
	// the first apply while its programs stay attached, passing everything.
	for id := policy.EndpointID(1); id <= datapath.MaxEndpointID; id++ {
		ident, err := a.dp.EndpointIdentity(id)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue // unmanaged
		}
		if err != nil {
			return fmt.Errorf("read the config of endpoint %d to find unrecorded endpoints: %w", id, err)
		}
		if !known[id] {
			configured[id] = ident
		}
	}
	if len(configured) == 0 {
		return nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("list links for unrecorded endpoints: %w", err)
	}
	a.fc.orphans = map[policy.EndpointID]*orphan{}
	for _, l := range links {
		if _, ok := l.(*netlink.Veth); !ok {
			continue
		}
		for id, ident := range configured {
			ep := datapath.Endpoint{ID: id, Ifname: l.Attrs().Name, Ifindex: l.Attrs().Index}
			if ok, err := a.dp.Attached(ep); err != nil || !ok {
				continue
			}
			a.fc.orphans[id] = &orphan{id: id, hostVeth: ep.Ifname, ifindex: ep.Ifindex,
				policy: &policy.EndpointPolicy{Identity: ident, Default: [2]policy.DefaultVerdict{policy.DefaultDeny, policy.DefaultDeny}}}
			a.log.Error("endpoint enforced without a record; held at default deny until its veth goes",
				"endpoint", id, "veth", ep.Ifname, "identity", ident)
			delete(configured, id)
			break
		}
	}
	// What is left is configured but attached nowhere: nothing enforces
	// with it, and the first apply unconfigures it.
	return nil
}

// withOrphans returns ms with the orphans' deny policies added; ms itself
// is shared with the compiler and not modified.
func (a *Agent) withOrphans(ms *policy.MapState) *policy.MapState {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.fc.orphans) == 0 {
		return ms
	}
	out := *ms
	out.Endpoints = maps.Clone(ms.Endpoints)
	for id, o := range a.fc.orphans {
		if _, taken := out.Endpoints[id]; !taken {
			out.Endpoints[id] = o.policy
		}
	}
	return &out
}

// prepareApply runs on the batch goroutine between compile and apply: the
// numbering the MapState uses is made durable first, and endpoints without
// a record are kept denied.
func (a *Agent) prepareApply(ms *policy.MapState) (*policy.MapState, error) {
	if err := a.numbers.save(a.compiler, time.Now()); err != nil {
		return nil, err
	}
	return a.withOrphans(ms), nil
}

// idReservedLocked reports an endpoint ID that must not be handed out: an
// orphan's, or one retired less than the grace period ago. a.mu is held.
func (a *Agent) idReservedLocked(id policy.EndpointID) bool {
	if _, ok := a.fc.orphans[id]; ok {
		return true
	}
	if t, ok := a.fc.retiredIDs[id]; ok {
		if time.Since(t) < a.cfg.IdentityGrace {
			return true
		}
		delete(a.fc.retiredIDs, id)
	}
	return false
}

// reconcileVeths removes, while the agent runs, endpoints whose host veth
// disappeared without a DEL (a runtime that crashed, a netns torn down by
// hand), and orphans whose veth went: their policy is removed, their
// programs and pins detached, their records deleted, and their IDs retired
// for the grace period. It runs every interval and on every link deletion.
func (a *Agent) reconcileVeths(ctx context.Context, interval time.Duration) {
	updates := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(updates, ctx.Done(), netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			// Closing the subscription at a stop ends its receive with an
			// error (EAGAIN): that is the stop, not a problem.
			if ctx.Err() == nil {
				a.log.Warn("link updates", "error", err)
			}
		},
	}); err != nil {
		a.log.Warn("cannot watch links; vanished veths are found by polling only", "error", err)
		updates = nil
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				updates = nil
				continue
			}
			if u.Header.Type != unix.RTM_DELLINK {
				continue
			}
		case <-tick.C:
		}
		a.reconcileOnce(ctx)
	}
}

func (a *Agent) reconcileOnce(ctx context.Context) {
	// One link dump, before a.mu is taken: CHECK, status and ADD must not
	// wait behind a dump per endpoint.
	links, err := netlink.LinkList()
	if err != nil {
		a.log.Warn("list links to find vanished veths", "error", err)
		return
	}
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	present := func(ifindex int, name string) bool { return names[ifindex] == name }
	a.mu.Lock()
	var gone []endpointRecord
	// The veths that known, attached endpoints enforce on.
	enforced := map[int]string{}
	for _, e := range a.endpoints {
		if e.Mode == "" {
			continue
		}
		enforced[e.HostIfIndex] = e.HostVeth
		if !present(e.HostIfIndex, e.HostVeth) {
			gone = append(gone, *e)
		}
	}
	var goneOrphans []*orphan
	dropped := 0
	for _, o := range a.fc.orphans {
		switch {
		case !present(o.ifindex, o.hostVeth):
			goneOrphans = append(goneOrphans, o)
		case enforced[o.ifindex] == o.hostVeth:
			// An orphan's veth that an ADD has since taken over (a
			// retried ADD after the state was lost) is enforced by that
			// endpoint now: the orphan is dropped, but its veth's
			// programs stay. Programs that are merely not attached
			// (a failed ADD's rollback, a transient error) are no
			// take-over: the orphan stays held.
			delete(a.fc.orphans, o.id)
			a.retireIDLocked(o.id)
			dropped++
			a.log.Info("unrecorded endpoint's veth is enforced by a new endpoint; its deny policy is removed", "endpoint", o.id, "veth", o.hostVeth)
		}
	}
	a.mu.Unlock()
	for _, rec := range gone {
		// The dump is older than the endpoint table: a veth made, and
		// ADDed, since then is confirmed by one lookup before removal.
		if vethPresent(rec) {
			continue
		}
		unlock := a.fc.lockKey(rec.Key)
		_, err := a.removeIf(ctx, rec.Key, func(cur *endpointRecord) bool {
			return cur.HostIfIndex == rec.HostIfIndex && cur.HostVeth == rec.HostVeth
		})
		unlock()
		if err != nil && !errors.Is(err, errUnknownEndpoint) {
			a.log.Warn("remove endpoint whose veth vanished", "container", rec.Key.ContainerID, "veth", rec.HostVeth, "error", err)
			continue
		}
		if err == nil {
			a.log.Info("endpoint's veth vanished; endpoint removed without a DEL", "container", rec.Key.ContainerID, "veth", rec.HostVeth, "endpoint", rec.ID)
		}
	}
	if len(goneOrphans) == 0 && dropped == 0 {
		return
	}
	a.mu.Lock()
	for _, o := range goneOrphans {
		delete(a.fc.orphans, o.id)
		a.retireIDLocked(o.id)
	}
	a.mu.Unlock()
	for _, o := range goneOrphans {
		if err := a.dp.Forget(datapath.Endpoint{ID: o.id, Ifname: o.hostVeth, Ifindex: o.ifindex}); err != nil {
			a.log.Warn("forget unrecorded endpoint", "endpoint", o.id, "error", err)
		}
		a.log.Info("unrecorded endpoint's veth vanished; its deny policy is removed", "endpoint", o.id, "veth", o.hostVeth)
	}
	if err := a.submit(ctx, &change{refresh: true}); err != nil && ctx.Err() == nil {
		a.log.Warn("apply after removing unrecorded endpoints", "error", err)
	}
}

func (a *Agent) retireIDLocked(id policy.EndpointID) {
	if a.fc.retiredIDs == nil {
		a.fc.retiredIDs = map[policy.EndpointID]time.Time{}
	}
	a.fc.retiredIDs[id] = time.Now()
}

// endpointWarningsLocked lists the fail-closed problems for status. a.mu
// is held.
func (a *Agent) endpointWarningsLocked() []string {
	out := slices.Clone(a.fc.warnings)
	for _, id := range slices.Sorted(maps.Keys(a.fc.orphans)) {
		o := a.fc.orphans[id]
		out = append(out, fmt.Sprintf("endpoint %d on %s is enforced without a record: held at default deny until its veth goes", id, o.hostVeth))
	}
	return append(out, a.fc.conflicts...)
}

// unknownEndpointProblems explains a CHECK of an endpoint the agent has no
// record of; if its veth is one held at default deny, CHECK says so, and
// the runtime's answer (recreating the pod) settles it.
func (a *Agent) unknownEndpointProblems(hostIfIndex int) []string {
	problems := []string{"endpoint unknown to the agent"}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, o := range a.fc.orphans {
		if o.ifindex == hostIfIndex {
			problems = append(problems, fmt.Sprintf("its veth %s is enforced as endpoint %d without a record, held at default deny", o.hostVeth, o.id))
		}
	}
	return problems
}
