package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/adopt"
	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/batch"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

var _ api.Backend = (*Agent)(nil)

// AddEndpoint registers an endpoint and returns once its policy is applied
// and its programs are attached.
//
// An ADD is all or nothing: on any failure its registration, ID, policy,
// attach and record are undone (rollbackAdd), and ADDs and DELs of one key
// run one after the other, so a rollback never undoes another ADD.
func (a *Agent) AddEndpoint(ctx context.Context, req api.EndpointAddRequest) (api.EndpointAddResponse, error) {
	return a.addEndpoint(ctx, req, false)
}

// addEndpoint is AddEndpoint; adopted marks an endpoint the agent found
// running rather than one a CNI ADD registered (agent/adopt).
func (a *Agent) addEndpoint(ctx context.Context, req api.EndpointAddRequest, adopted bool) (api.EndpointAddResponse, error) {
	start := time.Now()
	if err := api.CheckPodIPs(req.IPs); err != nil {
		return api.EndpointAddResponse{}, api.Errorf(api.CodeInvalidRequest, "endpoint %s/%s: %w", req.ContainerID, req.IfName, err)
	}
	if req.Pod.Namespace == "" || req.Pod.Name == "" {
		return api.EndpointAddResponse{}, api.Errorf(api.CodeInvalidRequest,
			"endpoint %s/%s: the pod's namespace and name are required (K8S_POD_NAMESPACE, K8S_POD_NAME)", req.ContainerID, req.IfName)
	}
	// A bad MAC would fail only at Attach, after a full apply and its
	// rollback; refuse it before any state changes.
	if err := api.CheckMAC(req.MAC); err != nil {
		return api.EndpointAddResponse{}, api.Errorf(api.CodeInvalidRequest, "endpoint %s/%s: %w", req.ContainerID, req.IfName, err)
	}
	unlock := a.fc.lockKey(req.EndpointKey)
	defer unlock()
	prior := a.priorEndpoint(req.EndpointKey)
	rec := &endpointRecord{
		Key: req.EndpointKey, Network: req.Network, Netns: req.Netns, HostVeth: req.HostVeth,
		HostIfIndex: req.HostIfIndex, IPs: req.IPs, Pod: req.Pod, CreatedAt: start, MAC: req.MAC, Adopted: adopted,
	}
	if prior != nil {
		// A repeated ADD keeps the endpoint's quarantine.
		rec.Quarantine = prior.Quarantine
	}
	// The pod's link-local addresses (and the MAC, from a plugin that
	// sends none): read them now, before any state changes.
	if _, err := rec.ensureLink(); err != nil {
		return api.EndpointAddResponse{}, api.Errorf(api.CodeInvalidRequest, "endpoint %s: %v", req.ContainerID, err)
	}
	c := &change{add: rec, restore: prior}
	if err := a.submit(ctx, c); err != nil {
		// Registered but not applied (a failed apply), or not yet
		// processed (ctx ended): undo it either way, after it.
		if derr := a.rollbackAdd(ctx, rec, prior, false); derr != nil {
			a.log.Error("roll back endpoint", "container", req.ContainerID, "error", derr)
		}
		return api.EndpointAddResponse{}, err
	}
	submitted := time.Now()
	// The policy is live; attaching makes the veth enforce it. The record
	// is made durable meanwhile: a TCX attach spends its time waiting for
	// RCU grace periods, and the fsyncs need not wait behind them. The ADD
	// is answered only once both are done. A record that is durable before
	// its attach is safe: a restarted agent re-attaches every endpoint it
	// restores.
	a.mu.Lock()
	cp := *rec
	cp.Mode = a.attachMode
	a.mu.Unlock()
	var persistTook time.Duration
	persistErr := make(chan error, 1)
	go func() {
		err := a.records.Put(recordKey(rec.Key), cp)
		persistTook = time.Since(submitted)
		persistErr <- err
	}()
	mode, err := a.attach(rec.dpEndpoint())
	attachTook := time.Since(submitted)
	if perr := <-persistErr; err == nil {
		err = perr
	}
	if err == nil && cp.Quarantine != nil {
		// The endpoint ID may be new; the quarantine follows it.
		err = a.dp.SetQuarantine(rec.ID, cp.Quarantine.Number)
	}
	if err == nil && mode != cp.Mode {
		// A fallback that the start-up probe did not predict: the record
		// says how the endpoint is attached.
		cp.Mode = mode
		err = a.records.Put(recordKey(rec.Key), cp)
	}
	if err == nil {
		a.mu.Lock()
		rec.Mode = mode
		a.mu.Unlock()
	}
	if err != nil {
		a.log.Error("endpoint attach failed; rolling back", "container", req.ContainerID, "veth", req.HostVeth, "error", err)
		if derr := a.rollbackAdd(ctx, rec, prior, true); derr != nil {
			a.log.Error("roll back endpoint", "container", req.ContainerID, "error", derr)
		}
		return api.EndpointAddResponse{}, fmt.Errorf("attach to %s: %w", req.HostVeth, err)
	}
	v := a.view.Load()
	resp := api.EndpointAddResponse{Enforced: true, PolicyRevision: v.ms.Revision}
	if p := v.ms.Endpoints[rec.ID]; p != nil {
		resp.IdentityID = uint32(p.Identity)
		resp.SPIFFEID = v.identities[uint32(p.Identity)].SPIFFEID
	}
	a.metrics.CNIAddSeconds.Observe(time.Since(start).Seconds())
	// Where the time went: waiting for the batch to start, the batch
	// (compile and apply, shared by batchSize changes), then the attach and
	// the durable record, which run side by side.
	msg := "endpoint added"
	if adopted {
		msg = "endpoint adopted"
	}
	a.log.Info(msg, "container", req.ContainerID, "pod", podRefOf(rec).String(), "endpoint", rec.ID,
		"veth", req.HostVeth, "identity", resp.IdentityID, "spiffeID", resp.SPIFFEID, "mode", rec.Mode,
		"revision", resp.PolicyRevision, "took", time.Since(start),
		"queued", c.batchStart.Sub(start), "batch", submitted.Sub(c.batchStart), "batchSize", c.batchSize,
		"attach", attachTook, "persist", persistTook)
	return resp, nil
}

