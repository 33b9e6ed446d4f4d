package e2e

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"maps"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
	spiretest "github.com/bulkhead-io/bulkhead/tests/spire"
	"github.com/bulkhead-io/bulkhead/tests/twonode"
)

// The tests below run real SPIRE (one server, one agent per node) with the
// two-node topology: each bulkhead agent follows its local pods' SVIDs
// through its own SPIRE agent's admin socket, as on a real cluster.

// spireTD is the trust domain of the SPIRE server and of both agents.
const spireTD = "bulkhead.test"

// svidWait is how long SPIRE may take to hand out an SVID for a new entry:
// the SPIRE agent syncs entries every 5 s, and the machine is slow.
const svidWait = 60 * time.Second

// spireMetricsAddr is where each agent serves metrics, on its node's own
// loopback.
const spireMetricsAddr = "127.0.0.1:9963"

// metric returns the value of the sample of n's agent whose line starts
// with prefix (name and labels), and whether there is one.
func metric(t *testing.T, n *twonode.Node, prefix string) (float64, bool) {
	t.Helper()
	var body []byte
	err := n.NS.Do(func(ns.NetNS) error {
		// Dialled here, on this thread, inside the node's namespace (an
		// http.Client would dial from another goroutine, outside it).
		c, err := net.DialTimeout("tcp", spireMetricsAddr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n"); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err = io.ReadAll(resp.Body)
		return err
	})
	if err != nil {
		t.Fatalf("%s: metrics: %v", n.Name, err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, prefix+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("%s: metric %s: %v", n.Name, line, err)
			}
			return v, true
		}
	}
	return 0, false
}

const spireNamespaces = `
apiVersion: v1
kind: Namespace
metadata: {name: client, labels: {team: client}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {team: web}}
`

type spireEnv struct {
	topo   *twonode.Topology
	srv    *spiretest.Server
	agents [2]*spiretest.Agent // node A's, node B's
	td     spiffeid.TrustDomain
}

// newSPIREEnv starts a SPIRE server, one SPIRE agent per node with the
// bulkhead agents (root) as authorized delegates, and the two nodes whose
// agents use them. SPIRE starts first, so it stops last.
func newSPIREEnv(t *testing.T) *spireEnv {
	t.Helper()
	privileged.Require(t)
	e := &spireEnv{srv: spiretest.StartServer(t, spiretest.ServerConfig{TrustDomain: spireTD})}
	e.td = e.srv.TrustDomain()
	for i := range e.agents {
		e.agents[i] = e.srv.StartAgent(t, spiretest.AgentConfig{})
		e.srv.RegisterDelegate(t, e.agents[i])
	}
	// Until a SPIRE agent has synced the delegate's entry it refuses the
	// admin API; wait, so the bulkhead agents start against a ready one.
	for _, a := range e.agents {
		a.WaitForSVID(t, spiretest.DelegateID(e.td))
	}
	e.topo = twonode.New(t, twonode.Config{ExtraAgentArgs: func(node string) []string {
		a := e.agents[0]
		if node == twonode.NodeB {
			a = e.agents[1]
		}
		return []string{"--spire-admin-socket", a.AdminSocket(), "--trust-domain", spireTD, "--store-shrink-grace", "1s",
			// Each node has its own loopback: the same port on both.
			"--metrics-addr", spireMetricsAddr}
	}})
	for _, n := range e.topo.Nodes {
		n.WriteStore("namespaces.yaml", spireNamespaces)
	}
	return e
}

func (e *spireEnv) agentOf(n *twonode.Node) *spiretest.Agent {
	if n == e.topo.A() {
		return e.agents[0]
	}
	return e.agents[1]
}

func (e *spireEnv) id(path string) spiffeid.ID { return spiffeid.RequireFromPath(e.td, path) }

func (e *spireEnv) derived(ns, sa string) spiffeid.ID { return e.id("/ns/" + ns + "/sa/" + sa) }

// entry registers pod p (by namespace and name) with id under the SPIRE
// agent of p's node, so that only that agent can hand it out.
func (e *spireEnv) entry(t *testing.T, n *twonode.Node, ns, name string, id spiffeid.ID, ttl time.Duration) string {
	t.Helper()
	return e.srv.CreateEntry(t, spiretest.Entry{ParentID: e.agentOf(n).ID(), SPIFFEID: id,
		Selectors: []string{"k8s:ns:" + ns, "k8s:pod-name:" + name}, X509SVIDTTL: ttl})
}

func identities(t *testing.T, n *twonode.Node) *api.IdentityList {
	t.Helper()
	l, err := n.Client.ListIdentities(context.Background())
	if err != nil {
		t.Fatalf("%s: identities: %v", n.Name, err)
	}
	return &l
}

func svidOf(l *api.IdentityList, pod string) (api.SVIDInfo, bool) {
	for _, s := range l.SVIDs {
		if s.Pod == pod {
			return s, true
		}
	}
	return api.SVIDInfo{}, false
}

