package author

import (
	"errors"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/store"
)

const goodLine = `{"time":"2026-11-27T05:12:02.818Z","verdict":"FORWARDED","IP":{"source":"10.1.0.11","destination":"10.1.0.10","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":51224,"destination_port":8080}},"source":{"identity":261,"namespace":"shop","pod_name":"frontend","labels":["k8s:app=frontend","k8s:io.kubernetes.pod.namespace=shop","k8s:io.kubernetes.pod.serviceaccount=web"],"spiffe_id":"spiffe://cluster.local/ns/shop/sa/web"},"destination":{"identity":2,"labels":["reserved:world"]},"Type":"L3_L4","is_reply":false,"traffic_direction":"EGRESS"}`

func TestReadFlows(t *testing.T) {
	in, err := ReadFlows(strings.NewReader(goodLine+"\n\n"+`{"flow":`+goodLine+"}\n"+
		`{"lost_events":{"source":"kernel","num_events_lost":3},"time":"2026-11-27T05:12:03Z"}`+"\n"+goodLine+"\n"+
		// A runtime alert, as --runtime-detection writes it into the same log.
		`{"event_kind":"alert","time":"2026-11-27T05:12:04Z","rule_id":"BH-RT-005","syscall":"bpf","pod":{"namespace":"shop","pod":"frontend"},"action":"alert"}`), "f")
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Records) != 3 || in.LostMarkers != 1 {
		t.Fatalf("got %d records, %d lost markers", len(in.Records), in.LostMarkers)
	}
	r := in.Records[1]
	if r.Line != 3 || r.Proto != policy.ProtoTCP || r.Port != 8080 || r.Verdict != "FORWARDED" || in.Records[2].Line != 5 {
		t.Fatalf("record %+v", r)
	}
	s := r.Source
	if !s.IsPod() || s.Namespace != "shop" || s.Pod != "frontend" || s.ServiceAccount != "web" || len(s.Labels) != 1 || s.Labels["app"] != "frontend" ||
		s.Addr.String() != "10.1.0.11" || s.SPIFFEID == "" {
		t.Fatalf("source %+v", s)
	}
	if d := r.Dest; d.IsPod() || d.Reserved != "world" || d.Addr.String() != "10.1.0.10" {
		t.Fatalf("destination %+v", d)
	}
}

func TestReadFlowsRejectsBadLines(t *testing.T) {
	repl := func(old, new string) string { return strings.Replace(goodLine, old, new, 1) }
	for _, tc := range []struct{ name, line, want string }{
		{"not json", `{"verdict":`, "not a JSON object"},
		{"array", `[1,2]`, "not a JSON object"},
		{"ocsf", `{"class_uid":4001}`, `no "verdict"`},
		{"verdict", repl(`"FORWARDED"`, `"MAYBE"`), `verdict "MAYBE"`},
		{"no IP", repl(`"IP":{"source":"10.1.0.11","destination":"10.1.0.10","ipVersion":"IPv4"},`, ""), `no "IP"`},
		{"bad IP", repl(`"10.1.0.11"`, `"10.1.0.300"`), "IP.source"},
		{"no l4", repl(`"l4":{"TCP":{"source_port":51224,"destination_port":8080}},`, ""), `no "l4"`},
		{"two protocols", repl(`"TCP":{`, `"UDP":{"destination_port":1},"TCP":{`), "has 2 protocols"},
		{"port 0", repl(`"destination_port":8080`, `"destination_port":0`), "destination_port 0"},
		{"port range", repl(`"destination_port":8080`, `"destination_port":70000`), "not a JSON object"},
		{"half a pod", repl(`"pod_name":"frontend",`, ""), "namespace and pod_name"},
		{"label", repl(`"k8s:app=frontend"`, `"app=frontend"`), "want SOURCE:KEY=VALUE"},
		{"label on world", repl(`"reserved:world"`, `"k8s:app=x"`), "not a pod"},
		{"namespace label", repl(`namespace=shop`, `namespace=ops`), "disagrees"},
		{"label key", repl(`"k8s:app=frontend"`, `"k8s:a b=frontend"`), "label key"},
		{"label value", repl(`"k8s:app=frontend"`, `"k8s:app=front end"`), "value"},
		{"namespace", repl(`"namespace":"shop"`, `"namespace":"Shop"`), "namespace \"Shop\""},
		{"spiffe glob", repl(`sa/web"`, `sa/*"`), "spiffe_id"},
		{"no destination", repl(`"destination":{"identity":2,"labels":["reserved:world"]},`, ""), "destination: missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in, err := ReadFlows(strings.NewReader(goodLine+"\n"+goodLine+"\n"+tc.line+"\n"+goodLine+"\n"), "flows.json")
			if !errors.Is(err, ErrBadFlowLine) || !strings.Contains(err.Error(), "flows.json:3: ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want flows.json:3 and %q", err, tc.want)
			}
			if in != nil {
				t.Fatal("records returned with an error")
			}
		})
	}
	long := `{"verdict":"` + strings.Repeat("x", maxFlowLine) + `"}`
	if _, err := ReadFlows(strings.NewReader(goodLine+"\n"+long), "f"); err == nil || !strings.Contains(err.Error(), "f:2: ") {
		t.Fatalf("long line: %v", err)
	}
}

