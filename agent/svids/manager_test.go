package svids

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/identity/devca"
)

// fakeSource is an identity.SVIDSource the test drives by hand: it records
// each subscription, and the test calls a subscription's callback itself.
type fakeSource struct {
	mu              sync.Mutex
	subs            []*fakeSub
	bundles         []func(*x509bundle.Set)
	closed          bool
	bundleCancelled bool
}

type fakeSub struct {
	w  identity.Workload
	fn func(identity.SVIDUpdate)

	mu        sync.Mutex
	cancelled bool
}

func (s *fakeSub) isCancelled() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cancelled
}

func (f *fakeSource) Name() string { return "fake" }

func (f *fakeSource) Subscribe(w identity.Workload, fn func(identity.SVIDUpdate)) func() {
	sub := &fakeSub{w: w, fn: fn}
	f.mu.Lock()
	f.subs = append(f.subs, sub)
	f.mu.Unlock()
	return func() {
		sub.mu.Lock()
		sub.cancelled = true
		sub.mu.Unlock()
	}
}

func (f *fakeSource) SubscribeBundles(fn func(*x509bundle.Set)) func() {
	f.mu.Lock()
	f.bundles = append(f.bundles, fn)
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		f.bundleCancelled = true
		f.mu.Unlock()
	}
}

func (f *fakeSource) Health() identity.SourceHealth {
	return identity.SourceHealth{Name: "fake", Connected: true}
}

func (f *fakeSource) Close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	return nil
}

// live returns the subscriptions of pod ns/name that are not cancelled.
func (f *fakeSource) live(key string) []*fakeSub {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*fakeSub
	for _, s := range f.subs {
		if s.w.Namespace+"/"+s.w.Name == key && !s.isCancelled() {
			out = append(out, s)
		}
	}
	return out
}

// sub returns the one live subscription of a pod.
func (f *fakeSource) sub(t *testing.T, key string) *fakeSub {
	t.Helper()
	l := f.live(key)
	if len(l) != 1 {
		t.Fatalf("pod %s has %d live subscriptions, want 1", key, len(l))
	}
	return l[0]
}

// logRecords is a slog.Handler that keeps every record.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecords) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h *logRecords) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecords) WithGroup(string) slog.Handler      { return h }

// count returns how many records have a message containing msg.
func (h *logRecords) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.recs {
		if strings.Contains(r.Message, msg) {
			n++
		}
	}
	return n
}

// clock is a settable Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

type fixture struct {
	t   *testing.T
	src *fakeSource
	m   *Manager
	ca  *devca.CA
	clk *clock
	log *logRecords
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ca, err := devca.Open(t.TempDir(), td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, src: &fakeSource{}, ca: ca, clk: &clock{t: time.Now()}, log: &logRecords{}}
	f.m = New(Config{Source: f.src, Logger: slog.New(f.log), Now: f.clk.Now})
	t.Cleanup(func() { _ = f.m.Close() })
	return f
}

func workload(ns, name, sa, uid string) identity.Workload {
	id, err := identity.Labels{Namespace: ns, ServiceAccount: sa}.Derived(td.Name())
	if err != nil {
		panic(err)
	}
	return identity.Workload{Namespace: ns, Name: name, UID: uid, ServiceAccount: sa, Derived: id}
}

