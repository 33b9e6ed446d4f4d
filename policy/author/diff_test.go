package author

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/explain"
)

const shopStore = "../testdata/stores/shop"

// copyStore copies a store folder and applies edits (file name -> new
// content; "" removes the file).
func copyStore(t *testing.T, from string, edits map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range edits {
		p := filepath.Join(dir, name)
		if content == "" {
			os.Remove(p)
			continue
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// dbOnlyAPI narrows shop/db's NetworkPolicy: ops may no longer connect.
const dbOnlyAPI = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
    ports: [{port: pg}]
`

// frontendEgress isolates frontend's egress: only 8080-8090 to api, and
// 53/UDP to the cluster resolvers' block.
const frontendEgress = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: frontend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080, endPort: 8090}]
  - to: [{ipBlock: {cidr: 10.96.0.0/12}}]
    ports: [{port: 53, protocol: UDP}]
`

func compareDirs(t *testing.T, oldDir, newDir string) *Diff {
	t.Helper()
	oldS, err := LoadState(oldDir)
	if err != nil {
		t.Fatal(err)
	}
	newS, err := LoadState(newDir)
	if err != nil {
		t.Fatal(err)
	}
	return Compare(oldS, newS)
}

func find(d *Diff, from, to, ports string) *Change {
	for i := range d.Changes {
		c := &d.Changes[i]
		if c.From.String() == from && c.To.String() == to && c.Ports() == ports {
			return c
		}
	}
	return nil
}

func TestDiffSameStoreHasNoChanges(t *testing.T) {
	d := compareDirs(t, shopStore, copyStore(t, shopStore, nil))
	if len(d.Changes) != 0 || len(d.OnlyOld) != 0 || len(d.OnlyNew) != 0 {
		t.Fatalf("identical stores differ: %s", DiffText(d))
	}
}

func TestDiffNarrowedIngress(t *testing.T) {
	d := compareDirs(t, shopStore, copyStore(t, shopStore, map[string]string{"db.yaml": dbOnlyAPI, "policies.yaml": withoutDBPolicy(t)}))
	// Only ops/monitor loses 5432/TCP to db; api's egress was already
	// closed by its BulkheadPolicy, so its verdict does not change.
	if len(d.Changes) != 1 {
		t.Fatalf("want exactly one change:\n%s", DiffText(d))
	}
	c := find(d, "ops [app=monitor]", "shop [app=db]", "5432/TCP")
	if c == nil {
		t.Fatalf("monitor -> db 5432/TCP not reported:\n%s", DiffText(d))
	}
	if c.Old.Verdict != "allow" || c.New.Verdict != "deny" ||
		c.Old.Reason != "ingress NetworkPolicy shop/db ingress[0] (allow)" || c.New.Reason != "ingress default deny" {
		t.Fatalf("got %+v / %+v", c.Old, c.New)
	}
}

// withoutDBPolicy is the shop store's policies.yaml up to db's
// NetworkPolicy, which is its last document.
func withoutDBPolicy(t *testing.T) string {
	t.Helper()
	const start = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop}"
	data, err := os.ReadFile(filepath.Join(shopStore, "policies.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(data), start)
	if i < 0 {
		t.Fatal("policies.yaml no longer ends with db's NetworkPolicy")
	}
	return string(data[:i])
}

func TestDiffEgressIsolationRangesAndCIDR(t *testing.T) {
	d := compareDirs(t, shopStore, copyStore(t, shopStore, map[string]string{"frontend.yaml": frontendEgress}))
	text := DiffText(d)
	// frontend -> api stays allowed on 8080 (api's ingress allows it; the
	// new egress rule allows 8080-8090); every other port to api was
	// already denied at api's ingress, so nothing changes there.
	if c := find(d, "shop [app=frontend]", "shop [app=api]", "8080/TCP"); c != nil {
		t.Errorf("8080 to api should not change:\n%s", text)
	}
	// frontend -> db on 5432 was already denied (db admits api and ops
	// only); frontend -> monitor was open and is now closed on every port
	// of every protocol, as three ranges per protocol at most.
	c := find(d, "shop [app=frontend]", "ops [app=monitor]", "1-65535/SCTP")
	if c == nil || c.Old.Verdict != "allow" || c.New.Verdict != "deny" || c.New.Reason != "egress default deny" {
		t.Fatalf("frontend -> monitor SCTP: %+v\n%s", c, text)
	}
	// UDP to monitor: closed everywhere; 53/UDP to the world address is
	// outside 10.96.0.0/12 and closes too, but 53/UDP into the block stays
	// open.
	if find(d, "shop [app=frontend]", "cidr 10.96.0.0/12", "53/UDP") != nil {
		t.Errorf("53/UDP to the resolver block should stay open:\n%s", text)
	}
	if c := find(d, "shop [app=frontend]", "cidr 10.96.0.0/12", "1-52/UDP"); c == nil || c.New.Verdict != "deny" {
		t.Errorf("1-52/UDP to the resolver block should close:\n%s", text)
	}
	if c := find(d, "shop [app=frontend]", "world (192.0.2.1)", "1-65535/TCP"); c == nil {
		t.Errorf("TCP to the world should close:\n%s", text)
	}
	// The pods are IPv4 only: no IPv6 peer has traffic with them.
	if strings.Contains(text, "2001:db8") {
		t.Errorf("an IPv6 peer of IPv4-only pods:\n%s", text)
	}
	// Nothing about other sources changed.
	for _, c := range d.Changes {
		if c.From.String() != "shop [app=frontend]" {
			t.Errorf("unexpected change from %s: %s", c.From, c.Ports())
		}
	}
}

func TestRunDiffFailOnChangeAndJSON(t *testing.T) {
	newDir := copyStore(t, shopStore, map[string]string{"frontend.yaml": frontendEgress})
	var out bytes.Buffer
	if err := RunDiff(DiffOptions{Old: shopStore, New: newDir, Output: "json"}, &out); err != nil {
		t.Fatalf("without --fail-on-change a change is not an error: %v", err)
	}
	var d struct {
		Changes []struct {
			From struct {
				Kind string
				Pods []string
			}
			Protocol string
			Port     uint16
			EndPort  uint16 `json:"end_port"`
			Old, New struct{ Verdict, Reason string }
		}
	}
	if err := json.Unmarshal(out.Bytes(), &d); err != nil || len(d.Changes) == 0 {
		t.Fatalf("json: %v\n%s", err, out.String())
	}
	if d.Changes[0].From.Pods[0] != "shop/frontend" || d.Changes[0].New.Reason == "" || d.Changes[0].EndPort < d.Changes[0].Port {
		t.Fatalf("json change: %+v", d.Changes[0])
	}
	err := RunDiff(DiffOptions{Old: shopStore, New: newDir, FailOnChange: true}, &out)
	if !errors.Is(err, ErrVerdictsChanged) {
		t.Fatalf("--fail-on-change with changes: got %v", err)
	}
	if err := RunDiff(DiffOptions{Old: shopStore, New: shopStore, FailOnChange: true}, &out); err != nil {
		t.Fatalf("--fail-on-change without changes: %v", err)
	}
	if err := RunDiff(DiffOptions{Old: shopStore, New: "testdata/nope"}, &out); err == nil {
		t.Fatal("missing folder accepted")
	}
	bad := copyStore(t, shopStore, map[string]string{"bad.yaml": "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: x, namespace: shop}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: nope}}]}]}\n"})
	if err := RunDiff(DiffOptions{Old: shopStore, New: bad}, &out); err == nil || !strings.Contains(err.Error(), "bad.yaml:") {
		t.Fatalf("invalid new store: want an error naming the file and line, got %v", err)
	}
}

func TestDiffPodsInOneStateOnly(t *testing.T) {
	extra := "apiVersion: v1\nkind: Pod\nmetadata: {name: cache, namespace: shop, labels: {app: cache}}\nstatus: {podIPs: [{ip: 10.1.0.20}]}\n"
	d := compareDirs(t, shopStore, copyStore(t, shopStore, map[string]string{"cache.yaml": extra}))
	if len(d.OnlyNew) != 1 || d.OnlyNew[0] != "shop/cache" || len(d.Changes) != 0 {
		t.Fatalf("got %s", DiffText(d))
	}
}

func TestDiffGit(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("no git")
	}
	repo := t.TempDir()
	sub := filepath.Join(repo, "clusters", "prod")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", repo, "-c", "user.name=t", "-c", "user.email=t@example.com"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	run("init", "-q")
	for _, f := range []string{"namespaces.yaml", "pods.yaml", "policies.yaml"} {
		data, _ := os.ReadFile(filepath.Join(shopStore, f))
		os.WriteFile(filepath.Join(sub, f), data, 0o600)
	}
	run("add", ".")
	run("commit", "-q", "-m", "one")
	os.WriteFile(filepath.Join(sub, "frontend.yaml"), []byte(frontendEgress), 0o600)
	run("add", ".")
	run("commit", "-q", "-m", "two")
	// Uncommitted: must not be seen.
	os.WriteFile(filepath.Join(sub, "broken.yaml"), []byte("{{{"), 0o600)

	var out bytes.Buffer
	if err := RunDiff(DiffOptions{Old: sub, Git: "HEAD~1..HEAD", FailOnChange: true}, &out); !errors.Is(err, ErrVerdictsChanged) {
		t.Fatalf("git diff: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "from shop [app=frontend]") || !strings.Contains(out.String(), "HEAD~1:") {
		t.Fatalf("git diff text:\n%s", out.String())
	}
	out.Reset()
	if err := RunDiff(DiffOptions{Old: sub, Git: "HEAD..HEAD", FailOnChange: true}, &out); err != nil {
		t.Fatalf("same revision: %v", err)
	}
	for _, bad := range []string{"HEAD", "..HEAD", "HEAD...HEAD~1", "nope..HEAD"} {
		if err := RunDiff(DiffOptions{Old: sub, Git: bad}, &out); err == nil {
			t.Errorf("--git %q accepted", bad)
		}
	}
	// A broken file committed is reported by its path at the revision.
	run("add", ".")
	run("commit", "-q", "-m", "three")
	err := RunDiff(DiffOptions{Old: sub, Git: "HEAD~1..HEAD"}, &out)
	if err == nil || !strings.Contains(err.Error(), "HEAD:clusters/prod/broken.yaml") {
		t.Fatalf("broken file at a revision: %v", err)
	}
}

// TestDiffAgreesWithPortByPort: for every pair of classes, a port is in a
// reported change exactly when explain.Verdict answers differently in the
// two states, on every port near a boundary and on a sample of the rest.
func TestDiffAgreesWithPortByPort(t *testing.T) {
	const scattered = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: scattered, namespace: ops}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: shop}}}]
    ports: [{port: 1000, endPort: 1010}, {port: 1005, endPort: 2000, protocol: UDP}, {port: 7}]
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
    ports: [{port: 65535}, {port: 1, protocol: SCTP}]