// waitSVID waits until n lists pod ("ns/name") with an SVID of id and
// returns it.
func waitSVID(t *testing.T, n *twonode.Node, pod string, id spiffeid.ID) api.SVIDInfo {
	t.Helper()
	var s api.SVIDInfo
	if !twonode.Eventually(svidWait, func() bool {
		var ok bool
		s, ok = svidOf(identities(t, n), pod)
		return ok && s.SPIFFEID == id.String() && s.Serial != ""
	}) {
		t.Fatalf("%s: no SVID %s for %s after %v: %+v", n.Name, id, pod, svidWait, identities(t, n).SVIDs)
	}
	return s
}

// waitNoSVID waits until n lists pod with no SVID and a reason.
func waitNoSVID(t *testing.T, n *twonode.Node, pod string) api.SVIDInfo {
	t.Helper()
	var s api.SVIDInfo
	if !twonode.Eventually(svidWait, func() bool {
		var ok bool
		s, ok = svidOf(identities(t, n), pod)
		return ok && s.SPIFFEID == "" && s.Serial == "" && s.NoSVIDReason != ""
	}) {
		t.Fatalf("%s: %s still holds an SVID (or lacks a reason) after %v: %+v", n.Name, pod, svidWait, identities(t, n).SVIDs)
	}
	return s
}

func hasIdentity(l *api.IdentityList, id string) bool {
	return slices.ContainsFunc(l.Identities, func(i api.Identity) bool { return i.SPIFFEID == id })
}

func sourceStatus(t *testing.T, n *twonode.Node) *api.IdentitySourceStatus {
	t.Helper()
	st, err := n.Client.Status(context.Background())
	if err != nil {
		t.Fatalf("%s: status: %v", n.Name, err)
	}
	if st.IdentitySource == nil {
		t.Fatalf("%s: status has no identity source", n.Name)
	}
	return st.IdentitySource
}

// verifySVID checks that s's certificate chain is an X.509-SVID for its
// SPIFFE ID that chains to bundlePEM, and that serial and expiry are the
// leaf's.
func verifySVID(t *testing.T, td spiffeid.TrustDomain, s api.SVIDInfo, bundlePEM []byte, what string) {
	t.Helper()
	var chain []*x509.Certificate
	rest := []byte(s.CertificatePEM)
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("%s: certificate of %s: %v", what, s.Pod, err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		t.Fatalf("%s: %s has no certificate: %+v", what, s.Pod, s)
	}
	bundle, err := x509bundle.Parse(td, bundlePEM)
	if err != nil {
		t.Fatalf("%s: bundle: %v", what, err)
	}
	id, _, err := x509svid.Verify(chain, bundle)
	if err != nil {
		t.Fatalf("%s: SVID of %s does not verify: %v", what, s.Pod, err)
	}
	leaf := chain[0]
	if id.String() != s.SPIFFEID || hex.EncodeToString(leaf.SerialNumber.Bytes()) != s.Serial ||
		!leaf.NotAfter.Equal(s.NotAfter) || !leaf.NotBefore.Equal(s.NotBefore) {
		t.Fatalf("%s: %s: listed %s serial %s %v..%v, certificate %s serial %x %v..%v", what, s.Pod, s.SPIFFEID, s.Serial,
			s.NotBefore, s.NotAfter, id, leaf.SerialNumber, leaf.NotBefore, leaf.NotAfter)
	}
	if !s.NotAfter.After(time.Now()) {
		t.Fatalf("%s: %s holds an expired SVID (%v)", what, s.Pod, s.NotAfter)
	}
}

// reaches is Eventually(from reaches to), to allow for the agents'
// apply and store reload; blocked is Eventually(it does not).
func reaches(from, to *twonode.Pod, port int) bool {
	return twonode.Eventually(10*time.Second, func() bool { return from.TCPWorks(to.IPv4, port) })
}

func blocked(from, to *twonode.Pod, port int) bool {
	return twonode.Eventually(10*time.Second, func() bool { return !from.TCPWorks(to.IPv4, port) })
}

