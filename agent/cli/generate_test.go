package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/author"
)

// TestGenerateReadsAgentRecords: the flow records the agent writes (its
// enricher and encoder, not a copy of their format) are what `policy
// generate` reads, pods' labels and service accounts included. The reader
// lives in policy/author, which may not import agent/flows; this test
// joins the two.
func TestGenerateReadsAgentRecords(t *testing.T) {
	web, db, ext := netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("10.0.0.20"), netip.MustParseAddr("192.0.2.7")
	ms := &policy.MapState{Revision: 1, Rules: map[policy.RuleID]policy.RuleInfo{}}
	ids := []policy.IdentityInfo{
		{ID: 300, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/web",
			Labels: identity.Labels{Namespace: "shop", ServiceAccount: "web", PodLabels: map[string]string{"app": "web", "tier": "front"}}},
		{ID: 400, SPIFFEID: "spiffe://cluster.local/ns/shop/sa/default", Labels: identity.Labels{Namespace: "shop", PodLabels: map[string]string{"app": "db"}}},
	}
	en := flows.NewEnricher("node-1")
	en.SetContext(flows.NewContext(ms, ids, map[netip.Addr]flows.PodName{web: {Namespace: "shop", Name: "web-1"}, db: {Namespace: "shop", Name: "db-0"}}))
	var log []byte
	for _, ev := range []datapath.FlowEvent{
		{Type: datapath.EventFlowNew, Endpoint: 5, Direction: policy.Egress, Verdict: policy.VerdictAllow, Proto: policy.ProtoTCP,
			Src: web, Dst: db, SrcPort: 1000, DstPort: 5432, SrcIdentity: 300, DstIdentity: 400},
		{Type: datapath.EventFlowNew, Endpoint: 5, Direction: policy.Egress, Verdict: policy.VerdictAllow, Proto: policy.ProtoUDP,
			Src: web, Dst: ext, SrcPort: 1000, DstPort: 53, SrcIdentity: 300, DstIdentity: identity.IDWorld},
		{Type: datapath.EventFlowNew, Endpoint: 6, Direction: policy.Ingress, IsReply: true, Verdict: policy.VerdictAllow, Proto: policy.ProtoTCP,
			Src: db, Dst: web, SrcPort: 5432, DstPort: 1000, SrcIdentity: 400, DstIdentity: 300},
	} {
		log = en.Enrich(&ev).AppendJSON(log)
		log = append(log, '\n')
	}
	log = (&flows.LostEvents{Source: "kernel", NumEventsLost: 2}).AppendJSON(log)
	in, err := author.ReadFlows(bytes.NewReader(log), "agent")
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	if len(in.Records) != 3 || in.LostMarkers != 1 {
		t.Fatalf("got %d records and %d lost markers\n%s", len(in.Records), in.LostMarkers, log)
	}
	r := in.Records[0]
	if r.Source.Pod != "web-1" || r.Source.ServiceAccount != "web" || len(r.Source.Labels) != 2 || r.Source.Labels["tier"] != "front" ||
		r.Dest.Pod != "db-0" || r.Dest.Labels["app"] != "db" || r.Port != 5432 || r.Proto != policy.ProtoTCP || r.IsReply {
		t.Fatalf("record %+v", r)
	}
	if d := in.Records[1].Dest; d.IsPod() || d.Reserved != "world" || d.Addr != ext {
		t.Fatalf("world peer %+v", d)
	}
	if !in.Records[2].IsReply {
		t.Fatal("reply not read as a reply")
	}
	g, err := author.Generate(in, author.GenerateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if g.Stats.Connections != 2 || g.Stats.Replies != 1 || len(g.NetworkPolicies) != 2 {
		t.Fatalf("stats %+v, %d policies", g.Stats, len(g.NetworkPolicies))
	}
}

// historyBackend serves PathFlows from a fixed list, filtered by the
// request's selector as the agent filters its ring.
type historyBackend struct {
	api.Backend
	ring []*flows.Flow
	got  api.ObserveRequest
}

func (b *historyBackend) ObserveFlows(_ context.Context, req api.ObserveRequest, write func([]byte) error) error {
	b.got = req
	var sel flows.Selector
	if err := json.Unmarshal(req.Selector, &sel); err != nil {
		return err
	}
	for _, f := range b.ring {
		if len(sel.Allow) == 1 && !sel.Allow[0].Since.IsZero() && f.Time.Before(sel.Allow[0].Since) {
			continue
		}
		if err := write((&flows.Item{Flow: f}).AppendJSON(nil)); err != nil {
			return err
		}
	}
	return nil
}

// TestFlowHistory: --since asks the agent for all it keeps (Last 0) since
// the time, not following, and reports the oldest flow it got so that the
// CLI can say when the ring does not reach back that far.
func TestFlowHistory(t *testing.T) {
	now := time.Now().UTC()
	mk := func(ago time.Duration, port uint16) *flows.Flow {
		return &flows.Flow{Time: now.Add(-ago), Verdict: flows.VerdictForwarded, Type: "L3_L4", TrafficDirection: flows.DirectionEgress,
			IP:     &flows.IP{Source: "10.0.0.1", Destination: "192.0.2.1", IPVersion: "IPv4"},
			L4:     &flows.Layer4{TCP: &flows.TCP{SourcePort: 1000, DestinationPort: port}},
			Source: &flows.Endpoint{Identity: 300, Namespace: "shop", PodName: "web", Labels: []string{"k8s:app=web"}}, Destination: &flows.Endpoint{Identity: 2}}
	}
	b := &historyBackend{ring: []*flows.Flow{mk(3*time.Hour, 1), mk(30*time.Minute, 2), mk(time.Minute, 3)}}
	c := serveBackend(t, b)
	data, oldest, err := FlowHistory(context.Background(), c, now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if b.got.Last != 0 || b.got.Follow {
		t.Fatalf("request %+v: want all kept flows, not following", b.got)
	}
	in, err := author.ReadFlows(bytes.NewReader(data), "agent")
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Records) != 2 || in.Records[0].Port != 2 || !oldest.Equal(now.Add(-30*time.Minute)) {
		t.Fatalf("got %d records (%+v), oldest %s", len(in.Records), in.Records, oldest)
	}
}
