package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a.yaml", `# comment only document
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  serviceAccountName: api
  containers:
  - name: c
    image: x
    resources: {limits: {cpu: "1"}}
    ports: [{name: http, containerPort: 8080}, {containerPort: 9000}, {name: dns, containerPort: 53, protocol: UDP}]
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
`)
	write("b.yaml", `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop}
spec: {podSelector: {}}
`)
	write("ignored.txt", "not yaml")
	res, err := Load(dir, Options{AllLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	s := res.Snapshot
	if len(s.Namespaces) != 1 || len(s.Pods) != 1 || len(s.NetworkPolicies) != 1 {
		t.Fatalf("got %+v", s)
	}
	p := s.Pods[0]
	if p.ServiceAccount != "api" || p.Endpoint != 1 || len(p.IPs) != 2 || len(p.Ports) != 2 ||
		p.Ports[1] != (policy.NamedPort{Name: "dns", Port: 53, Proto: policy.ProtoUDP}) {
		t.Fatalf("pod: %+v", p)
	}
	if res.Objects[1].Line != 7 {
		t.Fatalf("pod line: got %d, want 7", res.Objects[1].Line)
	}
}

func TestErrorsHaveFileAndLine(t *testing.T) {
	tests := []struct{ data, want string }{
		{"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIPs: [{ip: nope}]}\n", "f.yaml:1: Pod default/p: status.podIPs[0]"},
		{"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {hostIPs: [{ip: 10.0.0.1}, {ip: 10.0.0}]}\n", "f.yaml:1: Pod default/p: status.hostIPs[1]"},
		{"\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nstatus: {hostIP: \"node-1\"}\n", "f.yaml:3: Pod a/p: status.hostIP: ParseAddr(\"node-1\")"},
		{"a: [\n", "f.yaml:1: parse yaml"},
		{"---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n", "f.yaml:2: unsupported apiVersion"},
		{"- just\n- a list\n", "f.yaml:1: document is not an object"},
		{"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 70000\n", "f.yaml:8: NetworkPolicy default/x: spec.ingress[0].ports[0].port"},
	}
	for _, tt := range tests {
		objs, err := Parse("f.yaml", []byte(tt.data))
		if err == nil {
			_, err = Build(objs, Options{})
		}
		var e *Error
		if !errors.As(err, &e) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: got %v, want an *Error containing %q", tt.data, err, tt.want)
		}
	}
}

func TestDuplicateObjects(t *testing.T) {
	doc := "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"
	objs, err := Parse("f.yaml", []byte(doc+"---\n"+doc))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Build(objs, Options{}); err == nil || !strings.Contains(err.Error(), "f.yaml:5: Namespace a: already defined at f.yaml:1") {
		t.Fatalf("got %v", err)
	}
}

// The apiserver matches field names case-sensitively and, with strict field
// validation, rejects unknown ones. encoding/json matches them
// case-insensitively, so "PodSelector" used to be taken as podSelector here
// while the apiserver drops it and leaves an empty selector, which selects
// every pod of the namespace. Every such field is now an error at its own
// line, naming its own path.
func TestFieldNamesAreCaseSensitiveAndStrict(t *testing.T) {
	const np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: shop}\nspec:\n"
	const bhp = "apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadPolicy\nmetadata: {name: x}\nspec:\n"
	tests := []struct{ data, want string }{
		{np + "  PodSelector: {matchLabels: {app: db}}\n", `f.yaml:5: NetworkPolicy shop/x: unknown field "spec.PodSelector"`},
		{np + "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n  - from:\n    - PodSelector: {matchLabels: {a: b}}\n",
			`f.yaml:10: NetworkPolicy shop/x: unknown field "spec.ingress[1].from[0].PodSelector"`},
		{np + "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock:\n        CIDR: 10.0.0.0/8\n",
			`f.yaml:9: NetworkPolicy shop/x: unknown field "spec.ingress[0].from[0].ipBlock.CIDR"`},
		{np + "  podSelector: {}\n  policytypes: [Ingress]\n", `f.yaml:6: NetworkPolicy shop/x: unknown field "spec.policytypes"`},
		{bhp + "  selector: {spiffeId: \"spiffe://cluster.local/ns/default/sa/db\"}\n", `f.yaml:5: BulkheadPolicy default/x: unknown field "spec.selector.spiffeId"`},
		{bhp + "  selector:\n    SPIFFEID: \"spiffe://cluster.local/ns/default/sa/db\"\n", `f.yaml:6: BulkheadPolicy default/x: unknown field "spec.selector.SPIFFEID"`},
		{bhp + "  selector: {podSelector: {}}\n  egress:\n  - to: [{cidr: 10.0.0.0/8}]\n    Action: Deny\n", `f.yaml:8: BulkheadPolicy default/x: unknown field "spec.egress[0].Action"`},
		{"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  Labels: {app: db}\n", `f.yaml:5: Pod default/p: unknown field "metadata.Labels"`},
		{"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  ServiceAccountName: db\n", `f.yaml:5: Pod default/p: unknown field "spec.ServiceAccountName"`},
		{"apiVersion: v1\nkind: Namespace\nmetadata: {name: n, Labels: {a: b}}\n", `f.yaml:3: Namespace n: unknown field "metadata.Labels"`},
		{"apiVersion: v1\nKind: Namespace\nmetadata: {name: n}\n", `f.yaml:1: unsupported apiVersion "v1" kind ""`},
		// A type error names its field and line too, even though the
		// decoder's path for it has no list indices.
		{np + "  podSelector: {}\n  ingress:\n  - from: []\n  - ports:\n    - port: [80]\n",
			`f.yaml:9: NetworkPolicy shop/x: spec.ingress.ports.port: cannot decode array`},
	}
	for _, tt := range tests {
		objs, err := Parse("f.yaml", []byte(tt.data))
		if err == nil {
			_, err = Build(objs, Options{})
		}
		var e *Error
		if !errors.As(err, &e) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s\ngot  %v\nwant an *Error containing %s", tt.data, err, tt.want)
		}
		if len(objs) != 0 {
			t.Errorf("%s\ndecoded %d objects, want none", tt.data, len(objs))
		}
	}
}

// FuzzParse: any bytes either decode or give *Error values with a line, and
// whatever decodes validates and compiles without panicking. Nothing is
// parsed and then ignored: every field of a policy document that is set
// comes back, under its exact name, when the decoded policy is encoded
// again.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		"apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: [{ports: [{name: h, containerPort: 80}]}]}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n",
		"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: In, values: [b]}]}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, endPort: 90}]}]\n",
		"apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadPolicy\nmetadata: {name: x}\nspec:\n  selector: {spiffeID: \"spiffe://cluster.local/ns/*/sa/*\"}\n  egress: [{to: [{cidr: 0.0.0.0/0}], action: Deny, mode: Audit}]\n",
		"apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n",
		"{]",
		"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  PodSelector: {matchLabels: {a: b}}\n",
		"apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadPolicy\nmetadata: {name: x}\nspec:\n  selector: {spiffeId: \"spiffe://cluster.local/ns/a/sa/b\"}\n",
		"apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadPolicy\nmetadata: {name: x}\nspec:\n  selector: {podSelector: {}}\n  ingress: [{from: [{podSelector: {}}], Action: Deny}]\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := Parse("f.yaml", data)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Line < 1 {
				t.Fatalf("error without file:line: %v", err)
			}
		}
		for _, o := range objs {
			var typed any
			switch {
			case o.NetworkPolicy != nil:
				typed = o.NetworkPolicy
			case o.BulkheadPolicy != nil:
				typed = o.BulkheadPolicy
			default:
				continue
			}
			var in any
			if err := o.node.Decode(&in); err != nil {
				t.Fatalf("decoded document does not decode again: %v", err)
			}
			if path := lostField(jsonValue(t, in), jsonValue(t, typed), ""); path != "" {
				t.Fatalf("field %q was accepted but is not in the decoded %s", path, o.Ref())
			}
		}
		res, _ := Build(objs, Options{AllLocal: true})
		if _, err := policy.Compile(res.Snapshot); err != nil {
			// Build has validated every policy it kept.
			var ve *policy.ValidationError
			if errors.As(err, &ve) {
				t.Fatalf("a policy that passed validation was rejected by the compiler: %v", err)
			}
		}
	})
}

// jsonValue is v as encoding/json's generic values.
func jsonValue(t *testing.T, v any) any {
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// lostField returns the path of the first field that is set in in but
// missing, under its exact name, from out ("": none).
func lostField(in, out any, path string) string {
	switch in := in.(type) {
	case map[string]any:
		om, _ := out.(map[string]any)
		for k, v := range in {
			if isZero(v) {
				continue
			}
			ov, ok := om[k]
			if !ok {
				return path + "." + k
			}
			if p := lostField(v, ov, path+"."+k); p != "" {
				return p
			}
		}
	case []any:
		ol, _ := out.([]any)
		for i, v := range in {
			if isZero(v) {
				continue
			}
			if i >= len(ol) {
				return fmt.Sprintf("%s[%d]", path, i)
			}
			if p := lostField(v, ol[i], fmt.Sprintf("%s[%d]", path, i)); p != "" {
				return p
			}
		}
	}
	return ""
}

// isZero is true for values that an omitempty field leaves out.
func isZero(v any) bool {
	switch v := v.(type) {
	case nil:
		return true
	case string:
		return v == ""
	case float64:
		return v == 0
	case bool:
		return !v
	case map[string]any:
		return len(v) == 0
	case []any:
		return len(v) == 0
	}
	return false
}

// The bulkhead.io/spiffe-id annotation names a remote pod's issued SPIFFE ID;
// one that is not a SPIFFE ID is an error at the pod.
func TestSPIFFEIDAnnotation(t *testing.T) {
	doc := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {bulkhead.io/spiffe-id: %q}\n"
	objs, err := Parse("f.yaml", fmt.Appendf(nil, doc, "spiffe://example.org/workload/p"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := Build(objs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Snapshot.Pods[0].SPIFFEID; got != "spiffe://example.org/workload/p" {
		t.Fatalf("SPIFFEID %q", got)
	}
	objs, err = Parse("f.yaml", fmt.Appendf(nil, doc, "https://example.org/p"))
	if err == nil {
		_, err = Build(objs, Options{})
	}
	if err == nil || !strings.Contains(err.Error(), "f.yaml:1: Pod default/p: metadata.annotations[bulkhead.io/spiffe-id]") {
		t.Fatalf("got %v", err)
	}
	// Another namespace's identity is not the pod's to claim.
	objs, err = Parse("f.yaml", fmt.Appendf(nil, doc, "spiffe://cluster.local/ns/prod/sa/admin"))
	if err == nil {
		_, err = Build(objs, Options{})
	}
	if err == nil || !strings.Contains(err.Error(), `names namespace "prod", but the pod is in "default"`) {
		t.Fatalf("got %v", err)
	}
}

// TestPodHostIPs: a pod's node addresses come from status.hostIPs, or from
// status.hostIP when that is all there is, and outlive the pod's own.
func TestPodHostIPs(t *testing.T) {
	ip := netip.MustParseAddr
	tests := []struct {
		name, status string
		want         []netip.Addr
	}{
		{"none", "{podIP: 10.0.0.1}", nil},
		{"hostIP only", "{hostIP: 192.168.0.1}", []netip.Addr{ip("192.168.0.1")}},
		{"hostIPs dual-stack", `{hostIP: 192.168.0.1, hostIPs: [{ip: 192.168.0.1}, {ip: "fd00:ff::1"}]}`, []netip.Addr{ip("192.168.0.1"), ip("fd00:ff::1")}},
		{"IPv6 first", `{hostIPs: [{ip: "fd00:ff::1"}, {ip: 192.168.0.1}]}`, []netip.Addr{ip("fd00:ff::1"), ip("192.168.0.1")}},
		{"v4-mapped is unmapped", `{hostIP: "::ffff:192.168.0.1"}`, []netip.Addr{ip("192.168.0.1")}},
		{"terminal pod keeps its node's address", "{phase: Succeeded, podIP: 10.0.0.1, hostIP: 192.168.0.1}", []netip.Addr{ip("192.168.0.1")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Parse("f.yaml", []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: "+tt.status+"\n"))
			if err != nil {
				t.Fatal(err)
			}
			if got := objs[0].Pod.HostIPs; !slices.Equal(got, tt.want) {
				t.Fatalf("host IPs %v, want %v", got, tt.want)
			}
		})
	}
}

// TestPodPlacement: a pod's UID and node are kept (the agent adopts its own
// node's running pods by them), and a host-network pod claims no addresses:
// they are its node's.
func TestPodPlacement(t *testing.T) {
	objs, err := Parse("f.yaml", []byte(`apiVersion: v1
