package flows

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

var (
	enrichPod  = netip.MustParseAddr("10.0.0.10")
	enrichPeer = netip.MustParseAddr("10.0.0.20")
	enrichCIDR = netip.MustParseAddr("192.0.2.7")
)

func enrichContext() *Context {
	ms := &policy.MapState{Revision: 3, Rules: map[policy.RuleID]policy.RuleInfo{
		7: {Kind: "NetworkPolicy", Namespace: "shop", Name: "allow-web", Direction: policy.Ingress},
		9: {Kind: "BulkheadPolicy", Namespace: "shop", Name: "deny-db", Direction: policy.Egress, Index: 2},
	}}
	ids := []policy.IdentityInfo{
		{ID: 300, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/web",
			Labels: identity.Labels{Namespace: "shop", ServiceAccount: "web", PodLabels: map[string]string{"app": "web", "q\"uote": "\u2028"}}},
		{ID: 400, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/default", Labels: identity.Labels{Namespace: "shop"}},
		{ID: 16777217, Prefix: netip.MustParsePrefix("192.0.2.0/24")},
	}
	pods := map[netip.Addr]PodName{enrichPod: {Namespace: "shop", Name: "web-1"}, enrichPeer: {Namespace: "shop", Name: "client-1"}}
	return NewContext(ms, ids, pods)
}

func newTestEnricher() *Enricher {
	e := NewEnricher("node-1")
	e.SetContext(enrichContext())
	return e
}

// TestEnrichOrientation: the local endpoint's ID goes on the side of the
// packet that is the pod, for both directions and replies, and the deciding
// policy lands in the list of the flow's direction and verdict.
func TestEnrichOrientation(t *testing.T) {
	e := newTestEnricher()
	for _, c := range []struct {
		name     string
		dir      policy.Direction
		reply    bool
		src, dst netip.Addr
		srcID    identity.NumericID
		dstID    identity.NumericID
		localSrc bool
	}{
		{"ingress", policy.Ingress, false, enrichPeer, enrichPod, 400, 300, false},
		{"ingress reply", policy.Ingress, true, enrichPod, enrichPeer, 300, 400, true},
		{"egress", policy.Egress, false, enrichPod, enrichPeer, 300, 400, true},
		{"egress reply", policy.Egress, true, enrichPeer, enrichPod, 400, 300, false},
	} {
		f := e.Enrich(&datapath.FlowEvent{Type: datapath.EventFlowNew, Endpoint: 5, Direction: c.dir, IsReply: c.reply,
			Verdict: policy.VerdictAllow, Rule: 7, Proto: 6, Src: c.src, Dst: c.dst, SrcPort: 1000, DstPort: 80,
			SrcIdentity: c.srcID, DstIdentity: c.dstID})
		local, remote := f.Destination, f.Source
		if c.localSrc {
			local, remote = f.Source, f.Destination
		}
		if local.ID != 5 || remote.ID != 0 || local.PodName != "web-1" || remote.PodName != "client-1" {
			t.Errorf("%s: source %+v destination %+v", c.name, f.Source, f.Destination)
		}
		if f.IsReply != c.reply || f.IP.Source != c.src.String() || f.IP.Destination != c.dst.String() {
			t.Errorf("%s: is_reply %v, IP %+v", c.name, f.IsReply, f.IP)
		}
		wantDir := DirectionIngress
		allowed := f.IngressAllowedBy
		if c.dir == policy.Egress {
			wantDir, allowed = DirectionEgress, f.EgressAllowedBy
		}
		if f.TrafficDirection != wantDir || len(allowed) != 1 || allowed[0].Name != "allow-web" {
			t.Errorf("%s: direction %s, allowed by %+v", c.name, f.TrafficDirection, allowed)
		}
		assertSameJSON(t, 0, f)
	}
}

func TestEnrichVerdicts(t *testing.T) {
	e := newTestEnricher()
	base := datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Direction: policy.Egress, Proto: 17,
		Src: enrichPod, Dst: enrichCIDR, SrcPort: 5353, DstPort: 53, SrcIdentity: 300, DstIdentity: 16777217}
	for _, c := range []struct {
		name       string
		verdict    policy.Verdict
		reason     datapath.DropReason
		rule       policy.RuleID
		wantV      string
		wantReason string
		deniedBy   string
		allowedBy  string
	}{
		{"default deny", policy.VerdictDeny, datapath.DropPolicy, policy.RuleDefault, VerdictDropped, DropPolicyDenied, "default-deny", ""},
		{"explicit deny", policy.VerdictDeny, datapath.DropPolicy, 9, VerdictDropped, DropPolicyDeny, "deny-db", ""},
		{"revised deny", policy.VerdictDeny, datapath.DropPolicyRevised, 9, VerdictDropped, DropPolicyDeny, "deny-db", ""},
		{"malformed", policy.VerdictDeny, datapath.DropMalformed, policy.RuleDefault, VerdictDropped, DropInvalidPacket, "", ""},
		{"audit", policy.VerdictAudit, datapath.DropNone, policy.RuleDefault, VerdictAudit, "", "default-deny", ""},
		{"unknown rule", policy.VerdictAllow, datapath.DropNone, 12345, VerdictForwarded, "", "", "rule-12345"},
		{"unselected", datapath.VerdictPass, datapath.DropNone, policy.RuleDefault, VerdictForwarded, "", "", "no-policy-selects"},
	} {
		ev := base
		ev.Verdict, ev.DropReason, ev.Rule = c.verdict, c.reason, c.rule
		f := e.Enrich(&ev)
		if f.Verdict != c.wantV || f.DropReasonDesc != c.wantReason {
			t.Errorf("%s: verdict %s reason %q", c.name, f.Verdict, f.DropReasonDesc)
		}
		name := func(ps []*Policy) string {
			if len(ps) == 0 {
				return ""
			}
			return ps[0].Name
		}
		if got := name(f.EgressDeniedBy); got != c.deniedBy {
			t.Errorf("%s: egress_denied_by %q, want %q", c.name, got, c.deniedBy)
		}
		if got := name(f.EgressAllowedBy); got != c.allowedBy {
			t.Errorf("%s: egress_allowed_by %q, want %q", c.name, got, c.allowedBy)
		}
		if f.Destination.CIDR != "192.0.2.0/24" || f.L4.UDP == nil || f.L4.UDP.DestinationPort != 53 {
			t.Errorf("%s: destination %+v l4 %+v", c.name, f.Destination, f.L4)
		}
		assertSameJSON(t, 0, f)
	}
}