`
	variants := map[string]map[string]string{
		"frontend egress": {"frontend.yaml": frontendEgress},
		"scattered ops":   {"ops.yaml": scattered},
		"both":            {"ops.yaml": scattered, "frontend.yaml": frontendEgress, "db.yaml": dbOnlyAPI, "policies.yaml": withoutDBPolicy(t)},
	}
	for name, edits := range variants {
		t.Run(name, func(t *testing.T) {
			oldS, err := LoadState(shopStore)
			if err != nil {
				t.Fatal(err)
			}
			newS, err := LoadState(copyStore(t, shopStore, edits))
			if err != nil {
				t.Fatal(err)
			}
			d := Compare(oldS, newS)
			if len(d.Changes) == 0 {
				t.Fatal("no changes: the variant tests nothing")
			}
			// Every port around the boundaries of the stores' rules, and
			// every 97th port in between.
			ports := map[uint16]bool{}
			for _, r := range [][2]int{{1, 12}, {50, 56}, {995, 1015}, {1995, 2010}, {5425, 5440}, {8075, 8095}, {65525, 65535}} {
				for p := r[0]; p <= r[1]; p++ {
					ports[uint16(p)] = true
				}
			}
			for p := 1; p <= 65535; p += 97 {
				ports[uint16(p)] = true
			}
			pods, _, _ := podClasses(oldS, newS)
			classes := append(pods, externalClasses(oldS, newS)...)
			checked := 0
			for _, from := range classes {
				for _, to := range classes {
					if (from.Kind != "pod" && to.Kind != "pod") || (from == to && len(from.Pods) == 1) {
						continue
					}
					sO, sN, _ := peers(from, oldS, newS)
					dO, dN, _ := peers(to, oldS, newS)
					if !shareFamily(sO, dO) {
						continue
					}
					for _, proto := range diffProtos {
						for port := range ports {
							ro := explain.Verdict(oldS.Offline.MapState, sO, dO, proto, port)
							rn := explain.Verdict(newS.Offline.MapState, sN, dN, proto, port)
							c := findPort(d, from.String(), to.String(), explain.ProtoName(proto), port)
							checked++
							if (ro.Combined != rn.Combined) != (c != nil) {
								t.Fatalf("%s -> %s %d/%s: %s then %s, diff reports %+v", from, to, port, explain.ProtoName(proto), ro.Combined, rn.Combined, c)
							}
							if c != nil && (c.Old.Verdict != ro.Combined || c.New.Verdict != rn.Combined) {
								t.Fatalf("%s -> %s %d/%s: %s then %s, diff says %s then %s", from, to, port, explain.ProtoName(proto), ro.Combined, rn.Combined, c.Old.Verdict, c.New.Verdict)
							}
						}
					}
				}
			}
			t.Logf("%d changes; %d (class pair, port) verdicts checked", len(d.Changes), checked)
		})
	}
}

func findPort(d *Diff, from, to, proto string, port uint16) *Change {
	for i := range d.Changes {
		c := &d.Changes[i]
		if c.From.String() == from && c.To.String() == to && c.Protocol == proto && c.PortLo <= port && port <= c.PortHi {
			return c
		}
	}
	return nil
}

// TestDiffTextSingular: one change reads "1 verdict change", not "1
// verdict changes".
func TestDiffTextSingular(t *testing.T) {
	from := &Class{Kind: "addr", CIDR: "192.0.2.1"}
	d := &Diff{Changes: []Change{{From: from, To: from, Protocol: "TCP", PortLo: 80, PortHi: 80,
		Old: Outcome{Verdict: "allow"}, New: Outcome{Verdict: "deny"}}}}
	if out := DiffText(d); !strings.Contains(out, "\n1 verdict change:\n") {
		t.Errorf("got:\n%s", out)
	}
	d.Changes = append(d.Changes, d.Changes[0])
	if out := DiffText(d); !strings.Contains(out, "\n2 verdict changes:\n") {
		t.Errorf("got:\n%s", out)
	}
}
