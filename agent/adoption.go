package agent

import (
	"context"
	"os"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/adopt"
	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy"
)

// adoptTombstone is how long a pod whose endpoint was removed (DEL, GC, its
// veth gone) is not adopted again: the store still lists it for a moment,
// and its address may already lead to the next pod's sandbox.
const adoptTombstone = time.Minute

// adoptHost is the agent as agent/adopt sees it.
type adoptHost struct{ a *Agent }

// setLocalPods keeps the store's running pods of this node for the
// adopter. It runs on the batch goroutine, with every store state.
func (a *Agent) setLocalPods(pods []policy.Pod) {
	var local []adopt.Pod
	for _, p := range pods {
		if p.NodeName == a.cfg.NodeName && len(p.IPs) > 0 {
			local = append(local, adopt.Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, IPs: p.IPs})
		}
	}
	a.localPods.Store(&local)
}

// Candidates are the local pods with no endpoint, except those removed a
// moment ago.
func (h adoptHost) Candidates() []adopt.Pod {
	a := h.a
	pods := a.localPods.Load()
	if pods == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	have := map[podRef]bool{}
	for _, e := range a.endpoints {
		have[podRefOf(e)] = true
	}
	now := time.Now()
	for ref, at := range a.adoptTombs {
		if now.Sub(at) > adoptTombstone {
			delete(a.adoptTombs, ref)
		}
	}
	var out []adopt.Pod
	for _, p := range *pods {
		ref := podRef{p.Namespace, p.Name}
		if _, gone := a.adoptTombs[ref]; !have[ref] && !gone {
			out = append(out, p)
		}
	}
	return out
}

// Adopt enforces on a found sandbox through the ADD path, unless an
// endpoint (a CNI ADD that got there first) enforces the pod or its veth.
func (h adoptHost) Adopt(ctx context.Context, req api.EndpointAddRequest) error {
	a := h.a
	a.mu.Lock()
	for k, e := range a.endpoints {
		if k == req.EndpointKey || podRefOf(e) == (podRef{req.Pod.Namespace, req.Pod.Name}) ||
			(e.HostIfIndex == req.HostIfIndex && e.HostVeth == req.HostVeth) {
			a.mu.Unlock()
			return adopt.ErrEnforced
		}
	}
	a.mu.Unlock()
	_, err := a.addEndpoint(ctx, req, true)
	return err
}

// tombstone marks a pod whose endpoint was just removed. a.mu is held.
func (a *Agent) tombstoneLocked(rec *endpointRecord) {
	if a.adoptTombs == nil {
		a.adoptTombs = map[podRef]time.Time{}
	}
	a.adoptTombs[podRefOf(rec)] = time.Now()
}

// adoptedIn is the endpoint adopted without a runtime container ID whose
// pod interface ifName is in the namespace at netns: what a runtime's DEL
// for that sandbox names.
func (a *Agent) adoptedIn(netns, ifName string) (api.EndpointKey, bool) {
	if netns == "" {
		return api.EndpointKey{}, false
	}
	target, statErr := os.Stat(netns)
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, e := range a.endpoints {
		if !e.Adopted || !adopt.Synthetic(k.ContainerID) || k.IfName != ifName {
			continue
		}
		if e.Netns == netns {
			return k, true
		}
		if statErr == nil {
			if st, err := os.Stat(e.Netns); err == nil && os.SameFile(st, target) {
				return k, true
			}
		}
	}
	return api.EndpointKey{}, false
}