func (f *fixture) mint(id spiffeid.ID, ttl time.Duration) *x509svid.SVID {
	f.t.Helper()
	s, err := f.ca.Mint(id, ttl)
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

func serialOf(s *x509svid.SVID) string {
	return hex.EncodeToString(s.Certificates[0].SerialNumber.Bytes())
}

func (f *fixture) podState(key string) PodSVID {
	f.t.Helper()
	for _, p := range f.m.Pods() {
		if p.Key == key {
			return p
		}
	}
	f.t.Fatalf("pod %s is not followed", key)
	return PodSVID{}
}

// changed reports whether Changed was signalled, without waiting.
func (f *fixture) changed() bool {
	select {
	case <-f.m.Changed():
		return true
	default:
		return false
	}
}

func TestFirstSVIDSetsIssuedIDAndMarksDirty(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("IssuedID before any SVID")
	}
	if p := f.podState("shop/web"); !strings.Contains(p.Reason, "waiting for the fake source") {
		t.Fatalf("reason before the first update = %q", p.Reason)
	}
	sub := f.src.sub(t, "shop/web")
	if sub.w != w {
		t.Fatalf("subscribed %+v, want %+v", sub.w, w)
	}
	s := f.mint(w.Derived, time.Hour)
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})

	id, ok := f.m.IssuedID("shop/web")
	if !ok || id != w.Derived.String() {
		t.Fatalf("IssuedID = %q, %t; want %s", id, ok, w.Derived)
	}
	if got, ok := f.m.SVID("shop/web"); !ok || got != s {
		t.Fatalf("SVID = %v, %t; want the sent one", got, ok)
	}
	if !f.changed() {
		t.Fatal("Changed not signalled for the first SVID")
	}
	if d := f.m.TakeDirty(); !slices.Equal(d, []string{"shop/web"}) {
		t.Fatalf("TakeDirty = %v", d)
	}
	if d := f.m.TakeDirty(); len(d) != 0 {
		t.Fatalf("second TakeDirty = %v, want none", d)
	}
	p := f.podState("shop/web")
	if p.Serial != serialOf(s) || p.Reason != "" || len(p.Chain) != 1 || !p.NotAfter.Equal(s.Certificates[0].NotAfter) {
		t.Fatalf("pod state = %+v", p)
	}
	st := f.m.Stats()
	if st.Held != 1 || st.Pods != 1 || st.Followed != 1 || !st.EarliestExpiry.Equal(s.Certificates[0].NotAfter) {
		t.Fatalf("stats = %+v", st)
	}
}

func TestRotationKeepsIDWithoutDirty(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	f.m.TakeDirty()
	f.changed()

	// Longer TTL, so the rotated SVID is the newer one.
	s2 := f.mint(w.Derived, 2*time.Hour)
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s2}})
	if st := f.m.Stats(); st.Rotations != 1 || st.Held != 1 {
		t.Fatalf("stats after rotation = %+v", st)
	}
	if f.changed() {
		t.Fatal("Changed signalled for a rotation")
	}
	if d := f.m.TakeDirty(); len(d) != 0 {
		t.Fatalf("TakeDirty after rotation = %v", d)
	}
	if p := f.podState("shop/web"); p.Serial != serialOf(s2) {
		t.Fatalf("serial = %s, want the rotated %s", p.Serial, serialOf(s2))
	}
	// The same SVID again is no rotation.
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s2}})
	if st := f.m.Stats(); st.Rotations != 1 {
		t.Fatalf("rotations after a repeated SVID = %d, want 1", st.Rotations)
	}
}

func TestWithdrawnSVIDIsDropped(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	f.m.TakeDirty()

	sub.fn(identity.SVIDUpdate{Reason: "registration entry deleted"})
	if id, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatalf("IssuedID after withdrawal = %q", id)
	}
	if _, ok := f.m.SVID("shop/web"); ok {
		t.Fatal("SVID after withdrawal")
	}
	if d := f.m.TakeDirty(); !slices.Equal(d, []string{"shop/web"}) {
		t.Fatalf("TakeDirty = %v", d)
	}
	p := f.podState("shop/web")
	if p.Reason != "registration entry deleted" || p.SPIFFEID != "" || p.Serial != "" {
		t.Fatalf("pod state = %+v", p)
	}
	if st := f.m.Stats(); st.Held != 0 || st.Pods != 0 || st.Followed != 1 {
		t.Fatalf("stats = %+v", st)
	}
	if f.log.count("svid withdrawn") != 1 {
		t.Fatal("withdrawal not logged")
	}
}

func TestErrorKeepsHeldSVID(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	s := f.mint(w.Derived, time.Hour)
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	f.m.TakeDirty()

	sub.fn(identity.SVIDUpdate{Err: fmt.Errorf("dial spire: %w", identity.ErrSourceUnavailable)})
	if id, ok := f.m.IssuedID("shop/web"); !ok || id != w.Derived.String() {
		t.Fatalf("IssuedID after an error = %q, %t", id, ok)
	}
	if d := f.m.TakeDirty(); len(d) != 0 {
		t.Fatalf("TakeDirty after an error = %v", d)
	}
	p := f.podState("shop/web")
	if !strings.Contains(p.LastError, "dial spire") || p.Serial != serialOf(s) {
		t.Fatalf("pod state = %+v", p)
	}
	// A good update clears the error.
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	if p := f.podState("shop/web"); p.LastError != "" {
		t.Fatalf("LastError after recovery = %q", p.LastError)
	}
}