const webDenyAll = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Ingress]
`

// TestSPIREEverySVID: each node's agent holds exactly its own pods' SVIDs,
// each one as SPIRE issued it (it verifies against the trust bundle); a pod
// SPIRE has no entry for holds none, says why, and is enforced all the
// same.
func TestSPIREEverySVID(t *testing.T) {
	e := newSPIREEnv(t)
	nodeA, nodeB := e.topo.A(), e.topo.B()
	want := map[*twonode.Node]map[string]spiffeid.ID{nodeA: {}, nodeB: {}}
	for _, p := range []struct {
		n        *twonode.Node
		ns, name string
		id       spiffeid.ID
	}{
		{nodeA, "client", "a1", e.derived("client", "a1")},
		{nodeA, "client", "a2", e.id("/workload/a2")},
		{nodeB, "web", "b1", e.derived("web", "b1")},
		{nodeB, "web", "b2", e.id("/workload/b2")},
	} {
		e.entry(t, p.n, p.ns, p.name, p.id, 0)
		want[p.n][p.ns+"/"+p.name] = p.id
	}
	nodeA.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
	a2 := nodeA.AddPod("client", "a2", map[string]string{"app": "a2"}, "a2")
	nodeB.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	b2 := nodeB.AddPod("web", "b2", map[string]string{"app": "b2"}, "b2")
	b3 := nodeB.AddPod("web", "b3", map[string]string{"app": "b3"}, "b3") // no entry
	b3.Serve(8080)
	e.topo.SyncPeers()

	serverBundle := e.srv.BundlePEM(t)
	for n, pods := range want {
		for pod, id := range pods {
			waitSVID(t, n, pod, id)
		}
		l := identities(t, n)
		if l.Source == nil || l.Source.Name != "spire" || !l.Source.Healthy || l.Source.BundlePEM == "" {
			t.Fatalf("%s: source %+v", n.Name, l.Source)
		}
		// Only the node's own pods are followed: never the other node's,
		// although the node knows them from its store.
		var listed []string
		for _, s := range l.SVIDs {
			listed = append(listed, s.Pod)
		}
		slices.Sort(listed)
		var local []string
		for _, p := range n.Pods() {
			local = append(local, p.Namespace+"/"+p.Name)
		}
		slices.Sort(local)
		if !slices.Equal(listed, local) {
			t.Fatalf("%s: SVIDs listed for %v, want exactly its pods %v", n.Name, listed, local)
		}
		for pod, id := range pods {
			s, _ := svidOf(l, pod)
			verifySVID(t, e.td, s, []byte(l.Source.BundlePEM), n.Name+" (agent's bundle)")
			verifySVID(t, e.td, s, serverBundle, n.Name+" (server's bundle)")
			// The pod is recompiled with its issued ID just after the
			// SVID arrives.
			if !twonode.Eventually(10*time.Second, func() bool { return hasIdentity(identities(t, n), id.String()) }) {
				t.Errorf("%s: no identity with %s: %+v", n.Name, id, identities(t, n).Identities)
			}
		}
		if l.Source.PodsFollowed != len(local) || l.Source.PodsWithSVID != len(pods) || l.Source.SVIDs != len(pods) ||
			l.Source.EarliestExpiry.IsZero() {
			t.Errorf("%s: source counts %+v, want %d followed, %d with an SVID", n.Name, l.Source, len(local), len(pods))
		}
	}
	// The CLI shows what the API does.
	for n, pods := range want {
		cli := filepath.Join(cnichain.RepoRoot(t), "bin", "bulkhead")
		out, err := exec.Command(cli, "--socket", n.Socket, "identities", "-o", "json").Output()
		var l api.IdentityList
		if err == nil {
			err = json.Unmarshal(out, &l)
		}
		if err != nil || l.Source == nil || l.Source.Name != "spire" {
			t.Fatalf("%s: bulkhead identities -o json: %v\n%s", n.Name, err, out)
		}
		text, err := exec.Command(cli, "--socket", n.Socket, "identities").CombinedOutput()
		if err != nil {
			t.Fatalf("%s: bulkhead identities: %v\n%s", n.Name, err, text)
		}
		for pod, id := range pods {
			s, ok := svidOf(&l, pod)
			viaAPI, _ := svidOf(identities(t, n), pod)
			if !ok || s.SPIFFEID != id.String() || s.Serial != viaAPI.Serial || !s.NotAfter.Equal(viaAPI.NotAfter) {
				t.Errorf("%s: bulkhead identities -o json lists %s as %+v, the API as %+v", n.Name, pod, s, viaAPI)
			}
			if !strings.Contains(string(text), id.String()) {
				t.Errorf("%s: bulkhead identities does not show %s:\n%s", n.Name, id, text)
			}
		}
	}
	// a2's issued ID reached node B through no annotation: B derives it.
	if l := identities(t, nodeB); hasIdentity(l, e.id("/workload/a2").String()) || !hasIdentity(l, e.derived("client", "a2").String()) {
		t.Errorf("node B knows a2 by an ID it cannot have learned: %+v", l.Identities)
	}

	// b3 has no entry: no SVID, a reason, its derived identity.
	s := waitNoSVID(t, nodeB, "web/b3")
	t.Logf("b3: %q", s.NoSVIDReason)
	if !hasIdentity(identities(t, nodeB), e.derived("web", "b3").String()) {
		t.Errorf("node B lists no derived identity for b3: %+v", identities(t, nodeB).Identities)
	}
	// ... and is enforced: reachable while no policy selects it, cut off
	// by the namespace's default deny, from either node.
	for _, p := range []*twonode.Pod{b2, a2} {
		if !reaches(p, b3, 8080) {
			t.Fatalf("%s cannot reach b3 with no policy", p.Name)
		}
	}
	nodeB.WriteStore("policy.yaml", webDenyAll)
	for _, p := range []*twonode.Pod{b2, a2} {
		if !blocked(p, b3, 8080) {
			t.Fatalf("%s still reaches b3 (no SVID) under default deny", p.Name)
		}
	}
}

// issuedWeb is the SPIFFE ID SPIRE gives b1 in the tests below, unlike the
// derived spiffe://bulkhead.test/ns/web/sa/b1.
const issuedWeb = "spiffe://" + spireTD + "/workload/web"

// webByIssuedID selects b1 by its issued ID only and lets a1 (by its
// derived ID: a remote pod with no annotation) reach it.
const webByIssuedID = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: web-from-a1, namespace: web}
spec:
  selector: {spiffeID: "` + issuedWeb + `"}
  ingress:
  - from: [{spiffeID: "spiffe://` + spireTD + `/ns/client/sa/a1"}]
    ports: [{port: 8080, protocol: TCP}]
`