// TestEnrichJSON: records built by Enrich (addresses in the record's own
// storage, labels encoded once per identity) encode as encoding/json does.
func TestEnrichJSON(t *testing.T) {
	e := newTestEnricher()
	for i, ev := range []datapath.FlowEvent{
		{Type: datapath.EventFlowNew, Endpoint: 5, Verdict: policy.VerdictAllow, Rule: 7, Proto: 6, Src: enrichPeer, Dst: enrichPod,
			SrcIdentity: 400, DstIdentity: 300, TCPFlags: 0xff},
		{Type: datapath.EventFlowEnd, Endpoint: 5, Direction: policy.Egress, Verdict: policy.VerdictAllow, Proto: 58,
			Src: netip.MustParseAddr("fd00::10"), Dst: netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
			SrcIdentity: 300, DstIdentity: identity.IDWorld},
		{Type: datapath.EventFlowNew, Endpoint: 5, Verdict: policy.VerdictAllow, Proto: 132, Src: enrichPeer, Dst: enrichPod,
			SrcIdentity: identity.IDHost, DstIdentity: 999},
		{Type: datapath.EventFlowNew, Endpoint: 5, Verdict: policy.VerdictAllow, Proto: 1, Src: enrichPeer, Dst: enrichPod},
		{Type: datapath.EventFlowNew, Endpoint: 5, Verdict: policy.VerdictAllow, Proto: 47, Src: enrichPeer, Dst: enrichPod},
	} {
		f := e.Enrich(&ev)
		if f.IP.Source != ev.Src.String() || f.IP.Destination != ev.Dst.String() {
			t.Fatalf("event %d: IP %+v", i, f.IP)
		}
		assertSameJSON(t, i, f)
	}
}

// TestEnrichAllocs: a record costs one allocation.
func TestEnrichAllocs(t *testing.T) {
	e := newTestEnricher()
	ev := datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Verdict: policy.VerdictDeny, DropReason: datapath.DropPolicy,
		Proto: 6, Src: enrichPeer, Dst: enrichPod, SrcIdentity: 400, DstIdentity: 300, TCPFlags: 2}
	if n := testing.AllocsPerRun(100, func() { e.Enrich(&ev) }); n != 1 {
		t.Fatalf("Enrich allocates %v times, want 1", n)
	}
}

