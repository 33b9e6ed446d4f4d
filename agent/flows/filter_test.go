package flows

import (
	"testing"
	"time"
)

func TestFilterMatch(t *testing.T) {
	fl := sampleFlow() // shop/frontend → world, TCP 40000→8080, DROPPED
	for _, tc := range []struct {
		name string
		f    Filter
		want bool
	}{
		{"empty", Filter{}, true},
		{"verdict", Filter{Verdicts: []string{"dropped"}}, true},
		{"other verdict", Filter{Verdicts: []string{"FORWARDED", "AUDIT"}}, false},
		{"namespace", Filter{Namespaces: []string{"ops", "shop"}}, true},
		{"other namespace", Filter{Namespaces: []string{"ops"}}, false},
		{"pod qualified", Filter{Pods: []string{"shop/frontend"}}, true},
		{"pod bare", Filter{Pods: []string{"frontend"}}, true},
		{"pod wrong ns", Filter{Pods: []string{"ops/frontend"}}, false},
		{"from pod", Filter{FromPods: []string{"shop/frontend"}}, true},
		{"to pod is not from", Filter{ToPods: []string{"shop/frontend"}}, false},
		{"spiffe glob", Filter{SPIFFEIDs: []string{"spiffe://cluster.local/ns/shop/sa/*"}}, true},
		{"spiffe glob is per segment", Filter{SPIFFEIDs: []string{"spiffe://cluster.local/*"}}, false},
		{"protocol", Filter{Protocols: []string{"udp", "tcp"}}, true},
		{"other protocol", Filter{Protocols: []string{"UDP"}}, false},
		{"dest port", Filter{Ports: []uint16{8080}}, true},
		{"src port", Filter{Ports: []uint16{40000}}, true},
		{"other port", Filter{Ports: []uint16{80}}, false},
		{"since before", Filter{Since: fl.Time.Add(-time.Second)}, true},
		{"since after", Filter{Since: fl.Time.Add(time.Second)}, false},
		{"and of fields", Filter{Verdicts: []string{"DROPPED"}, Ports: []uint16{80}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.f.Validate(); err != nil {
				t.Fatal(err)
			}
			if got := tc.f.Match(fl); got != tc.want {
				t.Fatalf("Match = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSelector(t *testing.T) {
	fl := sampleFlow()
	s := Selector{Allow: []Filter{{Verdicts: []string{"FORWARDED"}}, {Namespaces: []string{"shop"}}}}
	if !s.Match(fl) {
		t.Fatal("second allow filter should match")
	}
	s.Deny = []Filter{{Pods: []string{"shop/frontend"}}}
	if s.Match(fl) {
		t.Fatal("deny filter should win")
	}
	if (&Selector{Allow: []Filter{{Verdicts: []string{"AUDIT"}}}}).Match(fl) {
		t.Fatal("non-matching allow list let the flow through")
	}
}

func TestFilterValidate(t *testing.T) {
	for _, f := range []Filter{
		{SPIFFEIDs: []string{"spiffe://x/["}},
		{Verdicts: []string{"DENIED"}},
		{Protocols: []string{"QUIC"}},
	} {
		if err := f.Validate(); err == nil {
			t.Errorf("%+v: no error", f)
		}
	}
}