func TestErrorBeforeAnySVIDIsTheReason(t *testing.T) {
	f := newFixture(t)
	f.m.Sync(map[string]identity.Workload{"shop/web": workload("shop", "web", "web-sa", "u1")}, nil)
	f.src.sub(t, "shop/web").fn(identity.SVIDUpdate{Err: errors.New("connection refused")})
	if p := f.podState("shop/web"); !strings.Contains(p.Reason, "connection refused") {
		t.Fatalf("reason = %q", p.Reason)
	}
}

func TestExpireDropsExpiredSVID(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	s := f.mint(w.Derived, time.Hour)
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	f.m.TakeDirty()
	sub.fn(identity.SVIDUpdate{Err: errors.New("spire agent unreachable")})

	notAfter := s.Certificates[0].NotAfter
	f.clk.set(notAfter.Add(-time.Second))
	f.m.Expire()
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("Expire dropped an SVID before its expiry")
	}
	f.clk.set(notAfter)
	f.m.Expire()
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("Expire kept an expired SVID")
	}
	if d := f.m.TakeDirty(); !slices.Equal(d, []string{"shop/web"}) {
		t.Fatalf("TakeDirty = %v", d)
	}
	p := f.podState("shop/web")
	if !strings.Contains(p.Reason, "expired") || !strings.Contains(p.Reason, "spire agent unreachable") {
		t.Fatalf("reason = %q, want the expiry and the source error", p.Reason)
	}
	if st := f.m.Stats(); st.Held != 0 || st.Pods != 0 {
		t.Fatalf("stats = %+v", st)
	}
}

func TestExpiredSVIDFromSourceIsRefused(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	s := f.mint(w.Derived, time.Hour)
	f.clk.set(s.Certificates[0].NotAfter.Add(time.Minute))
	f.src.sub(t, "shop/web").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("an expired SVID was taken")
	}
	if p := f.podState("shop/web"); !strings.Contains(p.Reason, "expired") {
		t.Fatalf("reason = %q", p.Reason)
	}
}

func TestPodsWithOneIDShareOneSVID(t *testing.T) {
	f := newFixture(t)
	a, b := workload("shop", "web-1", "web-sa", "u1"), workload("shop", "web-2", "web-sa", "u2")
	f.m.Sync(map[string]identity.Workload{"shop/web-1": a, "shop/web-2": b}, nil)
	s := f.mint(a.Derived, time.Hour)
	f.src.sub(t, "shop/web-1").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	f.src.sub(t, "shop/web-2").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	if st := f.m.Stats(); st.Held != 1 || st.Pods != 2 || st.Followed != 2 {
		t.Fatalf("stats = %+v, want Held 1, Pods 2", st)
	}
	if d := f.m.TakeDirty(); !slices.Equal(d, []string{"shop/web-1", "shop/web-2"}) {
		t.Fatalf("TakeDirty = %v", d)
	}

	// A rotation delivered to both pods is one rotation of one SVID.
	s2 := f.mint(a.Derived, 2*time.Hour)
	f.src.sub(t, "shop/web-1").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s2}})
	f.src.sub(t, "shop/web-2").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s2}})
	if st := f.m.Stats(); st.Rotations != 1 || st.Held != 1 {
		t.Fatalf("stats after a shared rotation = %+v, want 1 rotation", st)
	}

	// Releasing one pod (its entry deleted) keeps the other's.
	f.src.sub(t, "shop/web-1").fn(identity.SVIDUpdate{Reason: "entry deleted"})
	if _, ok := f.m.IssuedID("shop/web-1"); ok {
		t.Fatal("web-1 kept its SVID")
	}
	if got, ok := f.m.SVID("shop/web-2"); !ok || got != s2 {
		t.Fatalf("web-2 SVID = %v, %t; want the shared rotated one", got, ok)
	}
	if st := f.m.Stats(); st.Held != 1 || st.Pods != 1 {
		t.Fatalf("stats after releasing one = %+v", st)
	}

	// Removing the other releases the SVID.
	f.m.Sync(map[string]identity.Workload{"shop/web-1": a}, nil)
	if st := f.m.Stats(); st.Held != 0 || st.Pods != 0 || st.Followed != 1 {
		t.Fatalf("stats after removing web-2 = %+v", st)
	}
}

