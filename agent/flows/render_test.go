package flows

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestCompact(t *testing.T) {
	f := sampleFlow()
	f.Time = time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.Local)
	got := Compact(f, false)
	want := "03:04:05.006 shop/frontend:40000 -> [fd00::2]:8080 egress TCP SYN,ACK DROPPED by BulkheadPolicy shop/api egress[1]"
	if got != want {
		t.Fatalf("Compact =\n%q\nwant\n%q", got, want)
	}
	if colored := Compact(f, true); !strings.Contains(colored, colorRed+"DROPPED"+colorReset) {
		t.Fatalf("no colour on a terminal: %q", colored)
	}
}

func TestWriteTable(t *testing.T) {
	a := sampleFlow()
	b := sampleFlow()
	b.Verdict, b.EgressDeniedBy, b.IsReply = VerdictForwarded, nil, true
	b.IngressAllowedBy = []*Policy{{Kind: "NetworkPolicy", Namespace: "shop", Name: "allow-frontend", Rule: "ingress[0]"}}
	var buf bytes.Buffer
	if err := WriteTable(&buf, []*Flow{a, b}, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "TIME") {
		t.Fatalf("table:\n%s", buf.String())
	}
	if !strings.Contains(lines[1], "DROPPED") || !strings.Contains(lines[1], "BulkheadPolicy shop/api egress[1]") {
		t.Fatalf("row 1: %q", lines[1])
	}
	if !strings.Contains(lines[2], "reply") || !strings.Contains(lines[2], "NetworkPolicy shop/allow-frontend ingress[0]") {
		t.Fatalf("row 2: %q", lines[2])
	}
	// Columns line up: VERDICT starts at the same offset in every row.
	col := strings.Index(lines[0], "VERDICT")
	if strings.Index(lines[1], "DROPPED") != col || strings.Index(lines[2], "FORWARDED") != col {
		t.Fatalf("columns not aligned:\n%s", buf.String())
	}
}

// A tunnel-delivered flow comes from the node's address: the compact line
// names the verified identity, and says mtls.
func TestCompactTunnelDelivered(t *testing.T) {
	f := &Flow{Verdict: VerdictForwarded, MTLS: true, TrafficDirection: DirectionIngress,
		IP:          &IP{Source: "10.1.0.1", Destination: "10.1.0.5", IPVersion: "IPv4"},
		L4:          &Layer4{TCP: &TCP{SourcePort: 40000, DestinationPort: 8080}},
		Source:      &Endpoint{Identity: 300, Namespace: "shop", SPIFFEID: "spiffe://cluster.local/ns/shop/sa/api"},
		Destination: &Endpoint{Identity: 301, Namespace: "shop", PodName: "db"}}
	got := Compact(f, false)
	for _, want := range []string{"spiffe://cluster.local/ns/shop/sa/api via 10.1.0.1:40000 -> shop/db:8080", " mtls"} {
		if !strings.Contains(got, want) {
			t.Errorf("Compact = %q, want it to contain %q", got, want)
		}
	}
	f.Source = &Endpoint{Identity: 1, SPIFFEID: ""}
	if got := Compact(f, false); !strings.Contains(got, "10.1.0.1:40000 -> ") || strings.Contains(got, "via") {
		t.Errorf("host source: Compact = %q", got)
	}
}

// TestCompactDirectionAndIsolation (issue 16): a pod-to-pod flow is
// recorded at both pods; each line says which side it was seen at, and a
// default deny names the policies that isolate the pod, in the compact
// line and the table.
func TestCompactDirectionAndIsolation(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.Local)
	mk := func(dir string) *Flow {
		return &Flow{Time: at, Verdict: VerdictForwarded, TrafficDirection: dir, EventKind: "new",
			IP:          &IP{Source: "10.0.0.1", Destination: "10.0.0.2", IPVersion: "IPv4"},
			L4:          &Layer4{TCP: &TCP{SourcePort: 40000, DestinationPort: 5432, Flags: &TCPFlags{SYN: true}}},
			Source:      &Endpoint{Identity: 300, Namespace: "shop", PodName: "web"},
			Destination: &Endpoint{Identity: 301, Namespace: "shop", PodName: "db"}}
	}
	out, in := mk(DirectionEgress), mk(DirectionIngress)
	out.EgressAllowedBy = []*Policy{{Kind: "default", Name: "no-policy-selects"}}
	in.Verdict, in.DropReasonDesc = VerdictDropped, DropPolicyDenied
	in.IngressDeniedBy = []*Policy{{Kind: "default", Name: "default-deny"}}
	in.IsolatedBy = []string{"NetworkPolicy shop/db-in", "BulkheadPolicy shop/x"}
	for _, c := range []struct {
		f    *Flow
		want string
	}{
		{out, "03:04:05.006 shop/web:40000 -> shop/db:5432 egress TCP SYN FORWARDED by no-policy-selects"},
		{in, "03:04:05.006 shop/web:40000 -> shop/db:5432 ingress TCP SYN DROPPED by default-deny (isolated by NetworkPolicy shop/db-in, BulkheadPolicy shop/x)"},
	} {
		if got := Compact(c.f, false); got != c.want {
			t.Errorf("Compact =\n%q\nwant\n%q", got, c.want)
		}
	}
	var buf bytes.Buffer
	if err := WriteTable(&buf, []*Flow{out, in}, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	col := strings.Index(lines[0], "DIRECTION")
	if len(lines) != 3 || col < 0 || strings.Index(lines[1], "egress") != col || strings.Index(lines[2], "ingress") != col {
		t.Fatalf("table without a direction column:\n%s", buf.String())
	}
	if !strings.HasSuffix(lines[2], "default-deny (isolated by NetworkPolicy shop/db-in, BulkheadPolicy shop/x)") {
		t.Errorf("table row %q", lines[2])
	}
}
