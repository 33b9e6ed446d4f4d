package spire

import (
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
	spiretest "github.com/bulkhead-io/bulkhead/tests/spire"
)

// The tests below run a real SPIRE server and agent (tests/spire) and ask
// the agent's admin socket as the bulkhead agent would, as root.

type realSPIRE struct {
	srv   *spiretest.Server
	agent *spiretest.Agent
	src   *Source
	td    spiffeid.TrustDomain
}

// startSPIRE starts a server and an agent, registers this process as the
// agent's authorized delegate (waiting until the agent has synced that
// entry, so that the first streams are not refused) and returns a Source on
// the agent's admin socket.
func startSPIRE(t *testing.T, cfg spiretest.ServerConfig) *realSPIRE {
	t.Helper()
	privileged.Require(t)
	srv := spiretest.StartServer(t, cfg)
	agent := srv.StartAgent(t, spiretest.AgentConfig{})
	srv.RegisterDelegate(t, agent)
	agent.WaitForSVID(t, spiretest.DelegateID(srv.TrustDomain()))
	return &realSPIRE{srv: srv, agent: agent, src: newTestSource(t, agent.AdminSocket()), td: srv.TrustDomain()}
}

func (r *realSPIRE) id(path string) spiffeid.ID { return spiffeid.RequireFromPath(r.td, path) }

// workloadEntry registers w's k8s selectors (namespace and service
// account) with id under the agent.
func (r *realSPIRE) workloadEntry(t *testing.T, id spiffeid.ID, ttl time.Duration, selectors ...string) string {
	t.Helper()
	return r.srv.CreateEntry(t, spiretest.Entry{ParentID: r.agent.ID(), SPIFFEID: id, Selectors: selectors, X509SVIDTTL: ttl})
}

func derived(td spiffeid.TrustDomain, ns, sa string) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+sa)
}

func TestSPIRESelectorSubscription(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "sel.test"})
	w := identity.Workload{Namespace: "team-a", Name: "web-0", UID: "7d1c", ServiceAccount: "web", Derived: derived(r.td, "team-a", "web")}
	r.workloadEntry(t, w.Derived, 0, "k8s:ns:team-a", "k8s:sa:web")

	sets := make(chan *x509bundle.Set, 10)
	defer r.src.SubscribeBundles(func(s *x509bundle.Set) { sets <- s })()
	u := newUpdates()
	defer r.src.Subscribe(w, u.fn)()

	// Until the agent has synced the new entry, SPIRE may say "none".
	up, before := u.until(t, "an svid", hasSVID)
	for _, b := range before {
		if !noSVID(b) || !strings.Contains(b.Reason, "no registration entry matches") {
			t.Fatalf("before the svid: %s", describe(before))
		}
	}
	if len(up.SVIDs) != 1 || up.SVIDs[0].ID != w.Derived {
		t.Fatalf("svids: %s", describe([]identity.SVIDUpdate{up}))
	}
	var set *x509bundle.Set
	select {
	case set = <-sets:
	case <-time.After(waitTimeout):
		t.Fatal("no bundle")
	}
	if !set.Has(r.td) {
		t.Fatalf("bundle set without %s", r.td)
	}
	id, _, err := x509svid.Verify(up.SVIDs[0].Certificates, set)
	if err != nil || id != w.Derived {
		t.Fatalf("svid does not verify against the agent's bundle: %v, %v", id, err)
	}
	// And against the server's own bundle, from its CLI.
	if !strings.Contains(string(r.srv.BundlePEM(t)), "CERTIFICATE") {
		t.Fatal("server bundle")
	}
	if h := r.src.Health(); !h.Connected || h.LastError != "" {
		t.Fatalf("health: %+v", h)
	}

	// A pod whose selectors match no entry: SPIRE answers with an empty
	// update (not an error, not silence).
	other := newUpdates()
	defer r.src.Subscribe(identity.Workload{Namespace: "nobody", Name: "x"}, other.fn)()
	if up := other.next(t); !noSVID(up) ||
		up.Reason != "no registration entry matches the pod's selectors (k8s:ns:nobody, k8s:sa:default, k8s:pod-name:x)" {
		t.Fatalf("unmatched pod: %s", describe([]identity.SVIDUpdate{up}))
	}
}

