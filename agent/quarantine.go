package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// A quarantined endpoint has every packet in and out dropped by the
// datapath but DNS to Config.QuarantineDNS (datapath.SetQuarantine). The
// datapath's slot (pinned) keeps it while the agent is down; the endpoint's
// record keeps what it was for. The slot is set first, then the record
// written (its fsync would otherwise delay the cut by milliseconds), and on
// release the slot is cleared first: a crash between the two leaves a slot
// with no record, or a record whose slot was cleared. restoreQuarantines
// keeps both quarantined, so a crash can only keep a pod cut off, never
// let it out.

// quarantineRecord is an endpoint's quarantine, kept in its record.
type quarantineRecord struct {
	// Number is the datapath's handle: the rule of every QUARANTINED drop.
	Number  uint32    `json:"number"`
	AlertID string    `json:"alertID,omitempty"`
	RuleID  string    `json:"ruleID,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	Since   time.Time `json:"since"`
}

func (q *quarantineRecord) ref() *flows.QuarantineRef {
	return &flows.QuarantineRef{AlertID: q.AlertID, RuleID: q.RuleID, Reason: q.Reason}
}

// quarantines numbers the quarantines and names them for flow records.
type quarantines struct {
	// mu orders number allocation and the refs' replacement.
	mu   sync.Mutex
	next uint32
	// refs are the live quarantines and the last released ones by number
	// (drop events of a released quarantine may still be in the ring);
	// replaced whole, read without a lock by flow enrichment.
	refs     atomic.Pointer[map[uint32]*flows.QuarantineRef]
	released []uint32
}

// releasedKept is how many released quarantines flow records can still
// name.
const releasedKept = 256

func (q *quarantines) allocate() uint32 {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.next++
	if q.next == 0 { // never 0: that is "none" in the datapath
		q.next = 1
	}
	return q.next
}

// seen makes later allocations pass n (restored records).
func (q *quarantines) seen(n uint32) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.next = max(q.next, n)
}

// update replaces refs with a copy that edit changed; q.mu held.
func (q *quarantines) update(edit func(map[uint32]*flows.QuarantineRef)) {
	m := map[uint32]*flows.QuarantineRef{}
	if cur := q.refs.Load(); cur != nil {
		maps.Copy(m, *cur)
	}
	edit(m)
	q.refs.Store(&m)
}

func (q *quarantines) add(n uint32, ref *flows.QuarantineRef) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.update(func(m map[uint32]*flows.QuarantineRef) { m[n] = ref })
}

func (q *quarantines) release(n uint32) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.released = append(q.released, n)
	if len(q.released) > releasedKept {
		gone := q.released[0]
		q.released = q.released[1:]
		q.update(func(m map[uint32]*flows.QuarantineRef) { delete(m, gone) })
	}
}

// lookup is flows.Context.Quarantine.
func (q *quarantines) lookup(n uint32) *flows.QuarantineRef {
	if m := q.refs.Load(); m != nil {
		return (*m)[n]
	}
	return nil
}

// newAlertID is a random 64-bit name for an alert line.
func newAlertID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ListQuarantines is api.Quarantiner.
func (a *Agent) ListQuarantines(context.Context) (api.QuarantineList, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := api.QuarantineList{Quarantines: []api.Quarantine{}}
	for _, rec := range a.endpoints {
		if rec.Quarantine != nil {
			out.Quarantines = append(out.Quarantines, quarantineOf(rec, rec.Quarantine))
		}
	}
	slices.SortFunc(out.Quarantines, func(x, y api.Quarantine) int {
		return strings.Compare(x.Pod.Namespace+"/"+x.Pod.Name+"/"+x.Endpoint.ContainerID,
			y.Pod.Namespace+"/"+y.Pod.Name+"/"+y.Endpoint.ContainerID)
	})
	return out, nil
}

func quarantineOf(rec *endpointRecord, q *quarantineRecord) api.Quarantine {
	return api.Quarantine{Pod: rec.Pod, Endpoint: rec.Key, EndpointID: uint32(rec.ID), Number: q.Number,
		AlertID: q.AlertID, RuleID: q.RuleID, Reason: q.Reason, Since: q.Since}
}

// Quarantine is api.Quarantiner: an operator quarantines a pod by hand.
func (a *Agent) Quarantine(_ context.Context, req api.QuarantineRequest) (api.QuarantineResponse, error) {
	return a.quarantinePod(podRef{req.Pod.Namespace, req.Pod.Name}, quarantineRecord{Reason: req.Reason})
}

// ReleaseQuarantine is api.Quarantiner.
func (a *Agent) ReleaseQuarantine(_ context.Context, req api.QuarantineReleaseRequest) (api.QuarantineResponse, error) {
	pod := podRef{req.Pod.Namespace, req.Pod.Name}
	resp, err := a.eachPodEndpoint(pod, "release the quarantine of", a.releaseEndpoint)
	if err == nil && resp.Changed {
		a.log.Warn("quarantine released", "pod", pod.String())
	}
	return resp, err
}

// eachPodEndpoint runs do for each of pod's endpoints on this node and
// gathers what it changed; what names the operation in errors.
func (a *Agent) eachPodEndpoint(pod podRef, what string,
	do func(api.EndpointKey) (*api.Quarantine, bool, error)) (api.QuarantineResponse, error) {
	keys := a.podEndpoints(pod)
	if len(keys) == 0 {
		return api.QuarantineResponse{}, api.Errorf(api.CodeEndpointNotFound, "pod %s has no endpoint on this node", pod)
	}
	resp := api.QuarantineResponse{Quarantines: []api.Quarantine{}}
	var errs []error
	for _, k := range keys {
		q, changed, err := do(k)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if q != nil {
			resp.Quarantines = append(resp.Quarantines, *q)
		}
		resp.Changed = resp.Changed || changed
	}
	if err := errors.Join(errs...); err != nil {
		return resp, fmt.Errorf("%s %s: %w", what, pod, err)
	}
	return resp, nil
}

// podEndpoints are the keys of pod's endpoints on this node.
func (a *Agent) podEndpoints(pod podRef) []api.EndpointKey {
	a.mu.Lock()
	defer a.mu.Unlock()
	var keys []api.EndpointKey
	for k, rec := range a.endpoints {
		if podRefOf(rec) == pod {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(x, y api.EndpointKey) int { return strings.Compare(x.ContainerID, y.ContainerID) })
	return keys
}

// quarantinePod quarantines each of pod's endpoints that is not yet.
func (a *Agent) quarantinePod(pod podRef, q quarantineRecord) (api.QuarantineResponse, error) {
	return a.eachPodEndpoint(pod, "quarantine", func(k api.EndpointKey) (*api.Quarantine, bool, error) {
		return a.quarantineEndpoint(k, q)
	})
}

// quarantineEndpoint quarantines the endpoint k; changed is false when it
// already was (its first quarantine stays).
func (a *Agent) quarantineEndpoint(k api.EndpointKey, q quarantineRecord) (*api.Quarantine, bool, error) {
	unlock := a.fc.lockKey(k)
	defer unlock()
	rec := a.priorEndpoint(k) // a copy
	if rec == nil {
		return nil, false, nil // gone meanwhile
	}
	cp := *rec
	if cp.Quarantine != nil {
		out := quarantineOf(&cp, cp.Quarantine)
		return &out, false, nil
	}
	q.Number = a.quar.allocate()
	// Named before the first drop can be reported.
	a.quar.add(q.Number, q.ref())
	if err := a.dp.SetQuarantine(cp.ID, q.Number); err != nil {
		return nil, false, fmt.Errorf("quarantine endpoint %d: %w", cp.ID, err)
	}
	q.Since = time.Now() // enforced from the next packet on
	cp.Quarantine = &q
	a.mu.Lock()
	if cur := a.endpoints[k]; cur != nil {
		cur.Quarantine = &q
	}
	a.mu.Unlock()
	if err := a.records.Put(recordKey(k), cp); err != nil {
		// Enforced all the same, and kept across a restart by the pinned
		// slot; only what it was for would be lost.
		a.log.Error("record the quarantine (it is enforced; a restarted agent keeps it without its alert)",
			"container", k.ContainerID, "error", err)
	}
	a.countQuarantines()
	a.log.Warn("pod quarantined: all its traffic is dropped but DNS to the listed resolvers",
		"pod", podRefOf(&cp).String(), "container", k.ContainerID, "endpoint", cp.ID, "number", q.Number,
		"alert", q.AlertID, "rule", q.RuleID, "reason", q.Reason)
	out := quarantineOf(&cp, &q)
	return &out, true, nil
}

// releaseEndpoint lifts the endpoint k's quarantine; changed is false when
// it had none.
func (a *Agent) releaseEndpoint(k api.EndpointKey) (*api.Quarantine, bool, error) {
	unlock := a.fc.lockKey(k)
	defer unlock()
	rec := a.priorEndpoint(k) // a copy
	if rec == nil || rec.Quarantine == nil {
		return nil, false, nil
	}
	cp := *rec
	q := cp.Quarantine
	if err := a.dp.SetQuarantine(cp.ID, 0); err != nil {
		return nil, false, fmt.Errorf("lift the quarantine of endpoint %d: %w", cp.ID, err)
	}
	cp.Quarantine = nil
	if err := a.records.Put(recordKey(k), cp); err != nil {
		// A release the record does not hold would be undone by the next
		// start: keep the pod quarantined, and say so.
		if serr := a.dp.SetQuarantine(cp.ID, q.Number); serr != nil {
			err = errors.Join(err, serr)
		}
		return nil, false, fmt.Errorf("record the release of %s (the pod stays quarantined): %w", k.ContainerID, err)
	}
	a.mu.Lock()
	if cur := a.endpoints[k]; cur != nil {
		cur.Quarantine = nil
	}
	a.mu.Unlock()
	a.quar.release(q.Number)
	a.countQuarantines()
	out := quarantineOf(&cp, q)
	return &out, true, nil
}

// restoreQuarantines reconciles the restored records with the datapath's
// slots, never letting a pod out: a record's quarantine is set again (its
// slot may be new, or lost with the pins); a restored endpoint's slot with
// no record (a crash before the record was written) stays, and gets a
// record that says so; a slot of no restored endpoint is cleared (its
// endpoint is gone, and its ID may be given to another pod). Called once
// the records are loaded, before anything else touches the slots.
func (a *Agent) restoreQuarantines() {
	slots := a.dp.QuarantinedEndpoints()
	byID := map[policy.EndpointID]*endpointRecord{}
	for _, rec := range a.endpoints {
		byID[rec.ID] = rec
	}
	for id, num := range slots {
		rec := byID[id]
		if rec == nil {
			if err := a.dp.SetQuarantine(id, 0); err != nil {
				a.log.Warn("clear the quarantine of a gone endpoint", "endpoint", id, "error", err)
			}
			continue
		}
		if rec.Quarantine == nil {
			rec.Quarantine = &quarantineRecord{Number: num, Since: time.Now(),
				Reason: "found in the datapath at start-up, with no record (the agent stopped as it quarantined the pod)"}
			if err := a.records.Put(recordKey(rec.Key), *rec); err != nil {
				a.log.Warn("record a quarantine found in the datapath", "container", rec.Key.ContainerID, "error", err)
			}
		}
	}
	n := 0
	for _, rec := range a.endpoints {
		q := rec.Quarantine
		if q == nil {
			continue
		}
		a.quar.seen(q.Number)
		a.quar.add(q.Number, q.ref())
		if err := a.dp.SetQuarantine(rec.ID, q.Number); err != nil {
			a.log.Error("restore quarantine", "endpoint", rec.ID, "error", err)
		}
		n++
	}
	a.countQuarantines()
	if n > 0 {
		a.log.Warn("quarantines restored", "endpoints", n)
	}
}

// quarantineOnAlert quarantines the alert's pod when a runtime policy
// answers its rule with Quarantine, and says in the alert what became of
// it.
func (a *Agent) quarantineOnAlert(al *detect.Alert) {
	d := a.sysmon
	in := d.inputs.Load()
	if in == nil || al.Pod.Pod == "" {
		return
	}
	pod := podRef{al.Pod.Namespace, al.Pod.Pod}
	rules := policy.RuntimeQuarantines(in.pols, pod.ns, in.labels[pod], al.Pod.SPIFFEID)
	if !rules[al.RuleID] {
		return
	}
	resp, err := a.quarantinePod(pod, quarantineRecord{AlertID: al.ID, RuleID: al.RuleID})
	switch {
	case err != nil:
		al.Quarantine = "failed: " + err.Error()
		a.log.Error("quarantine on alert", "pod", pod.String(), "alert", al.ID, "rule", al.RuleID, "error", err)
	case resp.Changed:
		al.Quarantine = "quarantined"
	default:
		al.Quarantine = "already quarantined"
	}
}

// countQuarantines sets bulkhead_quarantined_endpoints.
func (a *Agent) countQuarantines() {
	a.mu.Lock()
	n := 0
	for _, rec := range a.endpoints {
		if rec.Quarantine != nil {
			n++
		}
	}
	a.mu.Unlock()
	a.metrics.QuarantinesActive.Set(float64(n))
}
