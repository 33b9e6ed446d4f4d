package agent

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/metrics"
	"github.com/bulkhead-io/bulkhead/agent/svids"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/identity/devca"
	"github.com/bulkhead-io/bulkhead/identity/spire"
	"github.com/bulkhead-io/bulkhead/policy"
)

// caDir is where the built-in CA keeps its key and bundle, under --state-dir.
const caDir = "ca"

// openSVIDs opens the configured SVID source (nil for "none").
func openSVIDs(cfg Config, m *metrics.Metrics) (*svids.Manager, error) {
	var src identity.SVIDSource
	log := cfg.Logger.With("component", "svids")
	switch cfg.IdentitySource {
	case identity.SourceNone:
		return nil, nil
	case identity.SourceBuiltin:
		td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
		if err != nil {
			return nil, fmt.Errorf("trust domain: %w", err)
		}
		ca, err := devca.Open(filepath.Join(cfg.StateDir, caDir), td, devca.Options{Logger: log})
		if err != nil {
			return nil, fmt.Errorf("built-in CA: %w", err)
		}
		if src, err = devca.NewSource(ca, devca.SourceOptions{TTL: cfg.SVIDTTL, Logger: log}); err != nil {
			return nil, fmt.Errorf("built-in CA: %w", err)
		}
	case identity.SourceSPIRE:
		s, err := spire.New(spire.Config{AdminSocket: cfg.SPIREAdminSocket, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("spire: %w", err)
		}
		src = s
	default:
		return nil, fmt.Errorf("identity source %q: want none, builtin or spire", cfg.IdentitySource)
	}
	mgr := svids.New(svids.Config{Source: src, Logger: log})
	m.RegisterSVIDs(func() metrics.SVIDStat {
		st := mgr.Stats()
		return metrics.SVIDStat{Source: mgr.SourceName(), Held: st.Held, Pods: st.Pods, Followed: st.Followed,
			EarliestExpiry: st.EarliestExpiry, Rotations: st.Rotations, Connected: st.Health.Connected}
	})
	return mgr, nil
}

// runSVIDs recompiles the pods whose issued SPIFFE ID changed, and drops
// SVIDs that expire while the source is unreachable.
func (a *Agent) runSVIDs(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			a.svids.Expire()
		case <-a.svids.Changed():
			keys := a.svids.TakeDirty()
			if len(keys) == 0 {
				continue
			}
			if a.tunnel != nil {
				// A withdrawn or replaced SVID: connections it
				// authenticated must not outlive it.
				for _, k := range keys {
					a.tunnel.Revoke(k)
				}
			}
			refs := make([]podRef, 0, len(keys))
			for _, k := range keys {
				if r, ok := parsePodKey(k); ok {
					refs = append(refs, r)
				}
			}
			if err := a.batch.Submit(ctx, &change{resync: refs}); err != nil && ctx.Err() == nil {
				a.log.Warn("recompile pods after an SVID change", "pods", keys, "error", err)
			}
		}
	}
}

func parsePodKey(k string) (podRef, bool) {
	ns, name, ok := strings.Cut(k, "/")
	return podRef{ns, name}, ok
}

// derivedID is spiffe://<td>/ns/<ns>/sa/<sa>.
func (a *Agent) derivedID(ns, sa string) spiffeid.ID {
	id, _ := identity.Labels{Namespace: ns, ServiceAccount: sa}.Derived(a.cfg.TrustDomain)
	return id
}

// issuedID is the SPIFFE ID the source issued to a local pod, when it
// differs from the derived one: policy then matches the pod by it. Only
// what differs is passed on, so that a source that issues the derived IDs
// (the built-in CA) changes no identity.
func (a *Agent) issuedID(ref podRef, sa string) string {
	if a.svids == nil {
		return ""
	}
	id, ok := a.svids.IssuedID(ref.String())
	if !ok || id == a.derivedID(ref.ns, sa).String() {
		return ""
	}
	// The compiler refuses an ID outside the trust domain or in another
	// namespace's ns/ tree; such a pod keeps its derived identity rather
	// than fail to compile, and the log says why.
	sid, err := spiffeid.FromString(id)
	if err == nil && sid.TrustDomain().Name() != a.cfg.TrustDomain {
		err = fmt.Errorf("it is outside --trust-domain %s", a.cfg.TrustDomain)
	}
	if err == nil {
		err = policy.CheckIssuedID(sid, ref.ns)
	}
	if err != nil {
		if a.issuedRefused[ref] != id {
			a.issuedRefused[ref] = id
			a.log.Warn("the SVID source issued a SPIFFE ID that policy cannot use; the pod keeps its derived identity",
				"pod", ref.String(), "issued", id, "error", err)
		}
		return ""
	}
	delete(a.issuedRefused, ref)
	return id
}