// a1EgressToWeb lets a1 talk only to the pod whose ID is issuedWeb.
const a1EgressToWeb = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: a1-to-web, namespace: client}
spec:
  selector: {spiffeID: "spiffe://` + spireTD + `/ns/client/sa/a1"}
  egress:
  - to: [{spiffeID: "` + issuedWeb + `"}]
    ports: [{port: 8080, protocol: TCP}]
`

// twoByTwo adds a1, a2 on node A and b1, b2 on node B (b1 and b2 serve
// 8080) and tells each node of the other's pods.
func (e *spireEnv) twoByTwo() (a1, a2, b1, b2 *twonode.Pod) {
	nodeA, nodeB := e.topo.A(), e.topo.B()
	a1 = nodeA.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
	a2 = nodeA.AddPod("client", "a2", map[string]string{"app": "a2"}, "a2")
	b1 = nodeB.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	b2 = nodeB.AddPod("web", "b2", map[string]string{"app": "b2"}, "b2")
	b1.Serve(8080)
	b2.Serve(8080)
	e.topo.SyncPeers()
	return
}

// TestSPIREIssuedIDDrivesPolicy: the ID SPIRE issues b1 is the one policy
// matches, on b1's node from its SVID, and on the other node from the
// store's annotation; flow records and identities carry it.
func TestSPIREIssuedIDDrivesPolicy(t *testing.T) {
	e := newSPIREEnv(t)
	nodeA, nodeB := e.topo.A(), e.topo.B()
	e.entry(t, nodeB, "web", "b1", spiffeid.RequireFromString(issuedWeb), 0)
	a1, a2, b1, b2 := e.twoByTwo()
	waitSVID(t, nodeB, "web/b1", spiffeid.RequireFromString(issuedWeb))
	if !twonode.Eventually(10*time.Second, func() bool { return hasIdentity(identities(t, nodeB), issuedWeb) }) {
		t.Fatalf("node B lists no identity %s: %+v", issuedWeb, identities(t, nodeB).Identities)
	}
	if hasIdentity(identities(t, nodeB), e.derived("web", "b1").String()) {
		t.Errorf("node B still lists b1's derived ID: %+v", identities(t, nodeB).Identities)
	}
	for _, p := range []*twonode.Pod{a1, a2, b2} {
		if !reaches(p, b1, 8080) {
			t.Fatalf("%s cannot reach b1 with no policy", p.Name)
		}
	}

	// Node B: the policy selects b1 by its issued ID.
	nodeB.WriteStore("policy.yaml", webByIssuedID)
	for _, p := range []*twonode.Pod{a2, b2} {
		if !blocked(p, b1, 8080) {
			t.Fatalf("%s still reaches b1: the policy on its issued ID does not select it", p.Name)
		}
	}
	if !reaches(a1, b1, 8080) {
		t.Fatal("a1 cannot reach b1 although the policy allows it")
	}
	if a2.TCPWorks(b1.IPv4, 8080) || b2.TCPWorks(b1.IPv4, 8080) {
		t.Fatal("a2 or b2 reach b1 again")
	}
	// b2, not selected, is open.
	if !a2.TCPWorks(b2.IPv4, 8080) {
		t.Fatal("a2 cannot reach b2, which no policy selects")
	}
	var fwd []string
	if !twonode.Eventually(5*time.Second, func() bool {
		fwd = nodeB.FlowLines(`"verdict":"FORWARDED"`, `"traffic_direction":"INGRESS"`, `"pod_name":"a1"`, `"ingress_allowed_by":[{"name":"web-from-a1"`)
		return len(fwd) > 0 && len(nodeB.FlowLines(`"verdict":"DROPPED"`, `"pod_name":"a2"`, `"spiffe_id":"`+issuedWeb+`"`)) > 0
	}) {
		t.Fatalf("node B's flow log lacks a1's allowed or a2's dropped flow to b1:\n%s", strings.Join(nodeB.FlowLines(), "\n"))
	}
	if i := strings.Index(fwd[0], `"destination":{`); i < 0 || !strings.Contains(fwd[0][i:], `"spiffe_id":"`+issuedWeb+`"`) {
		t.Errorf("node B's record of a1 -> b1 lacks destination.spiffe_id %s: %s", issuedWeb, fwd[0])
	}

	// Node A: a1 may talk only to issuedWeb. Without the annotation node A
	// derives b1's ID, so a1's egress to it is denied.
	nodeA.WriteStore("policy.yaml", a1EgressToWeb)
	if !blocked(a1, b1, 8080) {
		t.Fatal("a1 still reaches b1 although node A cannot know b1 as " + issuedWeb)
	}
	// The store tells node A b1's issued ID: now allowed, b2 still not.
	b1.Annotations = map[string]string{store.SPIFFEIDAnnotation: issuedWeb}
	e.topo.SyncPeers()
	if !reaches(a1, b1, 8080) {
		t.Fatalf("a1 cannot reach b1 after node A learned its ID from the annotation: %+v", identities(t, nodeA).Identities)
	}
	if a1.TCPWorks(b2.IPv4, 8080) {
		t.Fatal("a1 reaches b2, which its egress policy does not allow")
	}
	if !hasIdentity(identities(t, nodeA), issuedWeb) {
		t.Errorf("node A lists no identity %s: %+v", issuedWeb, identities(t, nodeA).Identities)
	}
	if !twonode.Eventually(5*time.Second, func() bool {
		return len(nodeA.FlowLines(`"verdict":"FORWARDED"`, `"traffic_direction":"EGRESS"`, `"pod_name":"b1"`, `"spiffe_id":"`+issuedWeb+`"`)) > 0
	}) {
		t.Errorf("node A's flow log has no egress record of a1 -> b1 with %s:\n%s", issuedWeb, strings.Join(nodeA.FlowLines(), "\n"))
	}
}

// TestSPIRERotation: b1's SVID lives 20 s, so the SPIRE agent rotates it
// within the test; the policy that selects b1 by its issued ID holds on
// every probe across the rotation.
func TestSPIRERotation(t *testing.T) {
	e := newSPIREEnv(t)
	nodeB := e.topo.B()
	e.entry(t, nodeB, "web", "b1", spiffeid.RequireFromString(issuedWeb), 20*time.Second)
	a1, a2, b1, _ := e.twoByTwo()
	first := waitSVID(t, nodeB, "web/b1", spiffeid.RequireFromString(issuedWeb))
	nodeB.WriteStore("policy.yaml", webByIssuedID)
	if !blocked(a2, b1, 8080) || !reaches(a1, b1, 8080) {
		t.Fatal("the policy on b1's issued ID is not in force")
	}
	// Probe from now (the serial held now, which may already be a
	// rotated one) until three probes after a new serial appeared: one
	// rotation happens during the probes, within about a lifetime.
	first, _ = svidOf(identities(t, nodeB), "web/b1")
	if first.Serial == "" {
		t.Fatalf("b1 holds no SVID: %+v", first)
	}
	deadline := time.Now().Add(45 * time.Second)
	probes, before, after := 0, 0, 0
	cur := first
	for after < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("no rotation of b1's SVID (serial %s, expiring %v) in 45 s, %d probes", first.Serial, first.NotAfter, probes)
		}
		if !a1.TCPWorks(b1.IPv4, 8080) {
			t.Fatalf("probe %d: a1 cannot reach b1 (serial %s)", probes, cur.Serial)
		}
		if a2.TCPWorks(b1.IPv4, 8080) {
			t.Fatalf("probe %d: a2 reaches b1 (serial %s)", probes, cur.Serial)
		}
		probes++
		cur, _ = svidOf(identities(t, nodeB), "web/b1")
		if cur.SPIFFEID != issuedWeb || cur.Serial == "" {
			t.Fatalf("probe %d: b1's SVID is %+v", probes, cur)
		}
		if cur.Serial != first.Serial {
			after++
		} else {
			before++
		}
	}
	if !cur.NotAfter.After(first.NotAfter) {
		t.Errorf("rotated SVID expires %v, not after the first's %v", cur.NotAfter, first.NotAfter)
	}
	l := identities(t, nodeB)
	s, _ := svidOf(l, "web/b1")
	verifySVID(t, e.td, s, []byte(l.Source.BundlePEM), "rotated")
	if st := sourceStatus(t, nodeB); st.Rotations == 0 || !st.Healthy {
		t.Errorf("status after a rotation: %+v", st)
	}
	for prefix, want := range map[string]func(float64) bool{
		`bulkhead_svid_rotations_total{source="spire"}`:         func(v float64) bool { return v >= 1 },
		`bulkhead_svids_held{source="spire"}`:                   func(v float64) bool { return v == 1 },
		`bulkhead_svid_pods{source="spire",state="svid"}`:       func(v float64) bool { return v == 1 },
		`bulkhead_svid_pods{source="spire",state="no-svid"}`:    func(v float64) bool { return v == 1 }, // b2
		`bulkhead_identity_source_connected{source="spire"}`:    func(v float64) bool { return v == 1 },
		`bulkhead_svid_earliest_expiry_seconds{source="spire"}`: func(v float64) bool { return v > 0 && v <= 20 },
	} {
		if v, ok := metric(t, nodeB, prefix); !ok || !want(v) {
			t.Errorf("node B metric %s = %v (present %v)", prefix, v, ok)
		}
	}
	t.Logf("%d probes (%d before the rotation), serial %s -> %s", probes, before, first.Serial, cur.Serial)
}

// b2FromWeb lets only the pod with issuedWeb reach b2.
const b2FromWeb = `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: b2-from-web, namespace: web}
spec:
  selector: {podSelector: {matchLabels: {app: b2}}}
  ingress:
  - from: [{spiffeID: "` + issuedWeb + `"}]
    ports: [{port: 8080, protocol: TCP}]
`

// TestSPIREEntryDeletedRevokes: deleting b1's entry takes its SVID and
// issued ID away; b2, which admits only that ID, no longer admits b1.
func TestSPIREEntryDeletedRevokes(t *testing.T) {
	e := newSPIREEnv(t)
	nodeB := e.topo.B()
	entry := e.entry(t, nodeB, "web", "b1", spiffeid.RequireFromString(issuedWeb), 0)
	_, a2, b1, b2 := e.twoByTwo()
	waitSVID(t, nodeB, "web/b1", spiffeid.RequireFromString(issuedWeb))
	nodeB.WriteStore("policy.yaml", b2FromWeb)
	if !blocked(a2, b2, 8080) || !reaches(b1, b2, 8080) {
		t.Fatal("b2 does not admit exactly the pod with " + issuedWeb)
	}

	e.srv.DeleteEntry(t, entry)
	s := waitNoSVID(t, nodeB, "web/b1")
	t.Logf("b1 after the entry's deletion: %q", s.NoSVIDReason)
	derived := e.derived("web", "b1").String()
	if !twonode.Eventually(10*time.Second, func() bool {
		l := identities(t, nodeB)
		return !hasIdentity(l, issuedWeb) && hasIdentity(l, derived)
	}) {
		t.Fatalf("node B still knows b1 as %s: %+v", issuedWeb, identities(t, nodeB).Identities)
	}
	if !blocked(b1, b2, 8080) {
		t.Fatal("b2 still admits b1 after its SVID was revoked")
	}
	if st := sourceStatus(t, nodeB); st.PodsWithSVID != 0 || st.SVIDs != 0 {
		t.Errorf("status after the revocation: %+v", st)
	}
}

// openB1 lets a1 reach the pods labelled tier=open in web; everything else
// in web is denied.
const openB1 = webDenyAll + `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a1, namespace: web}
spec:
  podSelector: {matchLabels: {tier: open}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: client}}, podSelector: {matchLabels: {app: a1}}}]
    ports: [{port: 8080, protocol: TCP}]