// TestReservedIdentitiesKeepTheirLabels: the compiler lists host and world
// among its identities, with no labels; records must still say reserved:*.
func TestReservedIdentitiesKeepTheirLabels(t *testing.T) {
	ms := &policy.MapState{}
	c := NewContext(ms, []policy.IdentityInfo{{ID: identity.IDHost}, {ID: identity.IDWorld}}, nil)
	if got := c.Identities[identity.IDWorld].Labels; len(got) != 1 || got[0] != "reserved:world" {
		t.Fatalf("world labels = %v", got)
	}
	if got := c.Identities[identity.IDHost].Labels; len(got) != 1 || got[0] != "reserved:host" {
		t.Fatalf("host labels = %v", got)
	}
}

func TestEnrichICMPType(t *testing.T) {
	en := NewEnricher("n")
	for _, c := range []struct {
		proto, typ uint8
	}{{1, 8}, {58, 129}} {
		f := en.Enrich(&datapath.FlowEvent{Type: datapath.EventFlowNew, Verdict: policy.VerdictAllow, Proto: c.proto, ICMPType: c.typ,
			Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2")})
		var got *ICMP
		if c.proto == 1 {
			got = f.L4.ICMPv4
		} else {
			got = f.L4.ICMPv6
		}
		if got == nil || got.Type != c.typ {
			t.Fatalf("proto %d: ICMP %+v, want type %d", c.proto, got, c.typ)
		}
	}
}

// TestEnrichForgedSource: a packet dropped by source validation names the
// reason, the sending endpoint's pod (not the pod whose address it forged)
// and no policy, in the JSON record, OCSF and the compact line.
func TestEnrichForgedSource(t *testing.T) {
	e := NewEnricher("node-1")
	c := enrichContext()
	c.Endpoints = map[policy.EndpointID]PodName{5: {Namespace: "shop", Name: "web-1"}}
	e.SetContext(c)
	for _, tc := range []struct {
		reason datapath.DropReason
		want   string
	}{
		{datapath.DropInvalidSource, DropInvalidSourceIP},
		{datapath.DropInvalidSourceMAC, DropInvalidSourceMAC},
		{datapath.DropForbiddenICMPv6, DropForbiddenICMPv6},
		{datapath.DropUnsupportedL2, DropUnsupportedL2},
	} {
		// web-1 (endpoint 5, identity 300) claims client-1's address.
		f := e.Enrich(&datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Direction: policy.Egress,
			Verdict: policy.VerdictDeny, DropReason: tc.reason, Proto: 17, Src: enrichPeer, Dst: enrichCIDR,
			SrcPort: 5000, DstPort: 82, SrcIdentity: 300})
		if f.Verdict != VerdictDropped || f.DropReasonDesc != tc.want {
			t.Errorf("%s: verdict %s reason %q", tc.reason, f.Verdict, f.DropReasonDesc)
		}
		if f.Source.PodName != "web-1" || f.Source.ID != 5 || f.Source.Identity != 300 || f.IP.Source != enrichPeer.String() {
			t.Errorf("%s: source %+v ip %+v, want web-1 claiming %v", tc.reason, f.Source, f.IP, enrichPeer)
		}
		if f.DecidingPolicy() != nil {
			t.Errorf("%s: decided by %v, want no policy", tc.reason, f.DecidingPolicy())
		}
		if got := Compact(f, false); !strings.HasSuffix(got, "DROPPED "+tc.want) || !strings.Contains(got, "shop/web-1:5000 -> ") {
			t.Errorf("%s: compact %q", tc.reason, got)
		}
		if o := f.ToOCSF(); o.Unmapped.DropReasonDesc != tc.want || o.Disposition != "Blocked" {
			t.Errorf("%s: ocsf %+v", tc.reason, o)
		}
		assertSameJSON(t, 0, f)
	}
}

// TestContextFromKeepsUnchangedViews: a new context shares the views of
// identities whose labels are the same, and makes new ones for those whose
// labels changed (an identity number reused after its grace period).
func TestContextFromKeepsUnchangedViews(t *testing.T) {
	ms := &policy.MapState{Revision: 4}
	web := policy.IdentityInfo{ID: 300, Labels: identity.Labels{Namespace: "shop", PodLabels: map[string]string{"app": "web"}}}
	db := policy.IdentityInfo{ID: 301, Labels: identity.Labels{Namespace: "shop", PodLabels: map[string]string{"app": "db"}}}
	first := NewContext(ms, []policy.IdentityInfo{web, db}, nil)
	reused := policy.IdentityInfo{ID: 301, Labels: identity.Labels{Namespace: "shop", PodLabels: map[string]string{"app": "cache"}}}
	next := NewContextFrom(first, ms, []policy.IdentityInfo{web, reused}, nil)
	if next.Identities[300] != first.Identities[300] {
		t.Error("the unchanged identity's view was built again")
	}
	v := next.Identities[301]
	if v == first.Identities[301] || !slices.Contains(v.Labels, "k8s:app=cache") || !strings.Contains(string(v.labelsJSON), "app=cache") {
		t.Errorf("the changed identity keeps its old view: %+v", v)
	}
	if !slices.Contains(first.Identities[301].Labels, "k8s:app=db") {
		t.Error("the earlier context's view changed")
	}
}

// TestEnrichIsolatedBy (issue 16): a drop by the default deny of an
// isolated pod names the policies that isolate the deciding pod (the local
// endpoint) in the deciding direction, in the record, its JSON, OCSF and
// the compact line; a drop by a rule, an allow and a drop policy did not
// decide name none.
func TestEnrichIsolatedBy(t *testing.T) {
	e := NewEnricher("node-1")
	c := enrichContext()
	c.IsolatedBy = map[policy.EndpointID]*[2][]string{
		5: {
			policy.Ingress: {"NetworkPolicy shop/web-in", "BulkheadPolicy shop/lockdown"},
			policy.Egress:  {"NetworkPolicy shop/web-out"},
		},
	}
	e.SetContext(c)
	ingress := datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Direction: policy.Ingress, Verdict: policy.VerdictDeny,
		DropReason: datapath.DropPolicy, Rule: policy.RuleDefault, Proto: 6, Src: enrichPeer, Dst: enrichPod,
		SrcPort: 40000, DstPort: 5432, SrcIdentity: 400, DstIdentity: 300, TCPFlags: 2}
	egress := datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Direction: policy.Egress, Verdict: policy.VerdictDeny,
		DropReason: datapath.DropPolicy, Rule: policy.RuleDefault, Proto: 17, Src: enrichPod, Dst: enrichCIDR,
		SrcPort: 5353, DstPort: 53, SrcIdentity: 300, DstIdentity: 16777217}
	with := func(ev datapath.FlowEvent, edit func(*datapath.FlowEvent)) *datapath.FlowEvent {
		edit(&ev)
		return &ev
	}
	for _, tc := range []struct {
		name string
		ev   *datapath.FlowEvent
		want []string
	}{
		{"ingress default deny", &ingress, []string{"NetworkPolicy shop/web-in", "BulkheadPolicy shop/lockdown"}},
		{"egress default deny", &egress, []string{"NetworkPolicy shop/web-out"}},
		{"audit", with(egress, func(ev *datapath.FlowEvent) { ev.Verdict, ev.DropReason = policy.VerdictAudit, datapath.DropNone }),
			[]string{"NetworkPolicy shop/web-out"}},
		{"rule deny", with(egress, func(ev *datapath.FlowEvent) { ev.Rule = 9 }), nil},
		{"allow", with(ingress, func(ev *datapath.FlowEvent) {
			ev.Type, ev.Verdict, ev.DropReason, ev.Rule = datapath.EventFlowNew, policy.VerdictAllow, datapath.DropNone, 7
		}), nil},
		{"malformed", with(ingress, func(ev *datapath.FlowEvent) { ev.DropReason = datapath.DropMalformed }), nil},
		{"auth required, rule 0", with(ingress, func(ev *datapath.FlowEvent) { ev.DropReason = datapath.DropAuthRequired }), nil},
		{"another endpoint", with(ingress, func(ev *datapath.FlowEvent) { ev.Endpoint = 6 }), nil},
	} {
		f := e.Enrich(tc.ev)
		if !slices.Equal(f.IsolatedBy, tc.want) {
			t.Errorf("%s: isolated_by %q, want %q", tc.name, f.IsolatedBy, tc.want)
		}
		assertSameJSON(t, 0, f)
		raw := string(f.AppendJSON(nil))
		if o := f.ToOCSF(); !slices.Equal(o.Unmapped.IsolatedBy, tc.want) {
			t.Errorf("%s: ocsf unmapped.isolated_by %q", tc.name, o.Unmapped.IsolatedBy)
		}
		compact := Compact(f, false)
		if tc.want == nil {
			if strings.Contains(raw, "isolated_by") || strings.Contains(compact, "isolated by") {
				t.Errorf("%s: names an isolation:\n%s\n%s", tc.name, raw, compact)
			}
			continue
		}
		if !strings.Contains(raw, `"isolated_by":["`+strings.Join(tc.want, `","`)+`"]`) {
			t.Errorf("%s: JSON %s", tc.name, raw)
		}
		if !strings.HasSuffix(compact, "by default-deny (isolated by "+strings.Join(tc.want, ", ")+")") {
			t.Errorf("%s: compact %q", tc.name, compact)
		}
	}
	if n := testing.AllocsPerRun(100, func() { e.Enrich(&ingress) }); n != 1 {
		t.Errorf("a default-deny drop's record allocates %v times, want 1", n)
	}
}

