package store

import (
	"errors"
	"os"
	"path/filepath"
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

// FuzzParse: any bytes either decode or give *Error values with a line, and
// whatever decodes validates and compiles without panicking.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		"apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: [{ports: [{name: h, containerPort: 80}]}]}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n",
		"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: In, values: [b]}]}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, endPort: 90}]}]\n",
		"apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadPolicy\nmetadata: {name: x}\nspec:\n  selector: {spiffeID: \"spiffe://cluster.local/ns/*/sa/*\"}\n  egress: [{to: [{cidr: 0.0.0.0/0}], action: Deny, mode: Audit}]\n",
		"apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n",
		"{]",
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