`

// TestSPIREOutage: while node B's SPIRE agent is down, the source is
// unhealthy, held SVIDs stay, and a new pod is added and enforced without
// one; when it is back the new pod gets its SVID. While the SPIRE server is
// down, the SVIDs stay too.
func TestSPIREOutage(t *testing.T) {
	e := newSPIREEnv(t)
	nodeA, nodeB := e.topo.A(), e.topo.B()
	e.entry(t, nodeB, "web", "b1", e.derived("web", "b1"), 0)
	e.entry(t, nodeB, "web", "b4", e.id("/workload/b4"), 0)
	a1 := nodeA.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
	a2 := nodeA.AddPod("client", "a2", map[string]string{"app": "a2"}, "a2")
	b1 := nodeB.AddPod("web", "b1", map[string]string{"app": "b1", "tier": "open"}, "b1")
	b1.Serve(8080)
	e.topo.SyncPeers()
	nodeB.WriteStore("policy.yaml", openB1)
	held := waitSVID(t, nodeB, "web/b1", e.derived("web", "b1"))
	if !reaches(a1, b1, 8080) || !blocked(a2, b1, 8080) {
		t.Fatal("policy on b1 not in force")
	}

	// (a) Node B's SPIRE agent stops.
	e.agents[1].Stop(t)
	if !twonode.Eventually(30*time.Second, func() bool { return !sourceStatus(t, nodeB).Healthy }) {
		t.Fatalf("node B's source still healthy 30 s after its SPIRE agent stopped: %+v", sourceStatus(t, nodeB))
	}
	if st := sourceStatus(t, nodeB); st.LastError == "" {
		t.Errorf("unhealthy source without an error: %+v", st)
	}
	if s, _ := svidOf(identities(t, nodeB), "web/b1"); s.Serial != held.Serial || s.SPIFFEID != held.SPIFFEID {
		t.Fatalf("b1's held SVID changed while SPIRE is down: %+v, was %+v", s, held)
	}
	if sourceStatus(t, nodeA).Healthy != true {
		t.Errorf("node A's source unhealthy although its SPIRE agent runs: %+v", sourceStatus(t, nodeA))
	}
	// A pod added now gets its network and is enforced, with no SVID.
	b4 := nodeB.AddPod("web", "b4", map[string]string{"app": "b4", "tier": "open"}, "b4")
	b4.Serve(8080)
	e.topo.SyncPeers()
	s4 := waitNoSVID(t, nodeB, "web/b4")
	t.Logf("b4 while SPIRE is down: %q", s4.NoSVIDReason)
	if !reaches(a1, b4, 8080) {
		t.Fatal("a1 cannot reach b4, added while SPIRE was down")
	}
	if a2.TCPWorks(b4.IPv4, 8080) {
		t.Fatal("a2 reaches b4, added while SPIRE was down: not enforced")
	}
	if s, _ := svidOf(identities(t, nodeB), "web/b1"); s.Serial != held.Serial {
		t.Fatalf("b1's held SVID gone while SPIRE is down: %+v", s)
	}

	e.agents[1].Start(t)
	waitSVID(t, nodeB, "web/b4", e.id("/workload/b4"))
	if !twonode.Eventually(30*time.Second, func() bool { return sourceStatus(t, nodeB).Healthy }) {
		t.Fatalf("node B's source unhealthy 30 s after its SPIRE agent returned: %+v", sourceStatus(t, nodeB))
	}
	if s, _ := svidOf(identities(t, nodeB), "web/b1"); s.SPIFFEID != held.SPIFFEID || s.Serial == "" {
		t.Fatalf("b1 after SPIRE's return: %+v", s)
	}

	// (b) The SPIRE server stops: the agents keep their SVIDs. The
	// restarted SPIRE agent mints the pods' SVIDs anew (it keeps none on
	// disk) and delivers them as each stream reconnects: first wait until
	// the serials are steady for longer than its 5 s sync.
	serials := func() map[string]string {
		m := map[string]string{}
		for _, s := range identities(t, nodeB).SVIDs {
			m[s.Pod] = s.Serial
		}
		return m
	}
	before, steady := serials(), 0
	for settle := time.Now().Add(60 * time.Second); steady < 8; steady++ {
		if time.Now().After(settle) {
			t.Fatalf("node B's SVIDs still change 60 s after its SPIRE agent returned: %v", before)
		}
		time.Sleep(time.Second)
		if now := serials(); !maps.Equal(now, before) {
			before, steady = now, 0
		}
	}
	e.srv.Stop(t)
	for range 3 {
		time.Sleep(3 * time.Second)
		for pod, serial := range before {
			if s, _ := svidOf(identities(t, nodeB), pod); s.Serial != serial {
				t.Fatalf("%s's SVID changed while the SPIRE server is down: %+v, was %s", pod, s, serial)
			}
		}
		if !a1.TCPWorks(b1.IPv4, 8080) || !a1.TCPWorks(b4.IPv4, 8080) || a2.TCPWorks(b4.IPv4, 8080) {
			t.Fatal("enforcement changed while the SPIRE server is down")
		}
	}
	e.srv.Start(t)
	if !twonode.Eventually(30*time.Second, func() bool { return sourceStatus(t, nodeB).Healthy }) {
		t.Fatalf("node B's source unhealthy after the SPIRE server returned: %+v", sourceStatus(t, nodeB))
	}
	waitSVID(t, nodeB, "web/b4", e.id("/workload/b4"))
	waitSVID(t, nodeB, "web/b1", e.derived("web", "b1"))
	if !a1.TCPWorks(b4.IPv4, 8080) || a2.TCPWorks(b4.IPv4, 8080) {
		t.Fatal("enforcement changed after the SPIRE server returned")
	}
}

// shortTTL is the lifetime of the SVID in TestSPIREHeldUntilExpiry: short,
// so that it runs out while its SPIRE agent is down, and long enough
// (SPIRE renews at half life, syncing every 5 s) that a renewal always
// lands well before expiry.
const shortTTL = 20 * time.Second

// TestSPIREHeldUntilExpiry: while its SPIRE agent is down, a pod keeps the
// SVID it holds exactly until the certificate's NotAfter, then holds none
// and is told why; the SPIRE agent's return brings a new SVID.
func TestSPIREHeldUntilExpiry(t *testing.T) {
	e := newSPIREEnv(t)
	nodeB := e.topo.B()
	issued := e.id("/workload/short")
	e.entry(t, nodeB, "web", "b1", issued, shortTTL)
	nodeB.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	e.topo.SyncPeers()
	waitSVID(t, nodeB, "web/b1", issued)
	if !twonode.Eventually(10*time.Second, func() bool { return hasIdentity(identities(t, nodeB), issued.String()) }) {
		t.Fatalf("node B lists no identity %s: %+v", issued, identities(t, nodeB).Identities)
	}

	// Stop the SPIRE agent just after a renewal, so that the SVID it
	// leaves behind has most of its life ahead and no renewal races the
	// stop: wait for the serial to change.
	first, _ := svidOf(identities(t, nodeB), "web/b1")
	var held api.SVIDInfo
	if !twonode.Eventually(2*shortTTL, func() bool {
		held, _ = svidOf(identities(t, nodeB), "web/b1")
		return held.Serial != "" && held.Serial != first.Serial
	}) {
		t.Fatalf("b1's SVID (serial %s, expiring %v) not renewed in %v: %+v", first.Serial, first.NotAfter, 2*shortTTL, held)
	}
	e.agents[1].Stop(t)
	// A renewal delivered while the agent stopped is the one held.
	if s, _ := svidOf(identities(t, nodeB), "web/b1"); s.Serial != held.Serial {
		if s.Serial == "" || !s.NotAfter.After(held.NotAfter) {
			t.Fatalf("b1's SVID as its SPIRE agent stopped: %+v, was %+v", s, held)
		}
		held = s
	}
	if !held.NotAfter.After(time.Now()) {
		t.Fatalf("b1's SVID expired before its SPIRE agent stopped: %+v", held)
	}
	t.Logf("SPIRE agent stopped; b1 holds serial %s for %v more", held.Serial, time.Until(held.NotAfter).Round(100*time.Millisecond))

	// Until (nearly) NotAfter: the same SVID, every 500 ms.
	const margin = 2 * time.Second
	polls := 0
	for time.Now().Before(held.NotAfter.Add(-margin)) {
		s, _ := svidOf(identities(t, nodeB), "web/b1")
		if s.Serial != held.Serial || s.SPIFFEID != issued.String() || !s.NotAfter.Equal(held.NotAfter) {
			t.Fatalf("poll %d, %v before expiry: b1 holds %+v, want serial %s until %v",
				polls, time.Until(held.NotAfter).Round(100*time.Millisecond), s, held.Serial, held.NotAfter)
		}
		polls++
		time.Sleep(500 * time.Millisecond)
	}
	if polls == 0 {
		t.Fatalf("b1's SVID expiring %v left no time to check it is held", held.NotAfter)
	}
	if st := sourceStatus(t, nodeB); st.Healthy || st.LastError == "" {
		t.Errorf("node B's source with its SPIRE agent down: %+v", st)
	}

	// After NotAfter: no SVID, an expiry reason, and the derived identity
	// again. The agent checks expiry every second; allow for a slow
	// machine.
	const late = 10 * time.Second
	var s api.SVIDInfo
	if !twonode.Eventually(time.Until(held.NotAfter.Add(late)), func() bool {
		s, _ = svidOf(identities(t, nodeB), "web/b1")
		return s.Serial == "" && s.SPIFFEID == ""
	}) {
		t.Fatalf("b1 still holds an SVID %v after its NotAfter %v: %+v", late, held.NotAfter, s)
	}
	t.Logf("b1 dropped its SVID %v after NotAfter: %q", time.Since(held.NotAfter).Round(100*time.Millisecond), s.NoSVIDReason)
	if !strings.Contains(s.NoSVIDReason, "expired") {
		t.Errorf("b1's reason for no SVID does not mention expiry: %q", s.NoSVIDReason)
	}
	if !twonode.Eventually(10*time.Second, func() bool {
		l := identities(t, nodeB)
		return !hasIdentity(l, issued.String()) && hasIdentity(l, e.derived("web", "b1").String())
	}) {
		t.Errorf("node B still knows b1 as %s after its SVID expired: %+v", issued, identities(t, nodeB).Identities)
	}
	if st := sourceStatus(t, nodeB); st.Healthy || st.PodsWithSVID != 0 || st.SVIDs != 0 {
		t.Errorf("node B's source after b1's SVID expired: %+v", st)
	}

	// The SPIRE agent returns: a new SVID, a healthy source.
	e.agents[1].Start(t)
	again := waitSVID(t, nodeB, "web/b1", issued)
	if again.Serial == held.Serial {
		t.Errorf("b1 holds its expired serial %s again", held.Serial)
	}
	if !twonode.Eventually(30*time.Second, func() bool { return sourceStatus(t, nodeB).Healthy }) {
		t.Fatalf("node B's source unhealthy 30 s after its SPIRE agent returned: %+v", sourceStatus(t, nodeB))
	}
	l := identities(t, nodeB)
	cur, _ := svidOf(l, "web/b1")
	verifySVID(t, e.td, cur, []byte(l.Source.BundlePEM), "after SPIRE's return")
}
