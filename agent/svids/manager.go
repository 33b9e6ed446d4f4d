// Package svids holds the X.509-SVIDs of the node's local pods: it follows
// one SVID source subscription per local pod, caches SVIDs per SPIFFE ID
// (pods that SPIRE gives one ID share one SVID), drops an SVID when its
// entry is deleted or when it expires, and tells the agent when a pod's
// issued SPIFFE ID changes, so that policy matching follows it. It never
// blocks its callers on the source: a CNI ADD is enforced at once, and the
// SVID follows.
package svids

import (
	"crypto/x509"
	"encoding/hex"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Config wires a Manager.
type Config struct {
	Source identity.SVIDSource
	Logger *slog.Logger
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

// Manager follows the SVIDs of local pods, keyed by the agent's pod key
// ("namespace/name").
type Manager struct {
	src identity.SVIDSource
	log *slog.Logger
	now func() time.Time

	mu   sync.Mutex
	pods map[string]*pod
	// byID caches the newest SVID per SPIFFE ID, shared by the pods that
	// hold that ID.
	byID      map[string]*cached
	bundles   *x509bundle.Set
	rotations uint64
	// differs remembers the (pod, issued ID) pairs whose difference from
	// the derived ID was logged, to log it once.
	differs map[string]string
	// dirty are pods whose issued ID changed since TakeDirty; notify has
	// room for one wake-up.
	dirty         map[string]bool
	notify        chan struct{}
	cancelBundles func()
	// closed is set by Close: Sync then subscribes nothing more.
	closed bool
}

type pod struct {
	w      identity.Workload
	cancel func()
	// id is the SPIFFE ID of the SVID the pod holds, empty when none.
	id     string
	serial string
	reason string
	// lastErr is the source's last error for this pod, kept while held
	// SVIDs stay in use.
	lastErr string
	updated time.Time
	// recovering is set by a source error while the pod holds an SVID, and
	// cleared by the next update that carries one. withdrawAt is when an
	// empty update that arrived while recovering takes effect (zero: none
	// pending), withdrawWhy its reason.
	recovering  bool
	withdrawAt  time.Time
	withdrawWhy string
	// waiting pods are not subscribed (see Sync).
	waiting bool
}

// ReconnectSettle is how long an empty update that arrives right after the
// source recovered from an outage waits for an SVID before it withdraws the
// held one. A restarted SPIRE agent rebuilds its cache and may answer a
// new subscription with nothing before the SVID it mints a moment later (it
// syncs every 5 s); dropping the held SVID in between would flap the pod's
// identity and the policy that matches it. Outside recovery an empty update
// (a deleted entry) withdraws the SVID at once.
const ReconnectSettle = 12 * time.Second

type cached struct {
	svid *x509svid.SVID
	refs int
}

// New starts following the trust bundles of cfg.Source.
func New(cfg Config) *Manager {
	m := &Manager{src: cfg.Source, log: cfg.Logger, now: cfg.Now,
		pods: map[string]*pod{}, byID: map[string]*cached{}, differs: map[string]string{},
		dirty: map[string]bool{}, notify: make(chan struct{}, 1)}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.now == nil {
		m.now = time.Now
	}
	m.cancelBundles = m.src.SubscribeBundles(func(s *x509bundle.Set) {
		m.mu.Lock()
		m.bundles = s
		m.mu.Unlock()
	})
	return m
}

// SourceName is the source's name (--identity-source).
func (m *Manager) SourceName() string { return m.src.Name() }

// Changed is signalled when a pod's issued SPIFFE ID changed; TakeDirty
// says which.
func (m *Manager) Changed() <-chan struct{} { return m.notify }

// TakeDirty returns and clears the pods whose issued ID changed.
func (m *Manager) TakeDirty() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := slices.Sorted(maps.Keys(m.dirty))
	clear(m.dirty)
	return out
}

func (m *Manager) markDirtyLocked(key string) {
	m.dirty[key] = true
	select {
	case m.notify <- struct{}{}:
	default:
	}
}

// Sync makes the subscriptions those of want: new pods are subscribed,
// gone pods cancelled, and a pod whose workload changed (another service
// account, a new UID) is subscribed afresh. Pods in waiting are local pods
// that cannot be asked for yet (their metadata is not known, so their
// selectors would be a guess): they are listed with the reason, and
// subscribed once they move to want. It returns at once.
func (m *Manager) Sync(want map[string]identity.Workload, waiting map[string]string) {
	type start struct {
		key string
		p   *pod
	}
	var cancels []func()
	var starts []start
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	for k, p := range m.pods {
		if w, ok := want[k]; ok && w == p.w && !p.waiting {
			continue
		}
		if why, ok := waiting[k]; ok && p.waiting {
			p.reason = why
			continue
		}
		if p.cancel != nil {
			cancels = append(cancels, p.cancel)
		}
		m.dropLocked(k, p, "")
		delete(m.pods, k)
		// A pod that comes back under this key is a new pod: an issued
		// ID that differs is worth logging again, and the map must not
		// grow with every pod the node ever ran.
		delete(m.differs, k)
	}
	for k, why := range waiting {
		if _, ok := m.pods[k]; !ok {
			m.pods[k] = &pod{reason: why, waiting: true, updated: m.now()}
		}
	}
	for k, w := range want {
		if _, ok := m.pods[k]; !ok {
			p := &pod{w: w, reason: "waiting for the " + m.src.Name() + " source", updated: m.now()}
			m.pods[k] = p
			starts = append(starts, start{k, p})
		}
	}
	m.mu.Unlock()
	// Cancel waits for a running callback, which takes m.mu: never under it.
	for _, c := range cancels {
		c()
	}
	// Subscribe exactly the pods this call created: a concurrent Sync that
	// replaced one of them subscribes its own, and re-reading m.pods here
	// would subscribe that one twice and leak a subscription.
	for _, s := range starts {
		k, p := s.key, s.p
		cancel := m.src.Subscribe(p.w, func(u identity.SVIDUpdate) { m.update(k, p, u) })
		m.mu.Lock()
		if m.pods[k] == p {
			p.cancel = cancel
			cancel = nil
		}
		m.mu.Unlock()
		if cancel != nil { // removed while subscribing
			cancel()
		}
	}
}

// update folds one source update for pod p (stale when p was replaced).
func (m *Manager) update(key string, p *pod, u identity.SVIDUpdate) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pods[key] != p {
		return
	}
	now := m.now()
	p.updated = now
	switch {
	case u.Err != nil:
		p.lastErr = u.Err.Error()
		if p.id == "" {
			p.reason = "source unavailable: " + p.lastErr
		} else if !errors.Is(u.Err, identity.ErrMalformedUpdate) {
			p.recovering = true
		}
		return
	case len(u.SVIDs) == 0:
		p.lastErr = ""
		reason := u.Reason
		if reason == "" {
			reason = "the source issued none"
		}
		if p.id != "" && p.recovering {
			if p.withdrawAt.IsZero() {
				p.withdrawAt, p.withdrawWhy = now.Add(ReconnectSettle), reason
				m.log.Info("the source answers with no svid right after an outage; the held one stays while it settles",
					"pod", key, "spiffeID", p.id, "settle", ReconnectSettle)
			}
			return
		}
		if p.id != "" {
			m.log.Info("svid withdrawn", "pod", key, "spiffeID", p.id, "reason", reason)
		}
		m.dropLocked(key, p, reason)
		return
	}
	p.recovering, p.withdrawAt, p.withdrawWhy = false, time.Time{}, ""
	p.lastErr = ""
	s := u.SVIDs[0]
	if s == nil || len(s.Certificates) == 0 || s.Certificates[0] == nil {
		// A source bug must not crash the agent, nor leave an SVID in
		// use that the source no longer vouches for.
		m.log.Warn("the svid source sent an svid without a certificate", "pod", key)
		m.dropLocked(key, p, "the source sent an SVID without a certificate")
		return
	}
	if !now.Before(s.Certificates[0].NotAfter) {
		m.dropLocked(key, p, "the source sent an expired SVID")
		return
	}
	id, serial := s.ID.String(), hex.EncodeToString(s.Certificates[0].SerialNumber.Bytes())
	if id == p.id && serial == p.serial {
		return
	}
	c := m.byID[id]
	if c == nil {
		c = &cached{}
		m.byID[id] = c
	}
	replaced := false
	// The newest issued SVID wins, even when it expires sooner than the
	// cached one (a lowered TTL, a rotated CA): what the source hands out
	// now is what it vouches for.
	if cur := c.svid; cur == nil || (cur.Certificates[0].SerialNumber.Cmp(s.Certificates[0].SerialNumber) != 0 &&
		!s.Certificates[0].NotBefore.Before(cur.Certificates[0].NotBefore)) {
		replaced = c.svid != nil
		c.svid = s
	}
	if id == p.id {
		// Count rotations of the shared SVID, not of each pod: a source
		// that shares one SVID per ID sends the new one to every pod.
		if replaced {
			m.rotations++
		}
		p.serial = serial
		m.log.Debug("svid rotated", "pod", key, "spiffeID", id, "serial", serial, "expires", s.Certificates[0].NotAfter)
		return
	}
	c.refs++
	m.releaseLocked(p.id)
	p.id, p.serial, p.reason = id, serial, ""
	m.markDirtyLocked(key)
	if derived := p.w.Derived.String(); id != derived && m.differs[key] != id {
		m.differs[key] = id
		m.log.Info("the SVID source issued a SPIFFE ID other than the derived one; policy, flows and identities use it",
			"pod", key, "issued", id, "derived", derived)
	}
	m.log.Info("svid held", "pod", key, "spiffeID", id, "serial", serial, "expires", s.Certificates[0].NotAfter)
}