func TestSyncRemovingPodCancelsAndDrops(t *testing.T) {
	f := newFixture(t)
	a, b := workload("shop", "web-1", "web-sa", "u1"), workload("shop", "web-2", "web-sa", "u2")
	f.m.Sync(map[string]identity.Workload{"shop/web-1": a, "shop/web-2": b}, nil)
	s := f.mint(a.Derived, time.Hour)
	f.src.sub(t, "shop/web-1").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	subB := f.src.sub(t, "shop/web-2")
	subB.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})

	f.m.Sync(map[string]identity.Workload{"shop/web-1": a}, nil)
	if !subB.isCancelled() {
		t.Fatal("web-2's subscription was not cancelled")
	}
	if f.src.sub(t, "shop/web-1").isCancelled() {
		t.Fatal("web-1's subscription was cancelled")
	}
	if _, ok := f.m.IssuedID("shop/web-2"); ok {
		t.Fatal("a removed pod has an issued ID")
	}
	for _, p := range f.m.Pods() {
		if p.Key == "shop/web-2" {
			t.Fatal("a removed pod is still listed")
		}
	}
	if id, ok := f.m.IssuedID("shop/web-1"); !ok || id != a.Derived.String() {
		t.Fatalf("web-1 IssuedID = %q, %t", id, ok)
	}
	if st := f.m.Stats(); st.Held != 1 || st.Pods != 1 || st.Followed != 1 {
		t.Fatalf("stats = %+v", st)
	}
	// An unchanged Sync subscribes nothing anew.
	f.m.Sync(map[string]identity.Workload{"shop/web-1": a}, nil)
	f.src.mu.Lock()
	n := len(f.src.subs)
	f.src.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d subscriptions after an unchanged Sync, want 2", n)
	}
}

func TestSyncChangedWorkloadResubscribes(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	old := f.src.sub(t, "shop/web")
	old.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	f.m.TakeDirty()

	// The pod was recreated under the same name with another service account.
	w2 := workload("shop", "web", "other-sa", "u2")
	f.m.Sync(map[string]identity.Workload{"shop/web": w2}, nil)
	if !old.isCancelled() {
		t.Fatal("the old subscription was not cancelled")
	}
	cur := f.src.sub(t, "shop/web")
	if cur.w != w2 {
		t.Fatalf("resubscribed with %+v, want %+v", cur.w, w2)
	}
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("the old workload's SVID was kept")
	}
	if d := f.m.TakeDirty(); !slices.Equal(d, []string{"shop/web"}) {
		t.Fatalf("TakeDirty = %v", d)
	}

	// A stale update of the cancelled subscription is ignored...
	old.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if id, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatalf("a stale update set IssuedID %q", id)
	}
	// ...while the new one's counts.
	cur.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w2.Derived, time.Hour)}})
	if id, ok := f.m.IssuedID("shop/web"); !ok || id != w2.Derived.String() {
		t.Fatalf("IssuedID = %q, %t; want %s", id, ok, w2.Derived)
	}
	// A stale withdrawal or error does not touch the new SVID either.
	old.fn(identity.SVIDUpdate{Reason: "entry deleted"})
	old.fn(identity.SVIDUpdate{Err: errors.New("stale")})
	p := f.podState("shop/web")
	if p.SPIFFEID != w2.Derived.String() || p.LastError != "" {
		t.Fatalf("pod state after stale updates = %+v", p)
	}
}

func TestStaleUpdateAfterRemovalIgnored(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	old := f.src.sub(t, "shop/web")
	f.m.Sync(nil, nil)
	old.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if st := f.m.Stats(); st.Held != 0 || st.Followed != 0 {
		t.Fatalf("stats after a stale update = %+v", st)
	}
	// The pod returns under the same key: a new subscription, which counts.
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	old.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("the first subscription's update counted for the returned pod")
	}
	f.src.sub(t, "shop/web").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("the returned pod's own update did not count")
	}
}