// DeleteEndpoint forgets an endpoint and detaches its programs.
func (a *Agent) DeleteEndpoint(ctx context.Context, req api.EndpointDelRequest) (api.EndpointDelResponse, error) {
	unlock := a.fc.lockKey(req.EndpointKey)
	err := a.deleteEndpoint(ctx, req.EndpointKey)
	unlock()
	if errors.Is(err, errUnknownEndpoint) {
		// A pod adopted without its runtime container ID: the DEL names
		// its sandbox by network namespace.
		k, ok := a.adoptedIn(req.Netns, req.IfName)
		if !ok {
			return api.EndpointDelResponse{}, nil
		}
		unlock := a.fc.lockKey(k)
		err = a.deleteEndpoint(ctx, k)
		unlock()
		if errors.Is(err, errUnknownEndpoint) {
			return api.EndpointDelResponse{}, nil
		}
	}
	if err != nil {
		return api.EndpointDelResponse{}, err
	}
	return api.EndpointDelResponse{Removed: true}, nil
}

var errUnknownEndpoint = errors.New("unknown endpoint")

// deleteEndpoint removes the endpoint's policy (one apply), then detaches
// its programs, deletes its record and retires its ID (removeIf).
func (a *Agent) deleteEndpoint(ctx context.Context, k api.EndpointKey) error {
	rec, err := a.removeIf(ctx, k, nil)
	if rec != nil {
		a.log.Info("endpoint deleted", "container", k.ContainerID, "ifname", k.IfName, "pod", podRefOf(rec).String(), "endpoint", rec.ID, "error", err)
	}
	return err
}

