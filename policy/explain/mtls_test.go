package explain

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

// mtlsStore: db takes 5432/TCP from api, and anything from web, only with
// mTLS, and 53/UDP from anyone in the namespace; api and db are enrolled,
// web is not. api may reach the bank only with mTLS: bank/vault is
// enrolled, bank/legacy is not.
const mtlsStore = `
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: bank}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api, bulkhead.io/mtls: enabled}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db, bulkhead.io/mtls: enabled}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: vault, namespace: bank, labels: {app: vault, bulkhead.io/mtls: enabled}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: bank, labels: {app: legacy}}
status: {podIP: 10.0.1.2}
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: db}}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
    mtls: Required
  - from: [{podSelector: {matchLabels: {app: web}}}]
    mtls: Required
  - from: [{podSelector: {}}]
    ports: [{port: 53, protocol: UDP}]
---
apiVersion: bulkhead.io/v1alpha1
kind: BulkheadPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {podSelector: {matchLabels: {app: api}}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bank}}}]
    mtls: Required
  - to: [{podSelector: {}}]
`

func mtlsOffline(t *testing.T) *Offline {
	t.Helper()
	objs, err := store.Parse("mtls.yaml", []byte(mtlsStore))
	if err != nil {
		t.Fatal(err)
	}
	res, err := store.Build(objs, store.Options{AllLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOffline(res.Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func explainIn(t *testing.T, o *Offline, from, to string, proto uint8, port uint16) Result {
	t.Helper()
	src, err := o.Peer(from)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := o.Peer(to)
	if err != nil {
		t.Fatal(err)
	}
	return Verdict(o.MapState, src, dst, proto, port)
}

func wantText(t *testing.T, text string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(text, p) {
			t.Errorf("text lacks %q:\n%s", p, text)
		}
	}
}

func TestVerdictMTLS(t *testing.T) {
	o := mtlsOffline(t)
	const tcp, udp = policy.ProtoTCP, policy.ProtoUDP

	t.Run("enrolled pair takes the tunnel; plaintext would need auth", func(t *testing.T) {
		r := explainIn(t, o, "shop/api", "shop/db", tcp, 5432)
		if r.Transport != TransportTunnel || r.Combined != "allow" || !r.Passes() || !r.FromEnrolled || !r.ToEnrolled {
			t.Fatalf("got %+v", r)
		}
		if r.Ingress.Rule == nil || !r.Ingress.Rule.MTLS || r.Ingress.AuthRequired {
			t.Fatalf("ingress %+v", r.Ingress)
		}
		p := r.Other
		if p == nil || p.Transport != TransportPlaintext || p.Combined != "deny" || !p.Ingress.AuthRequired || p.Ingress.Rule == nil || p.Ingress.Rule.Name != "db" {
			t.Fatalf("plaintext answer %+v", p)
		}
		if len(p.DeniedBy) != 0 {
			t.Fatalf("an mTLS allow rule listed as denying: %+v", p.DeniedBy)
		}
		wantText(t, Text(r), "5432/TCP: ALLOW through the mTLS tunnel",
			"allow by BulkheadPolicy shop/db ingress[0] (allow) [mtls: Required]",
			"allowed only through the tunnel", "plaintext is dropped with AUTH_REQUIRED", "never matches UDP or other protocols",
			"in plaintext it would be: DENY (AUTH_REQUIRED)",
			"ingress at shop/db: deny (AUTH_REQUIRED): plaintext is dropped; only BulkheadPolicy shop/db ingress[0]")
	})

	t.Run("not enrolled source: plaintext dropped, tunnel would pass", func(t *testing.T) {
		r := explainIn(t, o, "shop/web", "shop/db", tcp, 80)
		if r.Transport != TransportPlaintext || r.Combined != "deny" || r.Passes() || !r.Ingress.AuthRequired || r.FromEnrolled {
			t.Fatalf("got %+v", r)
		}
		if r.Other == nil || r.Other.Transport != TransportTunnel || r.Other.Combined != "allow" {
			t.Fatalf("tunnelled answer %+v", r.Other)
		}
		wantText(t, Text(r), "80/TCP: DENY (AUTH_REQUIRED)", "shop/web not enrolled",
			"through the mTLS tunnel (if shop/web were enrolled) it would be: ALLOW")
	})

	t.Run("UDP: mTLS rules never match", func(t *testing.T) {
		r := explainIn(t, o, "shop/web", "shop/db", udp, 80)
		if r.Transport != TransportPlaintext || r.Combined != "deny" || r.Other != nil || r.Ingress.AuthRequired {
			t.Fatalf("got %+v", r)
		}
		if len(r.Ingress.NotMatchingMTLS) != 1 || r.Ingress.NotMatchingMTLS[0].Index != 1 || len(r.Ingress.Matching) != 0 {
			t.Fatalf("ingress %+v", r.Ingress)
		}
		wantText(t, Text(r), "does not match BulkheadPolicy shop/db ingress[1] (allow) [mtls: Required]: it requires mTLS, and never matches UDP")
		if r := explainIn(t, o, "shop/web", "shop/db", udp, 53); r.Combined != "allow" || r.Other != nil {
			t.Fatalf("DNS: got %+v", r)
		}
	})

	t.Run("egress mTLS rule to an enrolled peer", func(t *testing.T) {
		r := explainIn(t, o, "shop/api", "bank/vault", tcp, 443)
		if r.Transport != TransportTunnel || r.Combined != "allow" || r.Egress.Rule == nil || !r.Egress.Rule.MTLS {
			t.Fatalf("got %+v", r)
		}
		if r.Other == nil || !r.Other.Egress.AuthRequired {
			t.Fatalf("plaintext answer %+v", r.Other)
		}
	})

	t.Run("egress mTLS rule to a peer that is not enrolled: refused", func(t *testing.T) {
		r := explainIn(t, o, "shop/api", "bank/legacy", tcp, 443)
		if r.Transport != TransportTunnel || r.Combined != "deny" || r.Passes() || r.EgressPasses() || r.Egress.Refused == "" {
			t.Fatalf("got %+v", r)
		}
		wantText(t, Text(r), "bank/legacy is not enrolled: the tunnel refuses the connection, and nothing is sent in plaintext")
	})

	t.Run("no mTLS rule involved: one answer", func(t *testing.T) {
		r := explainIn(t, o, "shop/api", "shop/web", tcp, 80)
		if r.Transport != TransportPlaintext || r.Combined != "allow" || r.Other != nil {
			t.Fatalf("got %+v", r)
		}
		if strings.Contains(Text(r), "mTLS") {
			t.Fatalf("mTLS mentioned:\n%s", Text(r))
		}
	})

	// The live CLI renders what the agent sent as JSON: the text must
	// survive the round trip.
	r := explainIn(t, o, "shop/api", "shop/db", tcp, 5432)
	raw, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back Result
	if err := json.Unmarshal(raw, &back); err != nil {
		t.Fatal(err)
	}
	if Text(back) != Text(r) {
		t.Fatalf("text after a JSON round trip differs:\n%s\nwant:\n%s", Text(back), Text(r))
	}
}
