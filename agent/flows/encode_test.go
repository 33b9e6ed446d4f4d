package flows

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

func sampleFlow() *Flow {
	return &Flow{
		Time:           time.Date(2026, 11, 27, 5, 0, 0, 123456789, time.UTC),
		Verdict:        VerdictDropped,
		DropReasonDesc: "POLICY_DENY",
		IP:             &IP{Source: "10.0.0.1", Destination: "fd00::2", IPVersion: "IPv6"},
		L4:             &Layer4{TCP: &TCP{SourcePort: 40000, DestinationPort: 8080, Flags: &TCPFlags{SYN: true, ACK: true}}},
		Source: &Endpoint{ID: 3, Identity: 300, Namespace: "shop", PodName: "frontend",
			Labels: []string{"k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"}, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/frontend"},
		Destination:      &Endpoint{Identity: 2, Labels: []string{"reserved:world"}, CIDR: "0.0.0.0/0"},
		Type:             "L3_L4",
		NodeName:         "node-1",
		TrafficDirection: DirectionEgress,
		EventKind:        "drop",
		EgressDeniedBy:   []*Policy{{Name: "api", Namespace: "shop", Kind: "BulkheadPolicy", Revision: 7, Rule: "egress[1]"}},
	}
}

// TestAppendJSONMatchesEncodingJSON: the hand-written encoder must produce
// the document encoding/json produces from the struct tags.
func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	flows := []*Flow{
		sampleFlow(),
		{Time: time.Unix(0, 0), Verdict: VerdictForwarded, Type: "L3_L4", TrafficDirection: DirectionIngress, IsReply: true,
			L4: &Layer4{UDP: &Ports{SourcePort: 53, DestinationPort: 5353}}},
		{Time: time.Unix(1, 5), Verdict: VerdictAudit, Type: "L3_L4", L4: &Layer4{ICMPv4: &ICMP{Type: 8}},
			IngressAllowedBy: []*Policy{{Name: "a"}, {Name: "b\"\\\n\x01<>&\u2028\xff", Kind: "NetworkPolicy"}}},
		{Time: time.Unix(2, 0), L4: &Layer4{TCP: &TCP{DestinationPort: 1}}, Source: &Endpoint{}},
		{Time: time.Unix(3, 0), L4: &Layer4{SCTP: &Ports{SourcePort: 1, DestinationPort: 2}, ICMPv6: &ICMP{Type: 128, Code: 1}}},
	}
	for i, f := range flows {
		assertSameJSON(t, i, f)
	}
}

func assertSameJSON(t *testing.T, i int, f *Flow) {
	t.Helper()
	ours := f.AppendJSON(nil)
	want, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if err := json.Unmarshal(ours, &a); err != nil {
		t.Fatalf("flow %d: our output is not JSON: %v\n%s", i, err, ours)
	}
	if err := json.Unmarshal(want, &b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("flow %d differs:\nours: %s\nwant: %s", i, ours, want)
	}
}

func FuzzAppendJSONStrings(f *testing.F) {
	f.Add("shop", "app=x", "spiffe://cluster.local/ns/shop/sa/x", "\x00\"\\")
	f.Add("\xff\xfe", "\u2028\u2029", "<script>", "\t\r\n")
	f.Fuzz(func(t *testing.T, ns, label, spiffe, policy string) {
		fl := sampleFlow()
		fl.Source.Namespace, fl.Source.Labels, fl.Source.SPIFFEID = ns, []string{label, policy}, spiffe
		fl.EgressDeniedBy[0].Name = policy
		fl.NodeName = label
		assertSameJSON(t, 0, fl)
	})
}

func BenchmarkAppendJSON(b *testing.B) {
	f := sampleFlow()
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = f.AppendJSON(buf[:0])
	}
	b.SetBytes(int64(len(buf)))
}

func TestLostEventsJSON(t *testing.T) {
	l := &LostEvents{Time: time.Unix(10, 0), Source: "kernel", NumEventsLost: 42, NodeName: "n1"}
	var got map[string]any
	if err := json.Unmarshal(l.AppendJSON(nil), &got); err != nil {
		t.Fatal(err)
	}
	le, _ := got["lost_events"].(map[string]any)
	if le["source"] != "kernel" || le["num_events_lost"] != float64(42) || got["node_name"] != "n1" || got["time"] != "1970-01-01T00:00:10Z" {
		t.Fatalf("lost_events record = %v", got)
	}
}