// dropLocked takes a pod's SVID away.
func (m *Manager) dropLocked(key string, p *pod, reason string) {
	if reason != "" {
		p.reason = reason
	}
	if p.id == "" {
		return
	}
	m.releaseLocked(p.id)
	p.id, p.serial = "", ""
	p.recovering, p.withdrawAt, p.withdrawWhy = false, time.Time{}, ""
	m.markDirtyLocked(key)
}

func (m *Manager) releaseLocked(id string) {
	if c := m.byID[id]; c != nil {
		if c.refs--; c.refs <= 0 {
			delete(m.byID, id)
		}
	}
}

// Expire drops the SVIDs that expired (held past expiry only because the
// source could not be reached). The agent calls it every second.
func (m *Manager) Expire() {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	for k, p := range m.pods {
		if p.id == "" {
			continue
		}
		if !p.withdrawAt.IsZero() && !now.Before(p.withdrawAt) {
			m.log.Info("svid withdrawn", "pod", k, "spiffeID", p.id, "reason", p.withdrawWhy)
			m.dropLocked(k, p, p.withdrawWhy)
			continue
		}
		c := m.byID[p.id]
		if c != nil && now.Before(c.svid.Certificates[0].NotAfter) {
			continue
		}
		why := "the SVID expired"
		if p.lastErr != "" {
			why += " while the source was unavailable: " + p.lastErr
		}
		m.log.Warn("svid expired", "pod", k, "spiffeID", p.id)
		m.dropLocked(k, p, why)
	}
}

