package spire

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/bulkhead-io/bulkhead/identity"
)

// Generous: the machine running the tests may be slow.
const waitTimeout = 60 * time.Second

// fakeAgent is an in-process Delegated Identity API server on a unix
// socket, for what a real SPIRE agent never does on demand: malformed
// responses, floods, scripted failures.
type fakeAgent struct {
	delegatedidentityv1.UnimplementedDelegatedIdentityServer
	sock    string
	svids   func(n int, req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error
	bundles func(stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509BundlesServer) error
	calls   atomic.Int32

	mu  sync.Mutex
	srv *grpc.Server
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "spf") // sun_path holds 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeAgent{sock: filepath.Join(dir, "admin.sock")}
	t.Cleanup(f.stop)
	return f
}

func (f *fakeAgent) start(t *testing.T) {
	t.Helper()
	os.Remove(f.sock)
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	delegatedidentityv1.RegisterDelegatedIdentityServer(srv, f)
	f.mu.Lock()
	f.srv = srv
	f.mu.Unlock()
	go srv.Serve(l)
}

func (f *fakeAgent) stop() {
	f.mu.Lock()
	srv := f.srv
	f.srv = nil
	f.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

func (f *fakeAgent) SubscribeToX509SVIDs(req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	n := int(f.calls.Add(1))
	return f.svids(n, req, stream)
}

func (f *fakeAgent) SubscribeToX509Bundles(_ *delegatedidentityv1.SubscribeToX509BundlesRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	return f.bundles(stream)
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func newTestSource(t *testing.T, sock string) *Source {
	t.Helper()
	return newTestSourceLog(t, sock, testLogger(t))
}

func newTestSourceLog(t *testing.T, sock string, log *slog.Logger) *Source {
	t.Helper()
	src, err := New(Config{AdminSocket: sock, Logger: log, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := src.Close(); err != nil {
			t.Error(err)
		}
	})
	return src
}

// updates collects a subscription's updates.
type updates struct{ ch chan identity.SVIDUpdate }

func newUpdates() *updates { return &updates{ch: make(chan identity.SVIDUpdate, 1000)} }

func (u *updates) fn(up identity.SVIDUpdate) { u.ch <- up }

// next returns the next update, failing t after waitTimeout.
func (u *updates) next(t testing.TB) identity.SVIDUpdate {
	t.Helper()
	select {
	case up := <-u.ch:
		return up
	case <-time.After(waitTimeout):
		t.Fatalf("no svid update within %v", waitTimeout)
		return identity.SVIDUpdate{}
	}
}

// until returns the first update that ok accepts, and the ones before it.
func (u *updates) until(t testing.TB, what string, ok func(identity.SVIDUpdate) bool) (identity.SVIDUpdate, []identity.SVIDUpdate) {
	t.Helper()
	var skipped []identity.SVIDUpdate
	deadline := time.After(waitTimeout)
	for {
		select {
		case up := <-u.ch:
			if ok(up) {
				return up, skipped
			}
			skipped = append(skipped, up)
		case <-deadline:
			t.Fatalf("no update with %s within %v; got %s", what, waitTimeout, describe(skipped))
			return identity.SVIDUpdate{}, nil
		}
	}
}

func describe(ups []identity.SVIDUpdate) string {
	var b strings.Builder
	for _, up := range ups {
		b.WriteString("\n  ")
		switch {
		case up.Err != nil:
			b.WriteString("err: " + up.Err.Error())
		case len(up.SVIDs) == 0:
			b.WriteString("no svid: " + up.Reason)
		default:
			for _, s := range up.SVIDs {
				b.WriteString(s.ID.String() + " serial " + s.Certificates[0].SerialNumber.String() + " ")
			}
		}
	}
	return b.String()
}

func hasSVID(up identity.SVIDUpdate) bool { return up.Err == nil && len(up.SVIDs) > 0 }
func noSVID(up identity.SVIDUpdate) bool  { return up.Err == nil && len(up.SVIDs) == 0 }

func fakeSVIDResponse(t testing.TB, ca *testCA, id string) *delegatedidentityv1.SubscribeToX509SVIDsResponse {
	leaf, key := ca.issue(t, id)
	return &delegatedidentityv1.SubscribeToX509SVIDsResponse{
		X509Svids: []*delegatedidentityv1.X509SVIDWithKey{svidWithKey(id, [][]byte{leaf}, key)},
	}
}

func TestFakeMalformedResponseKeepsStream(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const id = "spiffe://example.org/ns/a/sa/default"
	f := newFakeAgent(t)
	var gotReq atomic.Pointer[delegatedidentityv1.SubscribeToX509SVIDsRequest]
	f.svids = func(_ int, req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		gotReq.Store(req)
		bad := fakeSVIDResponse(t, ca, id)
		bad.X509Svids[0].X509SvidKey = []byte("junk")
		for _, r := range []*delegatedidentityv1.SubscribeToX509SVIDsResponse{fakeSVIDResponse(t, ca, id), bad, fakeSVIDResponse(t, ca, id), {}} {
			if err := stream.Send(r); err != nil {
				return err
			}
		}
		<-stream.Context().Done()
		return nil
	}
	f.start(t)
	src := newTestSource(t, f.sock)
	u := newUpdates()
	cancel := src.Subscribe(identity.Workload{Namespace: "a", Name: "p", UID: "u1"}, u.fn)
	defer cancel()

	first := u.next(t)
	if !hasSVID(first) || first.SVIDs[0].ID.String() != id {
		t.Fatalf("first update: %s", describe([]identity.SVIDUpdate{first}))
	}
	if bad := u.next(t); !errors.Is(bad.Err, ErrMalformed) || !errors.Is(bad.Err, identity.ErrSourceUnavailable) || bad.SVIDs != nil {
		t.Fatalf("malformed response: %s", describe([]identity.SVIDUpdate{bad}))
	}
	if third := u.next(t); !hasSVID(third) {
		t.Fatalf("after the malformed one: %s", describe([]identity.SVIDUpdate{third}))
	}
	empty := u.next(t)
	if !noSVID(empty) || !strings.Contains(empty.Reason, "no registration entry matches the pod's selectors (k8s:ns:a, k8s:sa:default, k8s:pod-uid:u1, k8s:pod-name:p)") {
		t.Fatalf("empty response: %s", describe([]identity.SVIDUpdate{empty}))
	}
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d streams, want 1: a malformed response must not reconnect", n)
	}
	req := gotReq.Load()
	if req.GetPid() != 0 || selectorsString(req.GetSelectors()) != "k8s:ns:a, k8s:sa:default, k8s:pod-uid:u1, k8s:pod-name:p" {
		t.Fatalf("request: pid %d selectors %s", req.GetPid(), selectorsString(req.GetSelectors()))
	}
	if h := src.Health(); !h.Connected || h.LastError != "" || h.Name != identity.SourceSPIRE {
		t.Fatalf("health %+v", h)
	}
}

func TestFakeOutageReportedOnce(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const id = "spiffe://example.org/x"
	f := newFakeAgent(t)
	// Streams 1-5 fail as unavailable, 6-8 as denied, then one works.
	f.svids = func(n int, _ *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		switch {
		case n <= 5:
			return status.Error(codes.Unavailable, "restarting")
		case n <= 8:
			return status.Error(codes.PermissionDenied, "caller not configured as an authorized delegate")
		}
		if err := stream.Send(fakeSVIDResponse(t, ca, id)); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	}
	f.start(t)
	src := newTestSource(t, f.sock)
	u := newUpdates()
	defer src.Subscribe(identity.Workload{Namespace: "a"}, u.fn)()

	_, errs := u.until(t, "an svid", hasSVID)
	if len(errs) != 2 {
		t.Fatalf("%d updates before the svid, want 2 (one per kind of failure): %s", len(errs), describe(errs))
	}
	if !errors.Is(errs[0].Err, identity.ErrSourceUnavailable) || errors.Is(errs[0].Err, ErrNotAuthorized) {
		t.Fatalf("first: %v", errs[0].Err)
	}
	if !errors.Is(errs[1].Err, ErrNotAuthorized) || !errors.Is(errs[1].Err, identity.ErrSourceUnavailable) ||
		!strings.Contains(errs[1].Err.Error(), "not an authorized delegate of the SPIRE agent (authorized_delegates)") {
		t.Fatalf("second: %v", errs[1].Err)
	}
	if n := f.calls.Load(); n != 9 {
		t.Fatalf("%d streams, want 9", n)
	}
}

func TestFakeRestartAndHealth(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const id = "spiffe://example.org/x"
	f := newFakeAgent(t)
	f.svids = func(_ int, _ *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		if err := stream.Send(fakeSVIDResponse(t, ca, id)); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	}
	src := newTestSource(t, f.sock)
	if h := src.Health(); h.Connected {
		t.Fatalf("connected before any stream: %+v", h)
	}
	// Subscribing never waits for the agent, even when it is down.
	u := newUpdates()
	defer src.Subscribe(identity.Workload{Namespace: "a"}, u.fn)()
	down := u.next(t)
	if !errors.Is(down.Err, identity.ErrSourceUnavailable) {
		t.Fatalf("agent down: %s", describe([]identity.SVIDUpdate{down}))
	}
	if h := src.Health(); h.Connected || h.LastError == "" {
		t.Fatalf("health while down: %+v", h)
	}
	f.start(t)
	if _, skipped := u.until(t, "an svid", hasSVID); len(skipped) != 0 {
		t.Fatalf("more than one error per outage: %s", describe(skipped))
	}
	h := src.Health()
	if !h.Connected || h.LastError != "" {
		t.Fatalf("health when up: %+v", h)
	}
	f.stop()
	if up := u.next(t); !errors.Is(up.Err, identity.ErrSourceUnavailable) {
		t.Fatalf("agent stopped: %s", describe([]identity.SVIDUpdate{up}))
	}
	if h2 := src.Health(); h2.Connected || !h2.Since.After(h.Since) {
		t.Fatalf("health after stop: %+v (before %+v)", h2, h)
	}
	f.start(t)
	if _, skipped := u.until(t, "an svid after the restart", hasSVID); len(skipped) != 0 {
		t.Fatalf("more than one error per outage: %s", describe(skipped))
	}
}

func TestFakeNoCallbackAfterCancel(t *testing.T) {
	f := newFakeAgent(t)
	// A flood of empty updates: the subscription is always mid-callback
	// or about to be.
	f.svids = func(_ int, _ *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		for {
			if err := stream.Send(&delegatedidentityv1.SubscribeToX509SVIDsResponse{}); err != nil {
				return err
			}
		}
	}
	f.start(t)
	// Not the test log: a line per flooded update would be the test's
	// whole run time.
	src := newTestSourceLog(t, f.sock, slog.New(slog.DiscardHandler))
	for i := range 20 {
		var cancelling, cancelled atomic.Bool
		var n, late atomic.Int32
		started := make(chan struct{})
		cancel := src.Subscribe(identity.Workload{Namespace: "a"}, func(identity.SVIDUpdate) {
			if cancelled.Load() {
				t.Errorf("subscription %d: callback after cancel returned", i)
			}
			if cancelling.Load() {
				late.Add(1)
			}
			if n.Add(1) == 3 {
				close(started)
			}
			time.Sleep(time.Millisecond)
		})
		<-started
		cancelling.Store(true)
		cancel()
		cancelled.Store(true)
		cancel() // a second cancel is harmless
		// cancel stops at once, not after the updates gRPC has buffered:
		// at most one callback was about to start when it was called.
		if l := late.Load(); l > 1 {
			t.Fatalf("subscription %d: %d callbacks started while cancel ran", i, l)
		}
	}
	// Close also waits for callbacks, and later subscriptions get none.
	var closed atomic.Bool
	src.Subscribe(identity.Workload{Namespace: "b"}, func(identity.SVIDUpdate) {
		if closed.Load() {
			t.Error("callback after Close returned")
		}
	})
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	closed.Store(true)
	src.Subscribe(identity.Workload{Namespace: "c"}, func(identity.SVIDUpdate) { t.Error("callback of a subscription after Close") })()
	time.Sleep(50 * time.Millisecond)
}

func TestFakePIDExit(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const id = "spiffe://example.org/proc"
	f := newFakeAgent(t)
	var pid atomic.Int32
	f.svids = func(_ int, req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		pid.Store(req.GetPid())
		if len(req.GetSelectors()) != 0 {
			return status.Error(codes.InvalidArgument, "must provide either selectors or non-zero PID, but not both")
		}
		if err := stream.Send(fakeSVIDResponse(t, ca, id)); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	}
	f.start(t)
	src := newTestSource(t, f.sock)

	child := exec.Command("sleep", "300")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	u := newUpdates()
	defer src.Subscribe(identity.Workload{Namespace: "a", Name: "p", PID: child.Process.Pid}, u.fn)()
	if up := u.next(t); !hasSVID(up) || up.SVIDs[0].ID.String() != id {
		t.Fatalf("pid subscription: %s", describe([]identity.SVIDUpdate{up}))
	}
	if int(pid.Load()) != child.Process.Pid {
		t.Fatalf("request pid %d, want %d", pid.Load(), child.Process.Pid)
	}
	// The fake agent sends nothing more: the exit is seen by the pidfd.
	child.Process.Kill()
	child.Wait()
	gone := u.next(t)
	if !noSVID(gone) || !strings.Contains(gone.Reason, "exited") {
		t.Fatalf("after exit: %s", describe([]identity.SVIDUpdate{gone}))
	}
	select {
	case up := <-u.ch:
		t.Fatalf("update after the process exited: %s", describe([]identity.SVIDUpdate{up}))
	case <-time.After(200 * time.Millisecond):
	}

	// A PID that is already gone is reported at once, without asking SPIRE.
	calls := f.calls.Load()
	u2 := newUpdates()
	defer src.Subscribe(identity.Workload{Namespace: "a", PID: child.Process.Pid}, u2.fn)()
	if up := u2.next(t); !noSVID(up) || !strings.Contains(up.Reason, "is gone") {
		t.Fatalf("dead pid: %s", describe([]identity.SVIDUpdate{up}))
	}
	if f.calls.Load() != calls {
		t.Fatal("asked SPIRE about a dead pid")
	}
}

func TestFakeBundles(t *testing.T) {
	local := newTestCA(t, "example.org")
	fed := newTestCA(t, "partner.example")
	f := newFakeAgent(t)
	f.bundles = func(stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
		for _, cas := range []map[string][]byte{
			{"spiffe://example.org": local.cert.Raw},
			{"spiffe://example.org": []byte("junk")},
			{"spiffe://example.org": local.cert.Raw, "spiffe://partner.example": fed.cert.Raw},
		} {
			if err := stream.Send(&delegatedidentityv1.SubscribeToX509BundlesResponse{CaCertificates: cas}); err != nil {
				return err
			}
		}
		<-stream.Context().Done()
		return nil
	}
	f.start(t)
	src := newTestSource(t, f.sock)
	sets := make(chan *x509bundle.Set, 10)
	defer src.SubscribeBundles(func(s *x509bundle.Set) { sets <- s })()
	next := func() *x509bundle.Set {
		select {
		case s := <-sets:
			return s
		case <-time.After(waitTimeout):
			t.Fatal("no bundle update")
			return nil
		}
	}
	if s := next(); s.Len() != 1 || !s.Has(local.td) {
		t.Fatalf("first set: %d bundles", s.Len())
	}
	// The malformed one is skipped.
	if s := next(); s.Len() != 2 || !s.Has(fed.td) {
		t.Fatalf("second set: %d bundles", s.Len())
	}
}

func TestFakeWorkloadWithoutNamespace(t *testing.T) {
	f := newFakeAgent(t)
	f.svids = func(int, *delegatedidentityv1.SubscribeToX509SVIDsRequest, delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
		t.Error("asked SPIRE for a workload without namespace")
		return nil
	}
	f.start(t)
	src := newTestSource(t, f.sock)
	u := newUpdates()
	defer src.Subscribe(identity.Workload{Name: "p"}, u.fn)()
	if up := u.next(t); !noSVID(up) || !strings.Contains(up.Reason, ErrNoNamespace.Error()) {
		t.Fatalf("got %s", describe([]identity.SVIDUpdate{up}))
	}
}