kind: Pod
metadata: {name: p, uid: 6f1c2d3e-0000-4000-8000-000000000001}
spec: {nodeName: node-a}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: h}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 192.168.0.1, hostIP: 192.168.0.1}
`))
	if err != nil {
		t.Fatal(err)
	}
	p, h := objs[0].Pod, objs[1].Pod
	if p.UID != "6f1c2d3e-0000-4000-8000-000000000001" || p.NodeName != "node-a" || len(p.IPs) != 1 {
		t.Fatalf("pod = %+v", p)
	}
	if len(h.IPs) != 0 || h.NodeName != "node-a" || len(h.HostIPs) != 1 {
		t.Fatalf("host-network pod = %+v, want no pod IPs", h)
	}
}

// TestLoadCache: a file whose content is unchanged is not parsed again
// (its objects are the same ones), a changed file is, a removed file's
// objects are gone, and a file's errors come back with it.
func TestLoadCache(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
	write("b.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
	cache := &ParseCache{}
	first, err := Load(dir, Options{Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	write("b.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: b, labels: {x: y}}\n")
	second, err := Load(dir, Options{Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	if first.Objects[0] != second.Objects[0] {
		t.Error("the unchanged file was parsed again")
	}
	if first.Objects[1] == second.Objects[1] || second.Snapshot.Namespaces[1].Labels["x"] != "y" {
		t.Errorf("the changed file was not parsed again: %+v", second.Snapshot.Namespaces[1])
	}
	if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	write("c.yaml", "kind: Nonsense\n")
	for range 2 {
		third, err := Load(dir, Options{Cache: cache})
		if err == nil || !strings.Contains(err.Error(), "c.yaml") {
			t.Fatalf("a bad file's error, parsed or cached: %v", err)
		}
		if third != nil && len(third.Snapshot.Namespaces) != 1 {
			t.Fatalf("namespaces after removing a.yaml: %+v", third.Snapshot.Namespaces)
		}
	}
}