func TestSPIREEntryIDAsIs(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "asis.test"})
	w := identity.Workload{Namespace: "billing", Name: "api-0", UID: "u-9", Derived: derived(r.td, "billing", "default")}
	custom := r.id("/custom/billing-api")
	// Narrower than namespace: pod UID and name, which Selectors sends.
	r.workloadEntry(t, custom, 0, "k8s:ns:billing", "k8s:pod-uid:u-9", "k8s:pod-name:api-0")
	u := newUpdates()
	defer r.src.Subscribe(w, u.fn)()
	up, _ := u.until(t, "an svid", hasSVID)
	if len(up.SVIDs) != 1 || up.SVIDs[0].ID != custom {
		t.Fatalf("want SPIRE's %s as is (not the derived %s): %s", custom, w.Derived, describe([]identity.SVIDUpdate{up}))
	}
}

func TestSPIREEntryDeleted(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "del.test"})
	w := identity.Workload{Namespace: "n", Name: "p", Derived: derived(r.td, "n", "default")}
	entry := r.workloadEntry(t, w.Derived, 0, "k8s:ns:n")
	u := newUpdates()
	defer r.src.Subscribe(w, u.fn)()
	u.until(t, "an svid", hasSVID)
	r.srv.DeleteEntry(t, entry)
	up, before := u.until(t, "no svid", func(up identity.SVIDUpdate) bool { return !hasSVID(up) })
	if up.Err != nil || !strings.Contains(up.Reason, "no registration entry matches the pod's selectors") {
		t.Fatalf("after delete: %s (before: %s)", describe([]identity.SVIDUpdate{up}), describe(before))
	}
}

// SPIRE has no minimum X.509-SVID TTL: the server accepts -x509SVIDTTL 1.
// It backdates NotBefore by 10 s, and the agent replaces an SVID past about
// half its lifetime at its next sync (every 5 s). So a TTL below the sync
// interval leaves expired SVIDs in use between syncs (TTL 1: each one
// arrives with under a second left); 20 s gets a new SVID at the first or
// second sync, well before the old one expires, on a slow machine too.
const rotationTTL = 20 * time.Second

func TestSPIRERotation(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "rot.test"})
	w := identity.Workload{Namespace: "rot", Name: "p", Derived: derived(r.td, "rot", "default")}
	r.workloadEntry(t, w.Derived, rotationTTL, "k8s:ns:rot")
	u := newUpdates()
	defer r.src.Subscribe(w, u.fn)()
	first, _ := u.until(t, "an svid", hasSVID)
	old := first.SVIDs[0].Certificates[0]
	if life := old.NotAfter.Sub(old.NotBefore); life > rotationTTL+15*time.Second {
		t.Fatalf("svid lives %v: the entry's TTL %v was not applied", life, rotationTTL)
	}
	next, skipped := u.until(t, "a rotated svid", func(up identity.SVIDUpdate) bool {
		return hasSVID(up) && up.SVIDs[0].Certificates[0].SerialNumber.Cmp(old.SerialNumber) != 0
	})
	now := time.Now()
	for _, s := range skipped {
		if !hasSVID(s) {
			t.Fatalf("lost the svid while rotating: %s", describe(skipped))
		}
	}
	leaf := next.SVIDs[0].Certificates[0]
	if next.SVIDs[0].ID != w.Derived || !now.Before(old.NotAfter) || !leaf.NotAfter.After(old.NotAfter) {
		t.Fatalf("rotated %s at %v: old %v..%v, new %v..%v", next.SVIDs[0].ID, now, old.NotBefore, old.NotAfter, leaf.NotBefore, leaf.NotAfter)
	}
}

func TestSPIREAgentRestart(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "restart.test"})
	w := identity.Workload{Namespace: "n", Derived: derived(r.td, "n", "default")}
	r.workloadEntry(t, w.Derived, 0, "k8s:ns:n")
	u := newUpdates()
	defer r.src.Subscribe(w, u.fn)()
	u.until(t, "an svid", hasSVID)

	r.agent.Stop(t)
	down := u.next(t)
	if !errors.Is(down.Err, identity.ErrSourceUnavailable) || down.SVIDs != nil {
		t.Fatalf("agent stopped: %s", describe([]identity.SVIDUpdate{down}))
	}
	if h := r.src.Health(); h.Connected || h.LastError == "" {
		t.Fatalf("health while the agent is down: %+v", h)
	}
	// Let the source retry a while (backoff 20..200 ms): still one error.
	time.Sleep(2 * time.Second)
	r.agent.Start(t)
	up, between := u.until(t, "an svid after the restart", hasSVID)
	// A restarting agent may refuse the delegate until it has synced
	// again: that is another kind of failure, reported once too.
	if len(between) > 1 || (len(between) == 1 && !errors.Is(between[0].Err, ErrNotAuthorized)) {
		t.Fatalf("errors during one outage: %s", describe(append([]identity.SVIDUpdate{down}, between...)))
	}
	if up.SVIDs[0].ID != w.Derived {
		t.Fatalf("after restart: %s", describe([]identity.SVIDUpdate{up}))
	}
	if h := r.src.Health(); !h.Connected || h.LastError != "" {
		t.Fatalf("health after the restart: %+v", h)
	}
}