// submit hands a change to the batcher.
func (a *Agent) submit(ctx context.Context, c *change) error {
	err := a.batch.Submit(ctx, c)
	if errors.Is(err, batch.ErrClosed) {
		return api.Errorf(api.CodeNotReady, "agent is shutting down")
	}
	return err
}

// CheckEndpoint verifies that an endpoint is known, attached to the veth
// the plugin sees now, and carries its current identity.
func (a *Agent) CheckEndpoint(_ context.Context, req api.EndpointCheckRequest) (api.EndpointCheckResponse, error) {
	a.mu.Lock()
	rec := a.endpoints[req.EndpointKey]
	var cp endpointRecord
	if rec != nil {
		cp = *rec
	}
	a.mu.Unlock()
	if rec == nil {
		return api.EndpointCheckResponse{Problems: a.unknownEndpointProblems(req.HostIfIndex)}, nil
	}
	resp := api.EndpointCheckResponse{Known: true}
	switch {
	case cp.HostIfIndex != req.HostIfIndex:
		resp.Problems = append(resp.Problems, fmt.Sprintf("agent enforces on ifindex %d (%s), the pod's veth is now %d (%s)",
			cp.HostIfIndex, cp.HostVeth, req.HostIfIndex, req.HostVeth))
	default:
		attached, err := a.dp.Attached(cp.dpEndpoint())
		switch {
		case err != nil:
			resp.Problems = append(resp.Problems, "cannot inspect the veth: "+err.Error())
		case !attached:
			resp.Problems = append(resp.Problems, "programs are not attached to "+cp.HostVeth)
		default:
			resp.Attached = true
		}
	}
	// The identity is current when the live datapath carries the identity
	// the compiler computes from the store now.
	want := a.view.Load().ms.Endpoints[cp.ID]
	live, err := a.dp.EndpointIdentity(cp.ID)
	switch {
	case want == nil:
		resp.Problems = append(resp.Problems, "endpoint has no compiled policy")
	case err != nil:
		resp.Problems = append(resp.Problems, "cannot read the endpoint's live identity: "+err.Error())
	case live != want.Identity:
		resp.Problems = append(resp.Problems, fmt.Sprintf("live identity %d, expected %d", live, want.Identity))
	default:
		resp.IdentityCurrent = true
	}
	return resp, nil
}

// GCEndpoints removes the endpoints of network that the runtime no longer
// lists.
func (a *Agent) GCEndpoints(ctx context.Context, req api.GCRequest) (api.GCResponse, error) {
	valid := map[api.EndpointKey]bool{}
	for _, k := range req.ValidAttachments {
		valid[k] = true
	}
	a.mu.Lock()
	var stale []api.EndpointKey
	for k, e := range a.endpoints {
		if e.Adopted && adopt.Synthetic(k.ContainerID) {
			// The runtime cannot list what it was never told the key of:
			// DEL by netns, or its veth going, removes it.
			continue
		}
		if !valid[k] && (req.Network == "" || e.Network == req.Network) {
			stale = append(stale, k)
		}
	}
	a.mu.Unlock()
	slices.SortFunc(stale, func(x, y api.EndpointKey) int {
		return strings.Compare(x.ContainerID+"/"+x.IfName, y.ContainerID+"/"+y.IfName)
	})
	var resp api.GCResponse
	for _, k := range stale {
		unlock := a.fc.lockKey(k)
		err := a.deleteEndpoint(ctx, k)
		unlock()
		if errors.Is(err, errUnknownEndpoint) {
			continue
		}
		if err != nil {
			return resp, err
		}
		resp.Removed = append(resp.Removed, k)
	}
	if len(resp.Removed) > 0 {
		a.log.Info("endpoints garbage-collected", "removed", len(resp.Removed), "network", req.Network)
	}
	return resp, nil
}

