package author

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// shopFlow is one flow record of the shop store: src and dst are "ns/pod"
// (with ip) or, with ns "", an address.
func shopFlow(src, srcIP, dst, dstIP string, port int, verdict string, reply bool) string {
	ep := func(name string) map[string]any {
		ns, pod, ok := strings.Cut(name, "/")
		if !ok {
			return map[string]any{"labels": []string{"reserved:world"}}
		}
		return map[string]any{"namespace": ns, "pod_name": pod}
	}
	rec := map[string]any{"time": "2026-12-07T10:00:00Z", "verdict": verdict,
		"IP":     map[string]any{"source": srcIP, "destination": dstIP},
		"l4":     map[string]any{"TCP": map[string]any{"source_port": 40000, "destination_port": port}},
		"source": ep(src), "destination": ep(dst), "is_reply": reply, "traffic_direction": "EGRESS"}
	data, _ := json.Marshal(rec)
	return string(data) + "\n"
}

func writeChange(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// shopFlows: monitor reaches db (allowed today); api and frontend tried db
// (denied today), a reply, and a flow of a pod the store does not have.
var shopFlows = shopFlow("ops/monitor", "10.2.0.5", "shop/db", "10.1.0.12", 5432, "FORWARDED", false) +
	shopFlow("ops/monitor", "10.2.0.5", "shop/db", "10.1.0.12", 5432, "FORWARDED", false) +
	shopFlow("shop/api", "10.1.0.10", "shop/db", "10.1.0.12", 5432, "DROPPED", false) + // its egress is isolated
	shopFlow("shop/frontend", "10.1.0.11", "shop/db", "10.1.0.12", 5432, "DROPPED", false) +
	shopFlow("shop/db", "10.1.0.12", "ops/monitor", "10.2.0.5", 40000, "FORWARDED", true) +
	shopFlow("shop/gone", "10.1.0.99", "shop/db", "10.1.0.12", 5432, "FORWARDED", false)

const dbFromFrontend = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 5432}]
`

func TestImpactDropsAndAllows(t *testing.T) {
	// The change replaces NetworkPolicy shop/db (ops loses db) and adds
	// one (frontend gains it).
	change := writeChange(t, map[string]string{"db.yaml": dbOnlyAPI, "new.yml": dbFromFrontend})
	var out bytes.Buffer
	im, err := RunImpact(ImpactOptions{Store: shopStore, Change: []string{change}}, strings.NewReader(shopFlows), "flows.json", &out)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out.String())
	if want := []string{"NetworkPolicy shop/db"}; fmt.Sprint(im.Replaced) != fmt.Sprint(want) {
		t.Errorf("replaced %v, want %v", im.Replaced, want)
	}
	if want := []string{"NetworkPolicy shop/db-from-frontend"}; fmt.Sprint(im.Added) != fmt.Sprint(want) {
		t.Errorf("added %v, want %v", im.Added, want)
	}
	if im.Records != 6 || im.Replayed != 4 || im.Replies != 1 || im.NotInStore != 1 || fmt.Sprint(im.MissingPods) != "[shop/gone]" {
		t.Errorf("counts: %+v", im)
	}
	if im.Disagree != 0 {
		t.Errorf("%d records disagree with the current store", im.Disagree)
	}
	if len(im.NewlyDropped) != 1 || len(im.NewlyAllowed) != 1 || len(im.Changed) != 0 {
		t.Fatalf("dropped %d, allowed %d, changed %d groups", len(im.NewlyDropped), len(im.NewlyAllowed), len(im.Changed))
	}
	d := im.NewlyDropped[0]
	if d.From.String() != "ops [app=monitor]" || d.To.String() != "shop [app=db]" || d.Ports() != "5432/TCP" || d.Flows != 2 {
		t.Errorf("dropped: %s -> %s %s, %d flows", d.From, d.To, d.Ports(), d.Flows)
	}
	if d.Old.Reason != "ingress NetworkPolicy shop/db ingress[0] (allow)" || d.New.Reason != "ingress default deny (isolated by NetworkPolicy shop/db, NetworkPolicy shop/db-from-frontend)" {
		t.Errorf("dropped: was %q, now %q", d.Old.Reason, d.New.Reason)
	}
	a := im.NewlyAllowed[0]
	if a.From.String() != "shop [app=frontend]" || a.Flows != 1 || !strings.Contains(a.New.Reason, "NetworkPolicy shop/db-from-frontend ingress[0]") {
		t.Errorf("allowed: %s -> %s, %d flows, now %q", a.From, a.To, a.Flows, a.New.Reason)
	}
	for _, s := range []string{"newly dropped: 2 flow records in 1 group", "from ops [app=monitor]", "newly allowed: 1 flow record in 1 group",
		"pods not in the store: shop/gone"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("text lacks %q", s)
		}
	}

	// The CI gate.
	out.Reset()
	_, err = RunImpact(ImpactOptions{Store: shopStore, Change: []string{change}, FailOnDrop: true, Output: "json"},
		strings.NewReader(shopFlows), "flows.json", &out)
	if !errors.Is(err, ErrFlowsDropped) || !strings.Contains(err.Error(), "2 flow records in 1 group") {
		t.Errorf("--fail-on-drop: %v", err)
	}
	var back Impact
	if err := json.Unmarshal(out.Bytes(), &back); err != nil || len(back.NewlyDropped) != 1 || back.NewlyDropped[0].Flows != 2 ||
		back.NewlyDropped[0].New.Verdict != "deny" {
		t.Errorf("json: %v %s", err, out.String())
	}
	// Only what opens: the gate passes.
	open := writeChange(t, map[string]string{"new.yaml": dbFromFrontend})
	if _, err := RunImpact(ImpactOptions{Store: shopStore, Change: []string{filepath.Join(open, "new.yaml")}, FailOnDrop: true},
		strings.NewReader(shopFlows), "flows.json", &bytes.Buffer{}); err != nil {
		t.Errorf("a change that only opens: %v", err)
	}
}

func TestImpactBadInput(t *testing.T) {
	good := writeChange(t, map[string]string{"db.yaml": dbOnlyAPI})
	dup := writeChange(t, map[string]string{"a.yaml": dbOnlyAPI, "b.yaml": dbOnlyAPI})
	bad := writeChange(t, map[string]string{"bad.yaml": strings.Replace(dbOnlyAPI, "port: pg", "port: 0", 1)})
	empty := writeChange(t, map[string]string{"empty.yaml": "# nothing\n"})
	for _, tc := range []struct {
		name   string
		change []string
		flows  string
		want   string
	}{
		{"bad flow line", []string{good}, shopFlows + "{not json\n", "flows.json:7: bad flow record"},
		{"invalid object", []string{bad}, shopFlows, "bad.yaml:"},
		{"twice in the change", []string{dup}, shopFlows, "b.yaml:1: NetworkPolicy shop/db: already defined at " + filepath.Join(dup, "a.yaml") + ":1"},
		{"empty change", []string{empty}, shopFlows, ErrEmptyChange.Error()},
		{"missing change", []string{filepath.Join(good, "nope.yaml")}, shopFlows, "nope.yaml: no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			_, err := RunImpact(ImpactOptions{Store: shopStore, Change: tc.change}, strings.NewReader(tc.flows), "flows.json", &out)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want it to say %q", err, tc.want)
			}
			if out.Len() != 0 {
				t.Errorf("wrote output on bad input:\n%s", out.String())
			}
		})
	}
}

// TestImpactAgreesWithEachFlow: the replay judges once per class pair and
// port; judging every record on its own, by its pods, must give the same
// groups and counts.
func TestImpactAgreesWithEachFlow(t *testing.T) {
	w, _, log := bigLog(20_000)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "store.yaml"), []byte(w.yaml), 0o600)
	// Isolate ns0's ingress to its own namespace, and let ns1 pods out
	// to ns2 only: drops in both directions.
	change := writeChange(t, map[string]string{"c.yaml": ns0Only + `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: to-ns2, namespace: ns1}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: t2}}}]
