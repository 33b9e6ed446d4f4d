package demo

import "fmt"

// The shop the demo builds: three tiers in one namespace and a debug pod in
// another, each with its own service account, so every pod has its own
// SPIFFE ID.

// PodSpec is one demo pod.
type PodSpec struct {
	Namespace, Name, ServiceAccount string
}

// Ref is "namespace/name".
func (p PodSpec) Ref() string { return p.Namespace + "/" + p.Name }

// ShopPods are the demo's pods, in display order. Functions rather than
// package variables, so that no caller can change what another sees.
func ShopPods() []PodSpec {
	return []PodSpec{
		{"shop", "frontend", "frontend"},
		{"shop", "api", "api"},
		{"shop", "db", "db"},
		{"ops", "debug", "debug"},
	}
}

// ShopPorts are the ports every pod serves with an echo server.
func ShopPorts() []Port { return []Port{{8080, "TCP"}, {8080, "UDP"}} }

// Refs lists pods as "namespace/name".
func Refs(pods []PodSpec) []string {
	out := make([]string, len(pods))
	for i, p := range pods {
		out[i] = p.Ref()
	}
	return out
}

// workloadsYAML is the store's first content: namespaces and pods, which the
// agent needs before CNI ADD so that each endpoint gets its identity.
const workloadsYAML = `apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {serviceAccountName: frontend}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {serviceAccountName: api}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: ops, labels: {app: debug}}
spec: {serviceAccountName: debug}
`

// Step is one policy the demo adds, and what it must do to the matrix.
type Step struct {
	Title string
	// Story says, in lines of at most 78 characters, what the step shows.
	Story []string
	// File is the store file the step writes; YAML is its content.
	File, YAML string
	// Changes turn the previous step's expected matrix into this one's.
	Changes []Change
	// Explain is a connection whose decision the step's summary explains.
	Explain *Cell
}

// ShopSteps are applied in order, each on top of the previous ones.
func ShopSteps() []Step {
	return []Step{
		{
			Title: "1. A Kubernetes NetworkPolicy: only api may reach db",
			Story: []string{
				"db is now selected by a policy, so its ingress is default-deny, and",
				"one rule lets pods labelled app=api in on 8080/TCP. UDP is not listed.",
			},
			File: "10-netpol-db.yaml",
			YAML: `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080, protocol: TCP}]
`,
			Changes: []Change{
				{From: "*", To: "shop/db", Port: "*", Outcome: Denied},
				{From: "shop/api", To: "shop/db", Port: "8080/TCP", Outcome: Allowed},
			},
		},
		{
			Title: "2. A BulkheadPolicy by SPIFFE ID: who may call api",
			Story: []string{
				"The rule names workload identities, not labels: the frontend's",
				"service account, and any service account in ops (a glob).",
			},
			File: "20-bhp-api.yaml",
			YAML: `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/api"}
  ingress:
  - from:
    - spiffeID: "spiffe://cluster.local/ns/shop/sa/frontend"
    - spiffeID: "spiffe://cluster.local/ns/ops/sa/*"
    ports: [{port: 8080, protocol: TCP}]
`,
			Changes: []Change{
				{From: "*", To: "shop/api", Port: "*", Outcome: Denied},
				{From: "shop/frontend", To: "shop/api", Port: "8080/TCP", Outcome: Allowed},
				{From: "ops/debug", To: "shop/api", Port: "8080/TCP", Outcome: Allowed},
			},
		},
		{
			Title: "3. A Deny rule: nothing from ops gets into shop",
			Story: []string{
				"Deny beats any Allow from any policy: ops/debug loses api, which the",
				"previous step allowed. A Deny-only policy adds no default-deny.",
			},
			File: "30-bhp-deny-ops.yaml",
			YAML: `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: no-ops, namespace: shop}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/shop/sa/*"}
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/ops/sa/*"}]
    action: Deny
`,
			Changes: []Change{
				{From: "ops/*", To: "shop/*", Port: "*", Outcome: Denied},
			},
			Explain: &Cell{From: "ops/debug", To: "shop/api", Port: Port{8080, "TCP"}},
		},
		{
			Title: "4. An Audit-mode policy: try a lockdown of debug first",
			Story: []string{
				"debug should only accept ops traffic. In Audit mode what the policy",
				"would drop still passes, and the agent reports it as AUDIT.",
			},
			File: "40-bhp-audit-debug.yaml",
			YAML: `apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: debug, namespace: ops}
spec:
  selector: {spiffeID: "spiffe://cluster.local/ns/ops/sa/debug"}
  mode: Audit
  ingress:
  - from: [{spiffeID: "spiffe://cluster.local/ns/ops/sa/*"}]
`,
			Changes: []Change{
				{From: "shop/*", To: "ops/debug", Port: "*", Outcome: Audited},
			},
		},
	}
}

// Expectations returns the expected matrix before any step (index 0) and
// after each step (index i+1).
func Expectations(pods []string, ports []Port, steps []Step) ([]*Matrix, error) {
	m := NewMatrix(pods, ports)
	out := []*Matrix{m}
	for _, s := range steps {
		next, err := m.Apply(s.Changes)
		if err != nil {
			return nil, fmt.Errorf("step %q: %w", s.Title, err)
		}
		out = append(out, next)
		m = next
	}
	return out, nil
}