// Status reports health and a summary.
func (a *Agent) Status(context.Context) (api.StatusResponse, error) {
	v := a.view.Load()
	a.mu.Lock()
	defer a.mu.Unlock()
	resp := api.StatusResponse{
		Ready: a.ready, Reason: a.notReady, AgentVersion: a.cfg.Version, NodeName: a.cfg.NodeName,
		StartedAt: a.started, Endpoints: len(a.endpoints), Identities: len(v.identities),
		PolicyRevision: v.ms.Revision, Datapath: a.datapathMode(), Store: a.source.String(),
		StoreErrors: slices.Clone(a.storeErrs), StoreHeld: storeHold(a.guard), StoreConnection: storeConnection(a.source), PolicyErrors: a.budget.errors(),
		Features:            a.features,
		LostEventsUserspace: a.hub.LostUserspace(), PolicyApply: a.applyRetry.status(),
	}
	resp.PolicyErrors = append(resp.PolicyErrors, ptrOrNil(a.runtimeUnenforced.Load())...)
	resp.EndpointWarnings = a.endpointWarningsLocked()
	if c, err := a.dp.Counters(); err == nil {
		resp.LostEventsKernel = c.EventsLost
	}
	resp.DatapathVersion = datapathVersion(a.dp.Version())
	resp.IdentitySource = a.identitySourceStatus()
	resp.MTLS = a.mtlsStatus()
	if a.adopter != nil {
		resp.Unadopted = a.adopter.Problems()
	}
	return resp, nil
}

// ListEndpoints lists the endpoints, ordered by pod.
func (a *Agent) ListEndpoints(context.Context) (api.EndpointList, error) {
	v := a.view.Load()
	a.mu.Lock()
	out := api.EndpointList{Endpoints: []api.EndpointInfo{}}
	for _, e := range a.endpoints {
		out.Endpoints = append(out.Endpoints, e.info(v.ms, func(id policy.EndpointID) string {
			if p := v.ms.Endpoints[id]; p != nil {
				return v.identities[uint32(p.Identity)].SPIFFEID
			}
			return ""
		}))
	}
	a.mu.Unlock()
	slices.SortFunc(out.Endpoints, func(x, y api.EndpointInfo) int {
		return strings.Compare(x.Pod.Namespace+"/"+x.Pod.Name+"/"+x.ContainerID, y.Pod.Namespace+"/"+y.Pod.Name+"/"+y.ContainerID)
	})
	return out, nil
}

// ListIdentities lists the reserved and allocated identities.
func (a *Agent) ListIdentities(context.Context) (api.IdentityList, error) {
	v := a.view.Load()
	count := map[identity.NumericID]int{}
	for id := range v.endpoints {
		if p := v.ms.Endpoints[id]; p != nil {
			count[p.Identity]++
		}
	}
	out := api.IdentityList{Identities: []api.Identity{
		{ID: uint32(identity.IDHost), Reserved: "host"},
		{ID: uint32(identity.IDWorld), Reserved: "world"},
	}}
	for _, id := range slices.Sorted(maps.Keys(v.identities)) {
		ii := v.identities[id]
		if ii.ID.IsReserved() {
			continue // listed above
		}
		it := api.Identity{ID: id, SPIFFEID: ii.SPIFFEID, Endpoints: count[ii.ID]}
		if ii.Prefix.IsValid() {
			it.Reserved = "cidr:" + ii.Prefix.String()
		} else {
			it.Namespace, it.ServiceAccount, it.Labels = ii.Labels.Namespace, ii.Labels.SA(), ii.Labels.PodLabels
		}
		out.Identities = append(out.Identities, it)
	}
	out.Source, out.SVIDs = a.identitySourceStatus(), a.svidInfos()
	return out, nil
}