`})
	p, err := LoadProposal(dir, []string{change})
	if err != nil {
		t.Fatal(err)
	}
	im, err := Replay(p, strings.NewReader(log), "log")
	if err != nil {
		t.Fatal(err)
	}
	in, err := ReadFlows(strings.NewReader(log), "log")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{} // "dropped|allowed from to port" -> records
	for _, rec := range in.Records {
		if rec.IsReply || rec.ICMP {
			continue
		}
		var peers [4]explain.Peer
		for i, e := range []struct {
			off *explain.Offline
			p   *FlowPeer
		}{{p.Current.Offline, &rec.Source}, {p.Current.Offline, &rec.Dest}, {p.Proposed.Offline, &rec.Source}, {p.Proposed.Offline, &rec.Dest}} {
			if peers[i], err = e.off.Peer(end(e.p)); err != nil {
				t.Fatal(err)
			}
		}
		ro := explain.Verdict(p.Current.Offline.MapState, peers[0], peers[1], rec.Proto, rec.Port)
		rn := explain.Verdict(p.Proposed.Offline.MapState, peers[2], peers[3], rec.Proto, rec.Port)
		if ro.Combined == rn.Combined {
			continue
		}
		kind := "allowed"
		if rn.Combined == "deny" {
			kind = "dropped"
		}
		want[fmt.Sprintf("%s %s %s %d/%d", kind, end(&rec.Source), end(&rec.Dest), rec.Port, rec.Proto)]++
	}
	got := map[string]int{}
	total := 0
	for kind, l := range map[string][]ImpactChange{"dropped": im.NewlyDropped, "allowed": im.NewlyAllowed, "changed": im.Changed} {
		for _, g := range l {
			total += g.Flows
			// A group's flows are those of its members' pairs.
			n := 0
			for _, from := range membersOrAddr(g.From) {
				for _, to := range membersOrAddr(g.To) {
					n += want[fmt.Sprintf("%s %s %s %d/%d", kind, from, to, g.PortLo, g.proto)]
				}
			}
			got[kind] += n
			if n != g.Flows {
				t.Errorf("%s %s -> %s %s: %d flows, judged one by one %d", kind, g.From, g.To, g.Ports(), g.Flows, n)
			}
		}
	}
	wantTotal := 0
	for _, n := range want {
		wantTotal += n
	}
	if total != wantTotal || len(im.NewlyDropped) == 0 {
		t.Errorf("%d records in groups, %d judged one by one to change (%d dropped groups)", total, wantTotal, len(im.NewlyDropped))
	}
	t.Logf("%d records, %d replayed, %d change verdict (%d newly dropped groups, %d newly allowed)", im.Records, im.Replayed, total,
		len(im.NewlyDropped), len(im.NewlyAllowed))
}

func membersOrAddr(c *Class) []string {
	if c.Kind == "pod" {
		return c.Pods
	}
	return []string{c.CIDR}
}

func end(p *FlowPeer) string {
	if p.IsPod() {
		return p.Namespace + "/" + p.Pod
	}
	return p.Addr.String()
}
