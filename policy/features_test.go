package policy_test

import (
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/explain"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

const featureCluster = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  serviceAccountName: api
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
status: {podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec: {serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIPs: [{ip: 10.1.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIPs: [{ip: 10.1.0.12}]}
---
apiVersion: v1
kind: Pod
metadata: {name: mon, namespace: ops, labels: {app: mon}}
spec: {containers: [{name: c}]}
status: {podIPs: [{ip: 10.2.0.5}]}
`

type flow struct {
	from, to string
	port     uint16
	proto    string
	want     string // combined verdict: allow, deny, audit
}

func offlineFromYAML(t *testing.T, docs string) *explain.Offline {
	t.Helper()
	objs, err := store.Parse("test.yaml", []byte(featureCluster+"---\n"+docs))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	res, err := store.Build(objs, store.Options{AllLocal: true})
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	o, err := explain.NewOffline(res.Snapshot)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return o
}

func checkFlows(t *testing.T, o *explain.Offline, flows []flow) {
	t.Helper()
	for _, f := range flows {
		src, err := o.Peer(f.from)
		if err != nil {
			t.Fatal(err)
		}
		dst, err := o.Peer(f.to)
		if err != nil {
			t.Fatal(err)
		}
		proto := f.proto
		if proto == "" {
			proto = "TCP"
		}
		p, _ := explain.ParseProto(proto)
		r := explain.Verdict(o.MapState, src, dst, p, f.port)
		if r.Combined != f.want {
			t.Errorf("%s -> %s %d/%s: got %s, want %s\n%s", f.from, f.to, f.port, proto, r.Combined, f.want, explain.Text(r))
		}
	}
}

func TestNetworkPolicyFeatures(t *testing.T) {
	tests := []struct {
		name   string
		policy string
		flows  []flow
	}{
		{"no policy allows everything", "", []flow{
			{"shop/web", "shop/api", 8080, "", "allow"}, {"ops/mon", "shop/db", 1, "UDP", "allow"},
		}},
		{"selected pod is default deny in ingress only", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {matchLabels: {app: api}}}`, []flow{
			{"shop/web", "shop/api", 8080, "", "deny"}, {"shop/api", "shop/web", 80, "", "allow"}, {"shop/web", "shop/db", 5432, "", "allow"},
		}},
		{"policyTypes defaults to egress when egress rules exist", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: eg, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{to: [{podSelector: {matchLabels: {app: api}}}]}]`, []flow{
			{"shop/web", "shop/api", 8080, "", "allow"}, {"shop/web", "shop/db", 5432, "", "deny"},
			{"shop/api", "shop/web", 80, "", "deny"}, // ingress is defaulted on too, with no rules
		}},
		{"explicit Egress only leaves ingress open", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: eg, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]`, []flow{
			{"shop/web", "shop/api", 8080, "", "deny"}, {"shop/api", "shop/web", 80, "", "allow"},
		}},
		{"empty from allows every source, ports limit", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{ports: [{port: 8080}]}]`, []flow{
			{"ops/mon", "shop/api", 8080, "", "allow"}, {"192.0.2.1", "shop/api", 8080, "", "allow"},
			{"ops/mon", "shop/api", 8081, "", "deny"}, {"ops/mon", "shop/api", 8080, "UDP", "deny"},
		}},
		{"empty rule allows everything", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {}
  ingress: [{}]`, []flow{
			{"ops/mon", "shop/api", 1, "SCTP", "allow"},
		}},
		{"matchExpressions operators", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}
  ingress:
  - from: [{podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}]
  - from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [db]}, {key: tier, operator: DoesNotExist}]}}]
    ports: [{port: 9}]`, []flow{
			{"shop/web", "shop/api", 8080, "", "allow"}, {"shop/db", "shop/api", 8080, "", "deny"},
			{"shop/db", "shop/api", 9, "", "allow"}, {"shop/api", "shop/db", 5432, "", "allow"}, // db not selected
			{"shop/api", "shop/web", 80, "", "deny"},
		}},
		{"namespaceSelector and podSelector in one peer are ANDed, in two peers ORed", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}, podSelector: {matchLabels: {app: web}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}, {podSelector: {matchLabels: {app: web}}}]}]`, []flow{
			{"ops/mon", "shop/api", 8080, "", "deny"}, {"shop/web", "shop/api", 8080, "", "deny"},
			{"ops/mon", "shop/db", 5432, "", "allow"}, {"shop/web", "shop/db", 5432, "", "allow"}, {"shop/api", "shop/db", 5432, "", "deny"},
		}},
		{"ipBlock with except covers pod IPs inside it", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.11/32, 10.2.0.0/16]}}]}]`, []flow{
			{"shop/api", "shop/db", 5432, "", "allow"}, {"shop/web", "shop/db", 5432, "", "deny"},
			{"ops/mon", "shop/db", 5432, "", "deny"}, {"10.1.0.99", "shop/db", 5432, "", "allow"},
			{"10.2.0.99", "shop/db", 5432, "", "deny"}, {"192.0.2.1", "shop/db", 5432, "", "deny"},
		}},
		{"named ports resolve per destination pod", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]`, []flow{
			{"shop/web", "shop/api", 8080, "", "allow"}, {"shop/web", "shop/api", 80, "", "deny"},
			{"shop/web", "shop/web", 80, "", "deny"}, // egress passes; ingress is defaulted on
			{"shop/web", "shop/api", 5353, "UDP", "allow"},
			{"shop/web", "shop/db", 8080, "", "deny"}, {"shop/web", "192.0.2.1", 80, "", "deny"},
		}},
		{"endPort ranges, SCTP, union of policies", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{ports: [{port: 8000, endPort: 8100}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{protocol: SCTP}]}]`, []flow{
			{"ops/mon", "shop/api", 8000, "", "allow"}, {"ops/mon", "shop/api", 8100, "", "allow"},
			{"ops/mon", "shop/api", 8101, "", "deny"}, {"ops/mon", "shop/api", 7, "SCTP", "allow"},
			{"ops/mon", "shop/db", 8000, "", "deny"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkFlows(t, offlineFromYAML(t, tt.policy), tt.flows) })
	}
}

func TestBulkheadPolicyFeatures(t *testing.T) {
	tests := []struct {
		name   string
		policy string
		flows  []flow
	}{
		{"the issue's example", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/api"}
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/frontend"}]
    ports: [{port: 8080, protocol: TCP}]
  - from: [{spiffeID: "spiffe://cluster.local/ns/*/sa/*"}]
    action: Deny
  egress:
  - to: [{cidr: 10.96.0.0/12}]
    ports: [{port: 53, protocol: UDP}]`, []flow{
			// The Deny glob covers every workload, and Deny beats Allow.
			{"shop/web", "shop/api", 8080, "", "deny"}, {"192.0.2.1", "shop/api", 8080, "", "deny"},
			{"shop/api", "10.96.0.10", 53, "UDP", "allow"}, {"shop/api", "10.96.0.10", 53, "TCP", "deny"},
			{"shop/api", "shop/db", 5432, "", "deny"},
		}},
		{"spiffe glob selector and peers", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/*"}
  ingress: [{from: [{spiffeID: "spiffe://cluster.local/ns/ops/sa/default"}]}]`, []flow{
			{"ops/mon", "shop/api", 1, "", "allow"}, {"ops/mon", "shop/db", 1, "", "allow"},
			{"shop/web", "shop/api", 1, "", "deny"}, {"shop/web", "ops/mon", 1, "", "allow"},
		}},
		{"deny-only policy does not make the pod default deny", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: db}}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}], action: Deny}]`, []flow{
			{"ops/mon", "shop/db", 5432, "", "deny"}, {"shop/api", "shop/db", 5432, "", "allow"},
		}},
		{"deny beats allow from another policy", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{}]
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: deny, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: db}}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: pg}], action: Deny}]`, []flow{
			{"shop/web", "shop/db", 5432, "", "deny"}, {"shop/web", "shop/db", 5433, "", "allow"}, {"shop/api", "shop/db", 5432, "", "allow"},
		}},
		{"audit mode lets traffic pass as audit", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: api}}}
  mode: Audit
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
  - from: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
    action: Deny`, []flow{
			{"shop/web", "shop/api", 8080, "", "allow"}, {"shop/db", "shop/api", 8080, "", "audit"},
			{"192.0.2.1", "shop/api", 8080, "", "audit"},
		}},
		{"audit allow does not open an enforced default deny", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {matchLabels: {app: api}}}
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: api}}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], mode: Audit}]`, []flow{
			{"shop/web", "shop/api", 8080, "", "deny"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkFlows(t, offlineFromYAML(t, tt.policy), tt.flows) })
	}
}

func TestMTLSFlag(t *testing.T) {
	o := offlineFromYAML(t, `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: api}}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], mtls: Required}]`)
	src, _ := o.Peer("shop/web")
	dst, _ := o.Peer("shop/api")
	// Through the tunnel the rule allows; in plaintext it is never a
	// match, and the drop says that mTLS was what was missing.
	d := o.MapState.LookupFlow(dst.Endpoint, policy.Ingress, src.Identity, policy.ProtoTCP, 8080, true)
	if d.Verdict != policy.VerdictAllow || d.Flags&policy.FlagMTLSRequired == 0 || d.AuthRequired {
		t.Fatalf("tunnelled: got %+v, want allow with FlagMTLSRequired", d)
	}
	p := o.MapState.Lookup(dst.Endpoint, policy.Ingress, src.Identity, policy.ProtoTCP, 8080)
	if p.Verdict != policy.VerdictDeny || !p.AuthRequired || p.Rule != d.Rule {
		t.Fatalf("plaintext: got %+v, want deny, AuthRequired, rule %d", p, d.Rule)
	}
	if u := o.MapState.LookupFlow(dst.Endpoint, policy.Ingress, src.Identity, policy.ProtoUDP, 8080, true); u.Verdict != policy.VerdictDeny || u.AuthRequired {
		t.Fatalf("UDP: got %+v, want a plain deny", u)
	}
}

// TestMTLSRuleAccepted: mtls: Required is valid with workload peers and
// ports of which at least one can be TCP.
func TestMTLSRuleAccepted(t *testing.T) {
	for _, doc := range []string{
		`ingress: [{from: [{podSelector: {}}], mtls: Required}]`,
		`ingress: [{mtls: Required, ports: [{port: 53, protocol: UDP}, {port: 5432}]}]`,
		`egress: [{to: [{spiffeID: "spiffe://cluster.local/ns/shop/sa/db"}], ports: [{protocol: TCP}], mtls: Required}]`,
		`egress: [{to: [{namespaceSelector: {}}], mtls: Required, mode: Audit}]`,
	} {
		objs, err := store.Parse("test.yaml", []byte(featureCluster+`---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: ok, namespace: shop}
spec:
  selector: {podSelector: {}}
  `+doc))
		if err == nil {
			_, err = store.Build(objs, store.Options{})
		}
		if err != nil {
			t.Errorf("%s: %v", doc, err)
		}
	}
}

func TestValidationErrors(t *testing.T) {
	tests := []struct{ name, doc, want string }{
		{"bad cidr", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]`, "test.yaml:42: NetworkPolicy shop/bad: spec.ingress[0].from[0].ipBlock.cidr"},
		{"except outside cidr", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]`, "spec.ingress[0].from[0].ipBlock.except[0]"},
		{"endPort with named port", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  egress: [{ports: [{port: http, endPort: 90}]}]`, "spec.egress[0].ports[0].endPort"},
		{"bad operator", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: a, operator: Near}]}`, "spec.podSelector.matchExpressions[0].operator"},
		{"unknown field", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec: {podSelecter: {}}`, `test.yaml:40: NetworkPolicy shop/bad: unknown field "spec.podSelecter"`},
		{"ipBlock with selector", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]`, "spec.ingress[0].from[0]: Forbidden"},
		{"bhp glob inside a segment", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/sh*"}`, "spec.selector.spiffeID"},
		{"bhp selector in another namespace", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/ops/sa/*"}`, "selects namespace ops, but the policy is in shop"},
		{"bhp two selectors", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/api", podSelector: {}}`, "spec.selector: Forbidden"},
		{"bhp bad action, mode and mtls", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  egress: [{action: Drop, mode: Maybe, mtls: Optional}]`, "spec.egress[0].action"},
		{"bhp mtls with a cidr peer", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  ingress: [{from: [{podSelector: {}}, {cidr: 10.0.0.0/8}], mtls: Required}]`,
			`BulkheadPolicy shop/bad: spec.ingress[0].from[1].cidr: Invalid value: "10.0.0.0/8": mtls: Required cannot be verified for an address`},
		{"bhp mtls with only UDP and SCTP ports", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  egress: [{to: [{podSelector: {}}], ports: [{port: 53, protocol: UDP}, {protocol: SCTP}], mtls: Required}]`,
			"BulkheadPolicy shop/bad: spec.egress[0].ports: Invalid value: \"\": mtls: Required matches TCP only"},
		{"bhp deny with mtls", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  ingress: [{action: Deny, mtls: Required}]`, "spec.ingress[0].mtls: Invalid value: \"Required\": only Allow rules can require mTLS"},
		{"bhp peer with two kinds", `
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {podSelector: {}}
  ingress: [{from: [{cidr: 10.0.0.0/8, spiffeID: "spiffe://cluster.local/ns/a/sa/b"}]}]`, "spec.ingress[0].from[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := store.Parse("test.yaml", []byte(featureCluster+"---\n"+tt.doc))
			if err == nil {
				_, err = store.Build(objs, store.Options{})
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