func TestSPIREUnauthorizedDelegate(t *testing.T) {
	t.Parallel()
	privileged.Require(t)
	srv := spiretest.StartServer(t, spiretest.ServerConfig{TrustDomain: "unauth.test"})
	agent := srv.StartAgent(t, spiretest.AgentConfig{AuthorizedDelegates: []string{"spiffe://unauth.test/someone-else"}})
	src := newTestSource(t, agent.AdminSocket())
	w := identity.Workload{Namespace: "n"}

	check := func(t *testing.T, spireSays string) {
		u := newUpdates()
		defer src.Subscribe(w, u.fn)()
		up := u.next(t)
		if !errors.Is(up.Err, ErrNotAuthorized) || !errors.Is(up.Err, identity.ErrSourceUnavailable) || up.SVIDs != nil {
			t.Fatalf("got %s", describe([]identity.SVIDUpdate{up}))
		}
		msg := up.Err.Error()
		for _, want := range []string{"bulkhead-agent is not an authorized delegate of the SPIRE agent (authorized_delegates)", spireSays} {
			if !strings.Contains(msg, want) {
				t.Fatalf("error %q lacks %q", msg, want)
			}
		}
		if h := src.Health(); h.Connected || !strings.Contains(h.LastError, "authorized_delegates") {
			t.Fatalf("health: %+v", h)
		}
	}
	// No entry for this process at all.
	t.Run("no identity", func(t *testing.T) { check(t, "no identity issued") })
	// An identity, but not one the agent lists as a delegate.
	srv.RegisterDelegate(t, agent)
	agent.WaitForSVID(t, spiretest.DelegateID(srv.TrustDomain()))
	t.Run("not a delegate", func(t *testing.T) { check(t, "caller not configured as an authorized delegate") })
}

func TestSPIREPIDSubscription(t *testing.T) {
	t.Parallel()
	r := startSPIRE(t, spiretest.ServerConfig{TrustDomain: "pid.test"})
	// Every root process is unix:uid:0 to the unix attestor, so the pod
	// process runs as a uid of its own.
	const uid, otherUID = 64123, 64124
	procID := r.id("/pid-workload")
	r.workloadEntry(t, procID, 0, "unix:uid:64123")
	startChild := func(uid uint32) *exec.Cmd {
		cmd := exec.Command("sleep", "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	child := startChild(uid)
	u := newUpdates()
	defer r.src.Subscribe(identity.Workload{Namespace: "n", Name: "p", PID: child.Process.Pid, Derived: derived(r.td, "n", "default")}, u.fn)()
	up, _ := u.until(t, "an svid", hasSVID)
	if len(up.SVIDs) != 1 || up.SVIDs[0].ID != procID {
		t.Fatalf("pid subscription: %s", describe([]identity.SVIDUpdate{up}))
	}

	// A process no entry matches.
	stranger := startChild(otherUID)
	su := newUpdates()
	defer r.src.Subscribe(identity.Workload{Namespace: "n", PID: stranger.Process.Pid}, su.fn)()
	if up := su.next(t); !noSVID(up) || !strings.Contains(up.Reason, "no registration entry matches the selectors SPIRE attested for pod process") {
		t.Fatalf("unmatched process: %s", describe([]identity.SVIDUpdate{up}))
	}

	child.Process.Kill()
	child.Wait()
	gone, _ := u.until(t, "no svid", func(up identity.SVIDUpdate) bool { return !hasSVID(up) })
	if gone.Err != nil || !strings.Contains(gone.Reason, "exited") {
		t.Fatalf("after the process exited: %s", describe([]identity.SVIDUpdate{gone}))
	}
}