// FuzzReadFlows: any input either fails with an error naming a line, or
// yields records that generate can use as they are.
func FuzzReadFlows(f *testing.F) {
	f.Add(goodLine + "\n")
	f.Add(`{"flow":` + goodLine + "}\n" + `{"lost_events":{}}` + "\n")
	f.Add(strings.Replace(goodLine, `"TCP":{"source_port":51224,"destination_port":8080}`, `"ICMPv4":{"type":8}`, 1))
	f.Add(strings.Replace(goodLine, `"reserved:world"`, `"cidr:10.0.0.0/8"`, 1) + "\r\n\n")
	f.Add("\n\n{}\n")
	f.Fuzz(func(t *testing.T, data string) {
		in, err := ReadFlows(strings.NewReader(data), "fuzz")
		if err != nil {
			if in != nil {
				t.Fatal("records with an error")
			}
			if !strings.HasPrefix(err.Error(), "fuzz:") {
				t.Fatalf("error names no line: %v", err)
			}
			return
		}
		for _, r := range in.Records {
			if r.Line < 1 || !r.Source.Addr.IsValid() || !r.Dest.Addr.IsValid() {
				t.Fatalf("record %+v", r)
			}
			switch {
			case r.ICMP:
				if r.Proto != 0 {
					t.Fatalf("ICMP with a protocol: %+v", r)
				}
			case r.Proto != policy.ProtoTCP && r.Proto != policy.ProtoUDP && r.Proto != policy.ProtoSCTP:
				t.Fatalf("protocol %d", r.Proto)
			case r.Port == 0 && !r.IsReply:
				t.Fatalf("port 0: %+v", r)
			}
			for _, p := range []FlowPeer{r.Source, r.Dest} {
				if p.IsPod() != (p.Labels != nil) || (p.IsPod() && p.Reserved != "") {
					t.Fatalf("peer %+v", p)
				}
			}
		}
		// Whatever was read generates policies the store accepts (or a
		// clear error).
		for _, spiffe := range []bool{false, true} {
			g, err := Generate(in, GenerateOptions{SPIFFE: spiffe})
			if err != nil {
				continue
			}
			out, err := g.YAML("fuzz")
			if err != nil {
				t.Fatal(err)
			}
			objs, err := store.Parse("gen.yaml", out)
			if err == nil {
				_, err = store.Build(objs, store.Options{AllLocal: true})
			}
			if err != nil {
				t.Fatalf("generated policies do not load: %v\n%s", err, out)
			}
		}
	})
}
