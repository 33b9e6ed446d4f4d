package devca

import (
	"crypto/ecdsa"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// eventually bounds waits for asynchronous deliveries; generous, the
// machine may be slow.
const eventually = 20 * time.Second

func newTestSource(t *testing.T, lifetime, ttl time.Duration) (*CA, *Source, *fakeClock) {
	t.Helper()
	ca, clock := openAt(t, filepath.Join(t.TempDir(), "ca"), testTD, t0, lifetime)
	src, err := NewSource(ca, SourceOptions{TTL: ttl, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return ca, src, clock
}

func pod(t testing.TB, name, sa string) identity.Workload {
	return identity.Workload{Namespace: "shop", Name: name, UID: "uid-" + name, ServiceAccount: sa,
		Derived: workloadID(t, testTD, "shop", sa)}
}

// recorder subscribes and queues the updates it gets.
func recorder(src *Source, w identity.Workload) (<-chan identity.SVIDUpdate, func()) {
	ch := make(chan identity.SVIDUpdate, 1000)
	cancel := src.Subscribe(w, func(u identity.SVIDUpdate) { ch <- u })
	return ch, cancel
}

func next(t *testing.T, ch <-chan identity.SVIDUpdate) identity.SVIDUpdate {
	t.Helper()
	select {
	case u := <-ch:
		return u
	case <-time.After(eventually):
		t.Fatal("no update")
		return identity.SVIDUpdate{}
	}
}

// await skips updates until one satisfies cond.
func await(t *testing.T, ch <-chan identity.SVIDUpdate, what string, cond func(identity.SVIDUpdate) bool) identity.SVIDUpdate {
	t.Helper()
	deadline := time.After(eventually)
	for {
		select {
		case u := <-ch:
			if cond(u) {
				return u
			}
		case <-deadline:
			t.Fatalf("no update with %s", what)
		}
	}
}

func leafOf(t *testing.T, u identity.SVIDUpdate) *x509svid.SVID {
	t.Helper()
	if u.Err != nil || u.Reason != "" || len(u.SVIDs) != 1 {
		t.Fatalf("update without one svid: err=%v reason=%q svids=%d", u.Err, u.Reason, len(u.SVIDs))
	}
	return u.SVIDs[0]
}

func serial(s *x509svid.SVID) string { return s.Certificates[0].SerialNumber.String() }

func TestSourceFirstUpdateVerifies(t *testing.T) {
	ca, err := Open(filepath.Join(t.TempDir(), "ca"), testTD, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	src, err := NewSource(ca, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = src.Close() }()
	if src.Name() != identity.SourceBuiltin {
		t.Errorf("Name %q", src.Name())
	}

	bundles := make(chan *x509bundle.Set, 1)
	cancelBundles := src.SubscribeBundles(func(s *x509bundle.Set) { bundles <- s })
	defer cancelBundles()
	var set *x509bundle.Set
	select {
	case set = <-bundles:
	case <-time.After(eventually):
		t.Fatal("no bundle")
	}
	if b, ok := set.Get(testTD); !ok || set.Len() != 1 || !b.Equal(ca.Bundle()) {
		t.Fatalf("bundle set of %d, ours present %t", set.Len(), ok)
	}

	w := pod(t, "web-1", "web")
	ch, cancel := recorder(src, w)
	defer cancel()
	svid := leafOf(t, next(t, ch))
	id, _, err := x509svid.Verify(svid.Certificates, set)
	if err != nil {
		t.Fatalf("svid does not verify against the source's bundle: %v", err)
	}
	if id != w.Derived {
		t.Errorf("svid for %s, want %s", id, w.Derived)
	}
	if life := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); life < DefaultTTL || life > DefaultTTL+time.Minute {
		t.Errorf("svid lives %s, want the default ttl %s and the backdating", life, DefaultTTL)
	}
	if h := src.Health(); !h.Connected || h.Name != identity.SourceBuiltin || h.LastError != "" {
		t.Errorf("health %+v", h)
	}
}

func TestSourceRotatesAtHalfLife(t *testing.T) {
	const ttl = time.Hour
	ca, src, clock := newTestSource(t, 0, ttl)
	w := pod(t, "web-1", "web")
	ch, cancel := recorder(src, w)
	defer cancel()
	old := leafOf(t, next(t, ch))

	// Before half-life a newcomer for the same ID still gets the first
	// SVID: nothing rotated yet.
	clock.Advance(ttl/2 - time.Minute)
	peekCh, peekCancel := recorder(src, pod(t, "web-2", "web"))
	if got := leafOf(t, next(t, peekCh)); serial(got) != serial(old) {
		t.Fatalf("rotated before half-life: serial %s, want %s", serial(got), serial(old))
	}
	peekCancel()

	for round := range 4 {
		clock.Advance(2 * time.Minute)
		if round > 0 {
			clock.Advance(ttl/2 - 2*time.Minute)
		}
		fresh := leafOf(t, next(t, ch))
		oldLeaf, freshLeaf := old.Certificates[0], fresh.Certificates[0]
		if serial(fresh) == serial(old) {
			t.Fatalf("round %d: rotation kept serial %s", round, serial(old))
		}
		// The successor was minted around the old one's half-life, long
		// before the old one expired.
		minted := freshLeaf.NotBefore.Add(backdate)
		oldMinted := oldLeaf.NotBefore.Add(backdate)
		if at := minted.Sub(oldMinted); at < ttl*4/10 || at > ttl*6/10 {
			t.Errorf("round %d: rotated %s after the previous mint, want about %s", round, at, ttl/2)
		}
		if !minted.Before(oldLeaf.NotAfter) || !clock.Now().Before(oldLeaf.NotAfter) {
			t.Errorf("round %d: the new svid came after the old one expired", round)
		}
		if _, _, err := x509svid.Verify(fresh.Certificates, ca.Bundle(), x509svid.WithTime(clock.Now())); err != nil {
			t.Fatalf("round %d: rotated svid does not verify: %v", round, err)
		}
		if fresh.PrivateKey.Public().(*ecdsa.PublicKey).Equal(old.PrivateKey.Public()) {
			t.Errorf("round %d: rotation kept the key", round)
		}
		old = fresh
	}
	if n := clock.Pending(); n != 1 {
		t.Errorf("%d timers armed for one identity, want 1", n)
	}
}

func TestSourceShortTTLRotatesOnRealClock(t *testing.T) {
	ca, err := Open(filepath.Join(t.TempDir(), "ca"), testTD, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 3 * time.Second
	src, err := NewSource(ca, SourceOptions{TTL: ttl, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = src.Close() }()
	ch, cancel := recorder(src, pod(t, "web-1", "web"))
	defer cancel()

	var got []*x509svid.SVID
	for len(got) < 3 {
		s := leafOf(t, next(t, ch))
		if len(got) > 0 && serial(s) == serial(got[len(got)-1]) {
			t.Fatalf("update repeats serial %s", serial(s))
		}
		got = append(got, s)
	}
	for i := 1; i < len(got); i++ {
		prev, cur := got[i-1].Certificates[0], got[i].Certificates[0]
		if !cur.NotAfter.After(prev.NotAfter) {
			t.Errorf("svid %d ends %s, not after its predecessor's %s", i, cur.NotAfter, prev.NotAfter)
		}
		// Minted (NotBefore + backdate, whole seconds) before the
		// predecessor expired.
		if !cur.NotBefore.Add(backdate).Before(prev.NotAfter) {
			t.Errorf("svid %d minted after its predecessor expired", i)
		}
		if _, _, err := x509svid.Verify(got[i].Certificates, ca.Bundle(), x509svid.WithTime(cur.NotBefore.Add(backdate))); err != nil {
			t.Errorf("svid %d: %v", i, err)
		}
	}
}

func TestSourceSharesSVIDPerIdentity(t *testing.T) {
	_, src, clock := newTestSource(t, 0, time.Hour)
	chA, cancelA := recorder(src, pod(t, "web-1", "web"))
	chB, cancelB := recorder(src, pod(t, "web-2", "web"))
	chC, cancelC := recorder(src, pod(t, "db-1", "db"))
	a, b, c := leafOf(t, next(t, chA)), leafOf(t, next(t, chB)), leafOf(t, next(t, chC))
	if a != b {
		t.Errorf("two pods of one service account got two svids (serials %s, %s), want one shared", serial(a), serial(b))
	}
	if serial(c) == serial(a) || c.ID == a.ID {
		t.Error("another service account got the same svid")
	}
	if n := clock.Pending(); n != 2 {
		t.Errorf("%d rotation timers for two identities, want 2", n)
	}

	// One rotation serves both subscribers of an identity.
	clock.Advance(31 * time.Minute)
	ra, rb := leafOf(t, next(t, chA)), leafOf(t, next(t, chB))
	if ra != rb || serial(ra) == serial(a) {
		t.Errorf("after rotation: shared=%t, rotated=%t", ra == rb, serial(ra) != serial(a))
	}
	leafOf(t, next(t, chC))

	cancelA()
	if n := clock.Pending(); n != 2 {
		t.Errorf("after one of two subscribers left: %d timers, want 2", n)
	}
	cancelB()
	if n := clock.Pending(); n != 1 {
		t.Errorf("after the last subscriber of an identity left: %d timers, want 1", n)
	}
	cancelC()
	cancelC() // cancel is idempotent
	if n := clock.Pending(); n != 0 {
		t.Errorf("after every subscriber left: %d timers, want 0", n)
	}

	// The cache entry went with its last subscriber: a new one mints afresh.
	chD, cancelD := recorder(src, pod(t, "web-3", "web"))
	defer cancelD()
	if d := leafOf(t, next(t, chD)); serial(d) == serial(ra) {
		t.Error("a released identity's svid was served again")
	}
}

func TestSourceRefusesIDsItCannotIssue(t *testing.T) {
	_, src, clock := newTestSource(t, 0, time.Hour)
	for _, tt := range []struct {
		name   string
		id     spiffeid.ID
		reason string
	}{
		{"no derived id", spiffeid.ID{}, "has no spiffe id"},
		{"other trust domain", workloadID(t, otherTD, "shop", "web"), `outside trust domain "example.org"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w := pod(t, "web-1", "web")
			w.Derived = tt.id
			ch, cancel := recorder(src, w)
			defer cancel()
			u := next(t, ch)
			if len(u.SVIDs) != 0 || u.Err != nil || !strings.Contains(u.Reason, tt.reason) {
				t.Errorf("update %d svids, err %v, reason %q; want none, nil, %q", len(u.SVIDs), u.Err, u.Reason, tt.reason)
			}
			if n := clock.Pending(); n != 0 {
				t.Errorf("%d timers armed for a refused workload", n)
			}
		})
	}
}

func TestSourceCancelWaitsForCallback(t *testing.T) {
	_, src, clock := newTestSource(t, 0, time.Hour)
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	cancel := src.Subscribe(pod(t, "web-1", "web"), func(identity.SVIDUpdate) {
		if calls.Add(1) == 1 {
			close(entered)
			<-release
		}
	})
	<-entered
	clock.Advance(31 * time.Minute) // a rotation queues a second update

	cancelled := make(chan struct{})
	go func() {
		cancel()
		close(cancelled)
	}()
	select {
	case <-cancelled:
		t.Fatal("cancel returned while a callback was running")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	select {
	case <-cancelled:
	case <-time.After(eventually):
		t.Fatal("cancel did not return after the callback did")
	}
	after := calls.Load()
	clock.Advance(3 * time.Hour)
	time.Sleep(50 * time.Millisecond)
	if n := calls.Load(); n != after || n != 1 {
		t.Errorf("%d callbacks, want 1: the queued rotation was delivered after cancel", n)
	}
	if n := clock.Pending(); n != 0 {
		t.Errorf("%d timers after cancel", n)
	}
}

// TestSourceNoCallbackAfterCancel races subscriptions, rotations and
// cancels; run it with -race.
func TestSourceNoCallbackAfterCancel(t *testing.T) {
	_, src, clock := newTestSource(t, 0, time.Hour)
	stop := make(chan struct{})
	var ticker sync.WaitGroup
	ticker.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				clock.Advance(10 * time.Minute)
				time.Sleep(time.Millisecond)
			}
		}
	})

	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 25 {
				w := pod(t, "p", []string{"web", "db", "cache"}[(g+i)%3])
				var returned atomic.Bool
				got := make(chan struct{}, 1)
				cancel := src.Subscribe(w, func(u identity.SVIDUpdate) {
					if returned.Load() {
						t.Error("callback after cancel returned")
					}
					if len(u.SVIDs) != 1 {
						t.Errorf("update without svid: %+v", u)
					}
					select {
					case got <- struct{}{}:
					default:
					}
				})
				if i%2 == 0 {
					<-got // sometimes cancel after delivery, sometimes before
				}
				cancel()
				returned.Store(true)
			}
		})
	}
	wg.Wait()
	close(stop)
	ticker.Wait()
	clock.Advance(3 * time.Hour)
	if n := clock.Pending(); n != 0 {
		t.Errorf("%d timers armed with no subscriber", n)
	}
}

func TestSourceClose(t *testing.T) {
	_, src, clock := newTestSource(t, 0, time.Hour)
	var closed atomic.Bool
	var calls atomic.Int32
	cancel := src.Subscribe(pod(t, "web-1", "web"), func(identity.SVIDUpdate) {
		calls.Add(1)
		if closed.Load() {
			t.Error("callback after Close returned")
		}
	})
	cancelBundles := src.SubscribeBundles(func(*x509bundle.Set) {
		if closed.Load() {
			t.Error("bundle callback after Close returned")
		}
	})
	deadline := time.Now().Add(eventually)
	for calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	closed.Store(true)
	if n := clock.Pending(); n != 0 {
		t.Errorf("%d timers after Close", n)
	}
	clock.Advance(3 * time.Hour)
	cancel()
	cancelBundles()
	if err := src.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	late := src.Subscribe(pod(t, "web-2", "web"), func(identity.SVIDUpdate) { t.Error("update after Close") })
	late()
	lateBundles := src.SubscribeBundles(func(*x509bundle.Set) { t.Error("bundle after Close") })
	lateBundles()
	time.Sleep(50 * time.Millisecond)
	if !src.Health().Connected {
		t.Error("closed builtin source reports disconnected")
	}
}

func TestSourceReportsExpiredCA(t *testing.T) {
	ca, src, clock := newTestSource(t, 2*time.Hour, time.Hour)
	ch, cancel := recorder(src, pod(t, "web-1", "web"))
	defer cancel()
	leafOf(t, next(t, ch))

	// Close to the CA's end, the SVID is capped at it.
	clock.Advance(80 * time.Minute)
	await(t, ch, "an svid capped at the ca's expiry", func(u identity.SVIDUpdate) bool {
		return len(u.SVIDs) == 1 && u.SVIDs[0].Certificates[0].NotAfter.Equal(ca.NotAfter())
	})

	clock.Advance(time.Hour)
	u := await(t, ch, "an error", func(u identity.SVIDUpdate) bool { return u.Err != nil })
	if !errors.Is(u.Err, identity.ErrSourceUnavailable) || !errors.Is(u.Err, ErrExpired) || len(u.SVIDs) != 0 {
		t.Errorf("update after the ca expired: err %v, %d svids", u.Err, len(u.SVIDs))
	}
	// Retries that fail again tell the subscriber nothing new.
	clock.Advance(10 * time.Minute)
	time.Sleep(50 * time.Millisecond)
	if n := len(ch); n != 0 {
		t.Errorf("%d more updates from failed retries, want none", n)
	}
	if n := clock.Pending(); n != 1 {
		t.Errorf("%d timers after the ca expired, want the retry", n)
	}
	h := src.Health()
	if !h.Connected || !strings.Contains(h.LastError, "expired") {
		t.Errorf("health %+v, want connected with the expiry as last error", h)
	}
	// A newcomer gets the error too, not the expired SVID.
	late, lateCancel := recorder(src, pod(t, "web-2", "web"))
	defer lateCancel()
	if u := next(t, late); u.Err == nil || len(u.SVIDs) != 0 {
		t.Errorf("newcomer after expiry: err %v, %d svids", u.Err, len(u.SVIDs))
	}
}

func TestNewSourceRefusesBadTTL(t *testing.T) {
	ca, _ := openAt(t, filepath.Join(t.TempDir(), "ca"), testTD, t0, 0)
	if _, err := NewSource(ca, SourceOptions{TTL: 10 * time.Millisecond}); !errors.Is(err, ErrBadTTL) {
		t.Errorf("ttl 10ms: %v, want %v", err, ErrBadTTL)
	}
	if _, err := NewSource(nil, SourceOptions{}); err == nil {
		t.Error("source without a ca")
	}
}
