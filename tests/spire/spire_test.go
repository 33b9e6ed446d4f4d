package spiretest

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// The helper itself: a server and two agents come up, entries are created
// and deleted, and agents and the server survive restarts.
func TestServerAndAgents(t *testing.T) {
	privileged.Require(t)
	s := StartServer(t, ServerConfig{TrustDomain: "helper.test"})
	if s.TrustDomain().Name() != "helper.test" {
		t.Fatalf("trust domain %s", s.TrustDomain())
	}
	if pem := string(s.BundlePEM(t)); !strings.Contains(pem, "BEGIN CERTIFICATE") {
		t.Fatalf("bundle: %q", pem)
	}
	a0 := s.StartAgent(t, AgentConfig{})
	a1 := s.StartAgent(t, AgentConfig{AuthorizedDelegates: []string{}})
	if a0.ID() == a1.ID() || !strings.HasPrefix(a0.ID().Path(), "/spire/agent/join_token/") || a0.ID().TrustDomain() != s.TrustDomain() {
		t.Fatalf("agent ids %s, %s", a0.ID(), a1.ID())
	}
	if a0.AdminSocket() == a1.AdminSocket() || a0.WorkloadSocket() == a1.WorkloadSocket() {
		t.Fatal("agents share sockets")
	}
	// The agents are attested: the server lists them.
	out, err := s.CLI("agent", "list")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []*Agent{a0, a1} {
		if !strings.Contains(string(out), a.ID().String()) {
			t.Fatalf("agent %s not in `agent list`:\n%s", a.ID(), out)
		}
	}

	id := s.RegisterDelegate(t, a0)
	e := s.CreateEntry(t, Entry{
		ParentID:    a0.ID(),
		SPIFFEID:    spiffeid.RequireFromPath(s.TrustDomain(), "/w"),
		Selectors:   []string{"k8s:ns:a", "k8s:pod-name:x:y"},
		X509SVIDTTL: 120e9,
	})
	out, err = s.CLI("entry", "show", "-entryID", e)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"spiffe://helper.test/w", "k8s:pod-name:x:y", "X509-SVID TTL    : 120"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("entry show lacks %q:\n%s", want, out)
		}
	}
	// The same entry again is refused.
	if _, err := s.TryCreateEntry(Entry{ParentID: a0.ID(), SPIFFEID: spiffeid.RequireFromPath(s.TrustDomain(), "/w"),
		Selectors: []string{"k8s:ns:a", "k8s:pod-name:x:y"}}); err == nil {
		t.Fatal("duplicate entry created")
	}
	s.DeleteEntry(t, e)
	s.DeleteEntry(t, id)
	if _, err := s.CLI("entry", "show", "-entryID", e); err == nil {
		t.Fatal("deleted entry still shown")
	}

	a0.Stop(t)
	a0.Start(t)
	s.Stop(t)
	s.Start(t)
	a1.Stop(t)
	a1.Start(t)
}

// CreateEntries creates all entries in one call, in order, and an entry the
// server refuses fails it.
func TestCreateEntries(t *testing.T) {
	privileged.Require(t)
	s := StartServer(t, ServerConfig{TrustDomain: "batch.test"})
	parent := spiffeid.RequireFromPath(s.TrustDomain(), "/node")
	var entries []Entry
	for _, name := range []string{"a", "b", "c"} {
		entries = append(entries, Entry{ParentID: parent, SPIFFEID: spiffeid.RequireFromPath(s.TrustDomain(), "/w/"+name),
			Selectors: []string{"k8s:ns:batch", "k8s:pod-name:" + name}, X509SVIDTTL: 300e9})
	}
	ids := s.CreateEntries(t, entries)
	if len(ids) != 3 {
		t.Fatalf("ids %v", ids)
	}
	for i, name := range []string{"a", "b", "c"} {
		out, err := s.CLI("entry", "show", "-entryID", ids[i])
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"spiffe://batch.test/w/" + name, "k8s:pod-name:" + name, "k8s:ns:batch", "X509-SVID TTL    : 300"} {
			if !strings.Contains(string(out), want) {
				t.Fatalf("entry %d lacks %q:\n%s", i, want, out)
			}
		}
	}
	if _, err := entryIDs([]byte(`{"results":[{"status":{"code":6,"message":"similar entry already exists"},"entry":{}}]}`), 1); err == nil {
		t.Fatal("a refused entry passed")
	}
	if _, err := entryIDs([]byte(`{"results":[]}`), 1); err == nil {
		t.Fatal("a missing result passed")
	}
}