func TestIssuedIDOtherThanDerivedLoggedOnce(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	custom := spiffeid.RequireFromString("spiffe://cluster.local/custom/web")
	const msg = "other than the derived one"

	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(custom, time.Hour)}})
	if id, ok := f.m.IssuedID("shop/web"); !ok || id != custom.String() {
		t.Fatalf("IssuedID = %q, %t; want %s", id, ok, custom)
	}
	if n := f.log.count(msg); n != 1 {
		t.Fatalf("logged the differing ID %d times, want 1", n)
	}
	// Rotation, withdrawal and reissue of the same ID: still once.
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(custom, 2*time.Hour)}})
	sub.fn(identity.SVIDUpdate{Reason: "entry deleted"})
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(custom, time.Hour)}})
	if n := f.log.count(msg); n != 1 {
		t.Fatalf("logged the differing ID %d times after reissue, want 1", n)
	}
	// The derived ID is never logged as differing.
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if n := f.log.count(msg); n != 1 {
		t.Fatalf("logged %d times after the derived ID, want 1", n)
	}
	// Another differing ID is news.
	custom2 := spiffeid.RequireFromString("spiffe://cluster.local/custom/web2")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(custom2, time.Hour)}})
	if n := f.log.count(msg); n != 2 {
		t.Fatalf("logged %d times after a second differing ID, want 2", n)
	}
	// A new pod under the same key is logged afresh.
	f.m.Sync(nil, nil)
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	f.src.sub(t, "shop/web").fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(custom2, time.Hour)}})
	if n := f.log.count(msg); n != 3 {
		t.Fatalf("logged %d times for a new pod with the last logged ID, want 3", n)
	}
}

func TestBundlesAndClose(t *testing.T) {
	f := newFixture(t)
	if f.m.Bundles() != nil {
		t.Fatal("bundles before the first update")
	}
	set := x509bundle.NewSet(f.ca.Bundle())
	f.src.mu.Lock()
	fns := slices.Clone(f.src.bundles)
	f.src.mu.Unlock()
	if len(fns) != 1 {
		t.Fatalf("%d bundle subscriptions, want 1", len(fns))
	}
	fns[0](set)
	if f.m.Bundles() != set {
		t.Fatal("Bundles is not the latest set")
	}

	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	if err := f.m.Close(); err != nil {
		t.Fatal(err)
	}
	f.src.mu.Lock()
	closed, bc := f.src.closed, f.src.bundleCancelled
	f.src.mu.Unlock()
	if !sub.isCancelled() || !closed || !bc {
		t.Fatalf("after Close: sub cancelled %t, source closed %t, bundles cancelled %t", sub.isCancelled(), closed, bc)
	}
	if st := f.m.Stats(); st.Held != 0 || st.Followed != 0 {
		t.Fatalf("stats after Close = %+v", st)
	}
	// Sync after Close subscribes nothing.
	f.m.Sync(map[string]identity.Workload{"shop/other": w}, nil)
	if l := f.src.live("shop/other"); len(l) != 0 {
		t.Fatal("Sync after Close subscribed")
	}
}

// TestConcurrentUse runs updates, Syncs and readers at once; it checks
// nothing but consistency at the end and is meant for -race.
func TestConcurrentUse(t *testing.T) {
	f := newFixture(t)
	keys := []string{"shop/a", "shop/b", "shop/c"}
	want := map[string]identity.Workload{}
	for i, k := range keys {
		want[k] = workload("shop", k[len("shop/"):], "sa", fmt.Sprint(i))
	}
	f.m.Sync(want, nil)
	svids := []*x509svid.SVID{f.mint(want["shop/a"].Derived, time.Hour), f.mint(want["shop/a"].Derived, 2*time.Hour)}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for _, k := range keys {
		sub := f.src.sub(t, k)
		wg.Go(func() {
			for i := 0; i < 200; i++ {
				switch i % 4 {
				case 0, 1:
					sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{svids[i%2]}})
				case 2:
					sub.fn(identity.SVIDUpdate{Err: errors.New("flaky")})
				case 3:
					sub.fn(identity.SVIDUpdate{Reason: "gone"})
				}
			}
		})
	}
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				f.m.Sync(map[string]identity.Workload{"shop/a": want["shop/a"]}, nil)
			} else {
				f.m.Sync(want, nil)
			}
		}
	})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-f.m.Changed():
				f.m.TakeDirty()
			default:
				f.m.Expire()
				_ = f.m.Stats()
				_ = f.m.Pods()
				f.m.IssuedID("shop/b")
			}
		}
	})
	time.Sleep(50 * time.Millisecond)
	close(stop)
	wg.Wait()

	// Every held SVID is counted by its pods.
	f.m.Sync(want, nil)
	st := f.m.Stats()
	held := 0
	for _, p := range f.m.Pods() {
		if p.SPIFFEID != "" {
			held++
		}
	}
	if st.Pods != held || st.Held > 1 || (held > 0) != (st.Held == 1) {
		t.Fatalf("inconsistent stats %+v with %d pods holding", st, held)
	}
}