// Explain answers from the live MapState, with the engine the offline CLI
// uses.
func (a *Agent) Explain(_ context.Context, req api.ExplainRequest) (api.ExplainResponse, error) {
	v := a.view.Load()
	proto, ok := explain.ParseProto(req.Protocol)
	if !ok {
		return api.ExplainResponse{}, api.Errorf(api.CodeInvalidRequest, "protocol %q: want TCP, UDP or SCTP", req.Protocol)
	}
	src, err := a.explainPeer(v, req.Source)
	if err != nil {
		return api.ExplainResponse{}, err
	}
	dst, err := a.explainPeer(v, req.Destination)
	if err != nil {
		return api.ExplainResponse{}, err
	}
	r := explain.Verdict(v.ms, src, dst, proto, req.Port)
	// A side that a default deny decided names what isolates that end, as
	// the flow records of its drops do (computed at the last apply).
	if fc := a.enricher.Context(); fc != nil {
		explain.NameIsolation(&r, src, dst, func(at explain.Peer, dir policy.Direction) []string {
			if iso := fc.IsolatedBy[at.Endpoint]; iso != nil {
				return iso[dir]
			}
			return nil
		})
	}
	resp := api.ExplainResponse{
		Verdict: r.Combined, SourceIdentity: uint32(r.FromIdentity), DestinationIdentity: uint32(r.ToIdentity),
		PolicyRevision: v.ms.Revision, Reason: explain.Text(r),
	}
	if detail, err := json.Marshal(r); err == nil {
		resp.Detail = detail
	}
	for _, s := range []struct {
		dir  string
		side explain.Side
	}{{"egress", r.Egress}, {"ingress", r.Ingress}} {
		if s.side.Rule != nil {
			ru := s.side.Rule
			resp.Rules = append(resp.Rules, api.ExplainRule{
				Policy: ru.Kind + " " + ru.Namespace + "/" + ru.Name, Rule: fmt.Sprintf("%s[%d]", ru.Direction, ru.Index),
				Direction: s.dir, Verdict: s.side.Verdict,
			})
		} else if s.side.Enforced {
			resp.Rules = append(resp.Rules, api.ExplainRule{Policy: "default", Rule: s.side.Default, Direction: s.dir, Verdict: s.side.Verdict})
		}
	}
	return resp, nil
}

func (a *Agent) explainPeer(v *view, p api.Peer) (explain.Peer, error) {
	if p.Pod != nil {
		ref := podRef{p.Pod.Namespace, p.Pod.Name}
		for id, r := range v.pods {
			if r == ref {
				return explain.PeerOfEndpoint(v.ms, ref.String(), id, v.endpoints[id].addrs()), nil
			}
		}
		if sp, ok := a.storePodIPs(ref); ok && len(sp) > 0 {
			pe := explain.PeerOfAddr(v.ms, sp[0])
			pe.Name, pe.Addrs = ref.String(), sp
			return pe, nil
		}
		return explain.Peer{}, api.Errorf(api.CodeInvalidRequest, "pod %s is neither on this node nor a known remote pod with an address", ref)
	}
	// An address of a local endpoint is that endpoint, judged by that
	// address (a dual-stack pod's two addresses can differ in identity).
	ip := p.IP.Unmap()
	for id, rec := range v.endpoints {
		if slices.Contains(rec.addrs(), ip) {
			return explain.PeerOfEndpoint(v.ms, v.pods[id].String()+"@"+ip.String(), id, []netip.Addr{ip}), nil
		}
	}
	return explain.PeerOfAddr(v.ms, ip), nil
}

// storePodIPs returns the addresses the store gives a remote pod. It reads
// the view's MapState only, never the batch goroutine's maps.
func (a *Agent) storePodIPs(ref podRef) ([]netip.Addr, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ips, ok := a.remoteIPs[ref]
	return ips, ok
}

func datapathVersion(v datapath.Version) *api.DatapathVersion {
	out := &api.DatapathVersion{Serial: v.Serial, Object: v.Object, Settings: v.Settings, LoadedAt: v.LoadedAt}
	if m := v.Migration; m != nil {
		out.Migration = &api.DatapathMigration{FromSerial: m.From.Serial, FromObject: m.From.Object, At: m.At,
			DurationMS: float64(m.Duration) / 1e6, SwapMS: float64(m.SwapDuration) / 1e6, LinksSwapped: m.LinksSwapped,
			Reused: m.Reused, Copied: m.Copied, Created: m.Created, Removed: m.Removed}
	}
	return out
}
