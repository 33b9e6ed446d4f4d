package e2e

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/identity/devca"
	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/twonode"
)

// builtinSVIDWait is how long a pod may take to get its SVID: the built-in CA
// mints at once, but the machine is slow and shared.
const builtinSVIDWait = 30 * time.Second

var clusterTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// copyDir copies the regular files of src into dst (created 0700),
// keeping each file's mode: the CA refuses a key others may read.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatalf("read %s: %v", src, err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), data, info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
		// WriteFile's mode is masked by the umask: set it exactly.
		if err := os.Chmod(filepath.Join(dst, e.Name()), info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
}

func parseCerts(t *testing.T, what, data string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	rest := []byte(data)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatalf("%s: no certificate in %q", what, data)
	}
	return out
}

// waitSVIDs waits until every pod in want (key → SPIFFE ID) holds an SVID
// with that ID on c's node, and returns the node's SVIDs by pod.
func waitSVIDs(t *testing.T, node string, c *api.Client, want map[string]string, logs func() string) map[string]api.SVIDInfo {
	t.Helper()
	var last api.IdentityList
	var lastErr error
	ok := twonode.Eventually(builtinSVIDWait, func() bool {
		last, lastErr = c.ListIdentities(context.Background())
		if lastErr != nil {
			return false
		}
		got := map[string]api.SVIDInfo{}
		for _, s := range last.SVIDs {
			got[s.Pod] = s
		}
		for pod, id := range want {
			if got[pod].SPIFFEID != id || got[pod].CertificatePEM == "" {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("%s: pods did not get their SVIDs (want %v): last %+v, %v\nagent log:\n%s", node, want, last.SVIDs, lastErr, logs())
	}
	out := map[string]api.SVIDInfo{}
	for _, s := range last.SVIDs {
		out[s.Pod] = s
	}
	return out
}

// TestBuiltinCASharedByTwoAgents: two agents that share one built-in CA
// (node B got a copy of node A's CA folder) issue their pods the derived
// SPIFFE IDs, report one trust bundle, and every SVID of either node
// verifies against it, while an SVID of another CA, or an expired one of
// the same CA, does not.
func TestBuiltinCASharedByTwoAgents(t *testing.T) {
	topo := twonode.New(t, twonode.Config{
		NoStart:        true,
		ExtraAgentArgs: func(string) []string { return []string{"--identity-source", "builtin"} },
	})
	nodeA, nodeB := topo.A(), topo.B()
	for _, n := range topo.Nodes {
		n.WriteStore("namespaces.yaml", twoNodeNamespaces)
	}
	nodeA.StartAgent()
	caA := filepath.Join(nodeA.StateDir, "ca")
	for _, f := range []string{devca.KeyFile, devca.BundleFile} {
		if _, err := os.Stat(filepath.Join(caA, f)); err != nil {
			t.Fatalf("node A's agent created no CA: %v\n%s", err, nodeA.AgentLog())
		}
	}
	if err := os.MkdirAll(nodeB.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyDir(t, caA, filepath.Join(nodeB.StateDir, "ca"))
	nodeB.StartAgent()

	nodeA.AddPod("client", "a1", map[string]string{"app": "a1"}, "a1")
	nodeA.AddPod("client", "a2", map[string]string{"app": "a2"}, "a2")
	nodeB.AddPod("web", "b1", map[string]string{"app": "b1"}, "b1")
	svidsA := waitSVIDs(t, "node A", nodeA.Client, map[string]string{
		"client/a1": "spiffe://cluster.local/ns/client/sa/a1",
		"client/a2": "spiffe://cluster.local/ns/client/sa/a2",
	}, nodeA.AgentLog)
	svidsB := waitSVIDs(t, "node B", nodeB.Client, map[string]string{
		"web/b1": "spiffe://cluster.local/ns/web/sa/b1",
	}, nodeB.AgentLog)
	if len(svidsA) != 2 || len(svidsB) != 1 {
		t.Fatalf("SVIDs of other nodes' pods are followed: A %v, B %v", svidsA, svidsB)
	}

	stA, err := nodeA.Client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stB, err := nodeB.Client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if stA.IdentitySource == nil || stB.IdentitySource == nil {
		t.Fatalf("status has no identity source: A %+v, B %+v", stA.IdentitySource, stB.IdentitySource)
	}
	if stA.IdentitySource.Name != "builtin" || !stA.IdentitySource.Healthy || stA.IdentitySource.PodsWithSVID != 2 {
		t.Fatalf("node A identity source = %+v", stA.IdentitySource)
	}
	if stA.IdentitySource.BundlePEM == "" || stA.IdentitySource.BundlePEM != stB.IdentitySource.BundlePEM {
		t.Fatalf("the nodes report different bundles:\nA:\n%s\nB:\n%s", stA.IdentitySource.BundlePEM, stB.IdentitySource.BundlePEM)
	}
	bundleFile, err := os.ReadFile(filepath.Join(caA, devca.BundleFile))
	if err != nil {
		t.Fatal(err)
	}
	if !parseCerts(t, "bundle file", string(bundleFile))[0].Equal(parseCerts(t, "status bundle", stA.IdentitySource.BundlePEM)[0]) {
		t.Fatal("the status bundle is not the CA folder's")
	}
	bundle := x509bundle.FromX509Authorities(clusterTD, parseCerts(t, "bundle", stA.IdentitySource.BundlePEM))

	// Every SVID of both nodes verifies against the one bundle, as its pod's ID.
	for _, svids := range []map[string]api.SVIDInfo{svidsA, svidsB} {
		for pod, s := range svids {
			certs := parseCerts(t, pod, s.CertificatePEM)
			id, _, err := x509svid.Verify(certs, bundle)
			if err != nil {
				t.Fatalf("SVID of %s does not verify against the shared bundle: %v", pod, err)
			}
			if id.String() != s.SPIFFEID {
				t.Fatalf("SVID of %s verifies as %s, reported %s", pod, id, s.SPIFFEID)
			}
			if got := certs[0].SerialNumber.Text(16); !strings.EqualFold(strings.TrimLeft(s.Serial, "0"), got) {
				t.Fatalf("SVID of %s: reported serial %s, certificate's %s", pod, s.Serial, got)
			}
		}
	}

	quiet := devca.Options{Logger: slog.New(slog.DiscardHandler)}
	someID := spiffeid.RequireFromString("spiffe://cluster.local/ns/client/sa/a1")

	// An SVID of another CA of the same trust domain does not verify.
	other, err := devca.Open(t.TempDir(), clusterTD, quiet)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := other.Mint(someID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(foreign.Certificates, bundle); err == nil {
		t.Fatal("an SVID of another CA verifies against the shared bundle")
	}

	// An expired SVID of the shared CA does not verify once it expired
	// (and does before: the failure is its expiry, not its CA).
	copyOfCA := filepath.Join(t.TempDir(), "ca")
	copyDir(t, caA, copyOfCA)
	same, err := devca.Open(copyOfCA, clusterTD, quiet)
	if err != nil {
		t.Fatal(err)
	}
	short, err := same.Mint(someID, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	leaf := short.Certificates[0]
	if _, _, err := x509svid.Verify(short.Certificates, bundle, x509svid.WithTime(leaf.NotBefore.Add(time.Second))); err != nil {
		t.Fatalf("a fresh SVID of the shared CA does not verify: %v", err)
	}
	if _, _, err := x509svid.Verify(short.Certificates, bundle, x509svid.WithTime(leaf.NotAfter.Add(time.Second))); err == nil {
		t.Fatal("an expired SVID verifies")
	}

	// `bulkhead identities` shows each local pod's serial and expiry.
	out, err := runCLI(t, nodeA.Socket, "identities")
	if err != nil {
		t.Fatalf("bulkhead identities: %v\n%s", err, out)
	}
	for pod, s := range svidsA {
		line := lineWith(out, pod+" ")
		if line == "" {
			t.Fatalf("no SVID line for %s in:\n%s", pod, out)
		}
		// The SVID may have rotated since; the CLI shows the current one.
		cur := currentSVID(t, nodeA.Client, pod)
		for _, want := range []string{s.SPIFFEID, cur.Serial, cur.NotAfter.UTC().Format(time.RFC3339)} {
			if !strings.Contains(line, want) {
				t.Fatalf("SVID line of %s lacks %q:\n%s", pod, want, out)
			}
		}
	}
	if !strings.Contains(out, "source builtin, healthy") || !strings.Contains(out, "SERIAL") {
		t.Fatalf("identities output lacks the source line or the SVID table:\n%s", out)
	}
}

// TestBuiltinNoneIssuesNothing: with --identity-source none the agent
// creates no CA, follows no pod and shows no SVID.
func TestBuiltinNoneIssuesNothing(t *testing.T) {
	e := newEnv(t, "ptp")
	e.extraArgs = []string{"--identity-source", "none"}
	e.writeStore("shop.yaml", shopStore)
	e.startAgent()
	e.addPod("shop", "frontend")

	st, err := e.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.IdentitySource == nil || st.IdentitySource.Name != "none" || st.IdentitySource.BundlePEM != "" ||
		st.IdentitySource.PodsFollowed != 0 {
		t.Fatalf("status identity source = %+v", st.IdentitySource)
	}
	l, err := e.client.ListIdentities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(l.SVIDs) != 0 || (l.Source != nil && l.Source.Name != "none") {
		t.Fatalf("identities with source none: source %+v, SVIDs %+v", l.Source, l.SVIDs)
	}
	// The pod still has its derived identity: only the SVIDs are absent.
	found := false
	for _, id := range l.Identities {
		if id.SPIFFEID == "spiffe://cluster.local/ns/shop/sa/frontend" && id.Endpoints > 0 {
			found = true
		}
	}
	if !found {
		t.Fatalf("no identity for the pod: %+v", l.Identities)
	}
	if _, err := os.Stat(filepath.Join(e.stateDir, "ca")); !os.IsNotExist(err) {
		t.Fatalf("a CA folder exists with source none: %v", err)
	}
	out, err := runCLI(t, e.socket, "identities")
	if err != nil {
		t.Fatalf("bulkhead identities: %v\n%s", err, out)
	}
	if strings.Contains(out, "SERIAL") || strings.Contains(out, "SVIDs of this node") {
		t.Fatalf("identities shows SVIDs with source none:\n%s", out)
	}
}

// runCLI runs bin/bulkhead against the agent at socket.
func runCLI(t *testing.T, socket string, args ...string) (string, error) {
	t.Helper()
	bin := filepath.Join(cnichain.RepoRoot(t), "bin", "bulkhead")
	out, err := exec.Command(bin, append([]string{"--socket", socket}, args...)...).CombinedOutput()
	return string(out), err
}

func lineWith(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

func currentSVID(t *testing.T, c *api.Client, pod string) api.SVIDInfo {
	t.Helper()
	l, err := c.ListIdentities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range l.SVIDs {
		if s.Pod == pod {
			return s
		}
	}
	t.Fatalf("no SVID entry for %s", pod)
	return api.SVIDInfo{}
}