// TestEnrichQuarantined: a QUARANTINED drop names what quarantined the pod
// (looked up by the quarantine's number, the event's rule), names no
// policy (none decided it), and says so in its JSON, OCSF and compact line.
func TestEnrichQuarantined(t *testing.T) {
	e := NewEnricher("node-1")
	c := enrichContext()
	refs := map[uint32]*QuarantineRef{
		3: {AlertID: "a-1f2e", RuleID: "BH-RT-002"},
		4: {Reason: "incident 7"},
	}
	c.Quarantine = func(n uint32) *QuarantineRef { return refs[n] }
	e.SetContext(c)
	ev := datapath.FlowEvent{Type: datapath.EventDrop, Endpoint: 5, Direction: policy.Egress, Verdict: policy.VerdictDeny,
		DropReason: datapath.DropQuarantined, Rule: 3, Proto: 6, Src: enrichPod, Dst: enrichPeer,
		SrcPort: 40000, DstPort: 80, SrcIdentity: 300, DstIdentity: 400, TCPFlags: 2}
	f := e.Enrich(&ev)
	if f.DropReasonDesc != DropQuarantined || f.Quarantine == nil || *f.Quarantine != *refs[3] {
		t.Fatalf("record: drop_reason_desc %q, quarantine %+v", f.DropReasonDesc, f.Quarantine)
	}
	if f.EgressDeniedBy != nil || f.IngressDeniedBy != nil || f.IsolatedBy != nil {
		t.Errorf("a quarantine drop names policies: %+v %+v %v", f.EgressDeniedBy, f.IngressDeniedBy, f.IsolatedBy)
	}
	assertSameJSON(t, 0, f)
	raw := string(f.AppendJSON(nil))
	if !strings.Contains(raw, `"quarantine":{"alert_id":"a-1f2e","rule_id":"BH-RT-002"}`) {
		t.Errorf("JSON %s", raw)
	}
	if o := f.ToOCSF(); o.Unmapped.Quarantine == nil || o.Unmapped.Quarantine.AlertID != "a-1f2e" {
		t.Errorf("ocsf unmapped.quarantine %+v", o.Unmapped.Quarantine)
	}
	if compact := Compact(f, false); !strings.HasSuffix(compact, "DROPPED by quarantine (alert a-1f2e BH-RT-002)") {
		t.Errorf("compact %q", compact)
	}
	ev.Rule = 4
	if f := e.Enrich(&ev); f.Quarantine == nil || f.Quarantine.Reason != "incident 7" {
		t.Errorf("operator's quarantine: %+v", f.Quarantine)
	} else {
		assertSameJSON(t, 1, f)
	}
	ev.Rule = 9 // unknown: still QUARANTINED, no reference
	if f := e.Enrich(&ev); f.DropReasonDesc != DropQuarantined || f.Quarantine != nil {
		t.Errorf("unknown quarantine: %q %+v", f.DropReasonDesc, f.Quarantine)
	}
}