// syncSVIDs follows exactly the local pods that the store knows: one
// subscription per pod (the newest endpoint's sandbox UID), none for pods of
// other nodes. It runs on the batch goroutine after each apply.
func (a *Agent) syncSVIDs() {
	if a.svids == nil {
		return
	}
	a.mu.Lock()
	newest := map[podRef]*endpointRecord{}
	for _, e := range a.endpoints {
		r := podRefOf(e)
		if b := newest[r]; b == nil || e.CreatedAt.After(b.CreatedAt) {
			newest[r] = e
		}
	}
	a.mu.Unlock()
	for r := range a.issuedRefused {
		if newest[r] == nil {
			delete(a.issuedRefused, r) // a pod that comes back is logged again
		}
	}
	want := make(map[string]identity.Workload, len(newest))
	waiting := map[string]string{}
	for r, e := range newest {
		sp, known := a.storePods[r]
		if !known {
			// Its service account is a selector, and guessing "default"
			// could get the pod another workload's SVID.
			waiting[r.String()] = "waiting for the pod in the store: its service account decides what to ask the source for"
			continue
		}
		want[r.String()] = identity.Workload{Namespace: r.ns, Name: r.name, UID: e.Pod.UID, ServiceAccount: sp.ServiceAccount,
			Derived: a.derivedID(r.ns, sp.ServiceAccount)}
	}
	a.svids.Sync(want, waiting)
}

// svidInfos lists the SVID state of the local pods for the API.
func (a *Agent) svidInfos() []api.SVIDInfo {
	if a.svids == nil {
		return nil
	}
	var out []api.SVIDInfo
	for _, p := range a.svids.Pods() {
		out = append(out, api.SVIDInfo{Pod: p.Key, SPIFFEID: p.SPIFFEID, Serial: p.Serial, NotBefore: p.NotBefore,
			NotAfter: p.NotAfter, NoSVIDReason: p.Reason, LastError: p.LastError, CertificatePEM: certsPEM(p.Chain)})
	}
	return out
}

// identitySourceStatus is the source's part of `bulkhead status`.
func (a *Agent) identitySourceStatus() *api.IdentitySourceStatus {
	if a.svids == nil {
		return &api.IdentitySourceStatus{Name: identity.SourceNone, Healthy: true}
	}
	st := a.svids.Stats()
	out := &api.IdentitySourceStatus{Name: a.svids.SourceName(), Healthy: st.Health.Connected,
		LastError: st.Health.LastError, Since: st.Health.Since, SVIDs: st.Held, PodsWithSVID: st.Pods,
		PodsFollowed: st.Followed, EarliestExpiry: st.EarliestExpiry, Rotations: st.Rotations,
		BundlePEM: a.localBundlePEM()}
	// A source of another trust domain issues IDs that policy cannot use:
	// that is a configuration error, not a healthy source.
	if set := a.svids.Bundles(); set != nil && out.BundlePEM == "" {
		var tds []string
		for _, b := range set.Bundles() {
			tds = append(tds, b.TrustDomain().Name())
		}
		out.Healthy = false
		out.LastError = fmt.Sprintf("the source's trust bundles are for %v, not --trust-domain %s: its SPIFFE IDs are not used",
			tds, a.cfg.TrustDomain)
	}
	return out
}

// localBundlePEM is the trust bundle of the local trust domain.
func (a *Agent) localBundlePEM() string {
	set := a.svids.Bundles()
	td, err := spiffeid.TrustDomainFromString(a.cfg.TrustDomain)
	if set == nil || err != nil {
		return ""
	}
	b, ok := set.Get(td)
	if !ok {
		return ""
	}
	return certsPEM(b.X509Authorities())
}

func certsPEM(certs []*x509.Certificate) string {
	var b strings.Builder
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.String()
}
