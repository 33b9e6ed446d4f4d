package flows

import (
	"strings"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

func TestAlertFilter(t *testing.T) {
	al := sampleAlert() // shop/frontend, BH-RT-002, high
	later := al.Time.Add(time.Minute)
	for _, tt := range []struct {
		name string
		f    AlertFilter
		want bool
	}{
		{"empty", AlertFilter{}, true},
		{"pod qualified", AlertFilter{Pods: []string{"shop/frontend"}}, true},
		{"pod bare", AlertFilter{Pods: []string{"frontend"}}, true},
		{"pod other namespace", AlertFilter{Pods: []string{"ops/frontend"}}, false},
		{"pod other", AlertFilter{Pods: []string{"shop/api"}}, false},
		{"pods are alternatives", AlertFilter{Pods: []string{"shop/api", "shop/frontend"}}, true},
		{"namespace", AlertFilter{Namespaces: []string{"shop"}}, true},
		{"namespace other", AlertFilter{Namespaces: []string{"ops"}}, false},
		{"rule", AlertFilter{Rules: []string{"bh-rt-002"}}, true},
		{"rule other", AlertFilter{Rules: []string{"BH-RT-005"}}, false},
		{"severity", AlertFilter{Severities: []string{"HIGH"}}, true},
		{"severity other", AlertFilter{Severities: []string{"critical", "medium"}}, false},
		{"spiffe glob", AlertFilter{SPIFFEIDs: []string{"spiffe://cluster.local/ns/shop/sa/*"}}, true},
		{"spiffe other", AlertFilter{SPIFFEIDs: []string{"spiffe://cluster.local/ns/ops/sa/*"}}, false},
		{"all fields match", AlertFilter{Pods: []string{"frontend"}, Rules: []string{"BH-RT-002"}, Severities: []string{"high"}}, true},
		{"one field fails", AlertFilter{Pods: []string{"frontend"}, Rules: []string{"BH-RT-002"}, Severities: []string{"critical"}}, false},
		{"since after", AlertFilter{Since: later}, false},
		{"since before", AlertFilter{Since: al.Time.Add(-time.Minute)}, true},
	} {
		if err := tt.f.Validate(); err != nil {
			t.Errorf("%s: %v", tt.name, err)
		}
		if got := tt.f.Match(al); got != tt.want {
			t.Errorf("%s: match %v, want %v", tt.name, got, tt.want)
		}
	}
	// An aggregated line counts by its last event.
	agg := sampleAlert()
	first, last := al.Time, later.Add(time.Second)
	agg.FirstTime, agg.LastTime = &first, &last
	if f := (AlertFilter{Since: later}); !f.Match(agg) {
		t.Error("an aggregated alert whose last event is after --since is left out")
	}
	// The pod-less alert (a netns the agent no longer knows) matches no pod.
	orphan := sampleAlert()
	orphan.Pod = detect.Endpoint{Netns: 1}
	if f := (AlertFilter{Pods: []string{"frontend"}}); f.Match(orphan) {
		t.Error("a pod filter matched an alert without a pod")
	}

	for _, tt := range []struct {
		f    AlertFilter
		want string
	}{
		{AlertFilter{Rules: []string{"BH-RT-999"}}, `unknown rule "BH-RT-999"`},
		{AlertFilter{Severities: []string{"low"}}, `unknown severity "low"`},
		{AlertFilter{SPIFFEIDs: []string{"spiffe://[x"}}, "spiffe id glob"},
	} {
		if err := tt.f.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: error %v, want %q", tt.f, err, tt.want)
		}
	}
}

func TestAlertHub(t *testing.T) {
	h := NewAlertHub(3, "node")
	mk := func(rule string) *detect.Alert {
		al := sampleAlert()
		al.RuleID = rule
		return al
	}
	for _, r := range []string{"BH-RT-001", "BH-RT-002", "BH-RT-003", "BH-RT-002"} {
		h.Publish(mk(r))
	}
	rules := func(als []*detect.Alert) string {
		var s []string
		for _, al := range als {
			s = append(s, al.RuleID)
		}
		return strings.Join(s, ",")
	}
	if got := rules(h.Last(0, nil)); got != "BH-RT-002,BH-RT-003,BH-RT-002" {
		t.Errorf("ring of 3 after 4: %s", got)
	}
	f := AlertFilter{Rules: []string{"BH-RT-002"}}
	if got := rules(h.Last(1, &f)); got != "BH-RT-002" {
		t.Errorf("last 1 of BH-RT-002: %s", got)
	}

	backlog, sub := h.Subscribe(0, f, 1)
	defer sub.Close()
	if rules(backlog) != "BH-RT-002,BH-RT-002" {
		t.Errorf("backlog %s", rules(backlog))
	}
	h.Publish(mk("BH-RT-005")) // filtered out: not queued
	h.Publish(mk("BH-RT-002")) // fills the buffer of 1
	if lost := h.Publish(mk("BH-RT-002")); lost != 1 {
		t.Errorf("a full follower lost %d, want 1", lost)
	}
	if it := <-sub.C(); it.Alert == nil || it.Alert.RuleID != "BH-RT-002" {
		t.Fatalf("first item %+v", it)
	}
	h.Publish(mk("BH-RT-002")) // the marker goes first, the alert is lost again
	if it := <-sub.C(); it.Lost == nil || it.Lost.NumEventsLost != 1 || it.Lost.Source != "userspace" {
		t.Fatalf("want a lost marker of 1, got %+v", it)
	}
}