func TestSVIDWithoutCertificateIsRefused(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	for _, bad := range []*x509svid.SVID{nil, {ID: w.Derived}} {
		sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{bad}})
		if _, ok := f.m.IssuedID("shop/web"); ok {
			t.Fatalf("IssuedID kept after an SVID without a certificate (%v)", bad)
		}
		if p := f.podState("shop/web"); !strings.Contains(p.Reason, "without a certificate") {
			t.Fatalf("reason = %q", p.Reason)
		}
	}
}

// Right after an outage a restarted SPIRE agent may answer with nothing
// before it mints the SVID again: the held SVID stays while that settles, and
// an SVID that arrives in time keeps the pod's identity without a flap. An
// empty answer that is still the answer after the settle period withdraws
// it; outside recovery one withdraws it at once (TestWithdrawnSVIDIsDropped).
func TestEmptyAfterOutageSettles(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	s := f.mint(w.Derived, time.Hour)
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	f.m.TakeDirty()

	// Outage, reconnect with an empty answer, then the SVID again.
	sub.fn(identity.SVIDUpdate{Err: fmt.Errorf("eof: %w", identity.ErrSourceUnavailable)})
	sub.fn(identity.SVIDUpdate{Reason: "no registration entry matches"})
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("an empty answer right after an outage dropped the held SVID at once")
	}
	f.clk.set(f.clk.Now().Add(ReconnectSettle / 2))
	f.m.Expire()
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	f.clk.set(f.clk.Now().Add(ReconnectSettle))
	f.m.Expire()
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("the SVID that came back in time was dropped by the pending withdrawal")
	}
	if d := f.m.TakeDirty(); len(d) != 0 {
		t.Fatalf("the pod's identity flapped: dirty %v", d)
	}

	// Another outage, and this time the entry is really gone.
	sub.fn(identity.SVIDUpdate{Err: fmt.Errorf("eof: %w", identity.ErrSourceUnavailable)})
	sub.fn(identity.SVIDUpdate{Reason: "no registration entry matches"})
	f.clk.set(f.clk.Now().Add(ReconnectSettle - time.Second))
	f.m.Expire()
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("withdrawn before the settle period ended")
	}
	f.clk.set(f.clk.Now().Add(time.Second))
	f.m.Expire()
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("an empty answer that lasted the settle period did not withdraw the SVID")
	}
	if p := f.podState("shop/web"); p.Reason != "no registration entry matches" {
		t.Fatalf("reason %q", p.Reason)
	}
	// Recovered: the next empty answer withdraws at once again.
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{s}})
	sub.fn(identity.SVIDUpdate{Reason: "deleted"})
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("an empty answer outside recovery did not withdraw at once")
	}
}

// A local pod whose metadata is not known yet is listed with the reason and
// not asked for; once it is known it is subscribed.
func TestWaitingPodIsNotSubscribed(t *testing.T) {
	f := newFixture(t)
	f.m.Sync(nil, map[string]string{"shop/web": "waiting for the pod in the store"})
	if l := f.src.live("shop/web"); len(l) != 0 {
		t.Fatalf("a waiting pod was subscribed %d times", len(l))
	}
	if p := f.podState("shop/web"); p.Reason != "waiting for the pod in the store" {
		t.Fatalf("reason %q", p.Reason)
	}
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	if sub.w != w {
		t.Fatalf("subscribed %+v, want %+v", sub.w, w)
	}
}

// An answer the source could not read is no outage: it keeps the held SVID,
// and a withdrawal that follows it takes effect at once, without the settle
// period that follows a real outage.
func TestMalformedUpdateIsNoOutage(t *testing.T) {
	f := newFixture(t)
	w := workload("shop", "web", "web-sa", "u1")
	f.m.Sync(map[string]identity.Workload{"shop/web": w}, nil)
	sub := f.src.sub(t, "shop/web")
	sub.fn(identity.SVIDUpdate{SVIDs: []*x509svid.SVID{f.mint(w.Derived, time.Hour)}})
	sub.fn(identity.SVIDUpdate{Err: fmt.Errorf("%w: %w: svid 0: bad key", identity.ErrSourceUnavailable, identity.ErrMalformedUpdate)})
	if _, ok := f.m.IssuedID("shop/web"); !ok {
		t.Fatal("a malformed answer dropped the held SVID")
	}
	sub.fn(identity.SVIDUpdate{Reason: "entry deleted"})
	if _, ok := f.m.IssuedID("shop/web"); ok {
		t.Fatal("a withdrawal after a malformed answer waited for the reconnect settle period")
	}
}