// IssuedID returns the SPIFFE ID of the SVID the pod holds.
func (m *Manager) IssuedID(key string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pods[key]
	if p == nil || p.id == "" {
		return "", false
	}
	return p.id, true
}

// SVID returns the pod's SVID (shared per SPIFFE ID; never modify it).
func (m *Manager) SVID(key string) (*x509svid.SVID, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pods[key]
	if p == nil || p.id == "" {
		return nil, false
	}
	c := m.byID[p.id]
	if c == nil {
		return nil, false
	}
	return c.svid, true
}

// Bundles returns the latest trust bundles (nil before the first).
func (m *Manager) Bundles() *x509bundle.Set {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bundles
}

// PodSVID describes one pod's SVID state for the API.
type PodSVID struct {
	Key       string
	SPIFFEID  string
	Serial    string
	NotBefore time.Time
	NotAfter  time.Time
	// Reason says why the pod holds no SVID; LastError is the source's
	// last error while it holds one.
	Reason    string
	LastError string
	// Chain is the SVID's certificate chain, leaf first (public).
	Chain []*x509.Certificate
}

// Pods lists every followed pod, by key.
func (m *Manager) Pods() []PodSVID {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]PodSVID, 0, len(m.pods))
	for _, k := range slices.Sorted(maps.Keys(m.pods)) {
		p := m.pods[k]
		ps := PodSVID{Key: k, SPIFFEID: p.id, Serial: p.serial, Reason: p.reason, LastError: p.lastErr}
		if c := m.byID[p.id]; p.id != "" && c != nil {
			leaf := c.svid.Certificates[0]
			ps.NotBefore, ps.NotAfter, ps.Chain = leaf.NotBefore, leaf.NotAfter, c.svid.Certificates
			// The pod's own serial may be older than the cached newest.
			ps.Serial = hex.EncodeToString(leaf.SerialNumber.Bytes())
		}
		out = append(out, ps)
	}
	return out
}

// Stats are the numbers the metrics export.
type Stats struct {
	// Held counts distinct SVIDs held (per SPIFFE ID); Pods the pods with one.
	Held, Pods, Followed int
	EarliestExpiry       time.Time
	Rotations            uint64
	Health               identity.SourceHealth
}

// Stats returns the current numbers.
func (m *Manager) Stats() Stats {
	h := m.src.Health()
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Stats{Held: len(m.byID), Followed: len(m.pods), Rotations: m.rotations, Health: h}
	for _, p := range m.pods {
		if p.id != "" {
			st.Pods++
		}
	}
	for _, c := range m.byID {
		if na := c.svid.Certificates[0].NotAfter; st.EarliestExpiry.IsZero() || na.Before(st.EarliestExpiry) {
			st.EarliestExpiry = na
		}
	}
	return st
}

// Close ends every subscription and the source.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	var cancels []func()
	for _, p := range m.pods {
		if p.cancel != nil {
			cancels = append(cancels, p.cancel)
		}
	}
	// Nothing is held once the subscriptions end: Stats must not keep
	// counting SVIDs of pods that are no longer followed.
	m.pods = map[string]*pod{}
	m.byID = map[string]*cached{}
	m.mu.Unlock()
	for _, c := range cancels {
		c()
	}
	m.cancelBundles()
	return m.src.Close()
}
