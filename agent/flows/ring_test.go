package flows

import (
	"testing"
	"time"
)

func flowN(i int, verdict string) *Flow {
	return &Flow{Time: time.Unix(int64(i), 0), Verdict: verdict, Type: "L3_L4",
		L4: &Layer4{TCP: &TCP{DestinationPort: uint16(i)}}}
}

func TestHubRingKeepsNewest(t *testing.T) {
	h := NewHub(5, "n")
	for i := range 12 {
		v := VerdictForwarded
		if i%2 == 1 {
			v = VerdictDropped
		}
		h.Publish(flowN(i, v))
	}
	got := h.Last(0, nil)
	if len(got) != 5 || got[0].Time.Unix() != 7 || got[4].Time.Unix() != 11 {
		t.Fatalf("Last(all) = %v, want 7..11 oldest first", times(got))
	}
	got = h.Last(2, &Selector{Allow: []Filter{{Verdicts: []string{VerdictDropped}}}})
	if len(got) != 2 || got[0].Time.Unix() != 9 || got[1].Time.Unix() != 11 {
		t.Fatalf("Last(2, dropped) = %v, want [9 11]", times(got))
	}
}

func TestHubSlowFollowerGetsLostMarker(t *testing.T) {
	h := NewHub(100, "node-a")
	backlog, sub := h.Subscribe(0, Selector{}, 2)
	defer sub.Close()
	if len(backlog) != 0 {
		t.Fatalf("backlog = %d", len(backlog))
	}
	for i := range 5 { // 2 fit, 3 are lost
		h.Publish(flowN(i, VerdictForwarded))
	}
	if h.LostUserspace() != 3 {
		t.Fatalf("lost = %d, want 3", h.LostUserspace())
	}
	a, b := <-sub.C(), <-sub.C()
	if a.Flow.Time.Unix() != 0 || b.Flow.Time.Unix() != 1 {
		t.Fatalf("first items = %+v %+v", a, b)
	}
	h.Publish(flowN(5, VerdictForwarded))
	lost := <-sub.C()
	if lost.Lost == nil || lost.Lost.NumEventsLost != 3 || lost.Lost.NodeName != "node-a" {
		t.Fatalf("want a lost marker of 3 where the gap is, got %+v", lost)
	}
	if next := <-sub.C(); next.Flow == nil || next.Flow.Time.Unix() != 5 {
		t.Fatalf("after the marker want flow 5, got %+v", next)
	}
}

func TestHubSubscribeFilters(t *testing.T) {
	h := NewHub(10, "")
	h.Publish(flowN(1, VerdictDropped))
	h.Publish(flowN(2, VerdictForwarded))
	backlog, sub := h.Subscribe(10, Selector{Allow: []Filter{{Verdicts: []string{VerdictDropped}}}}, 10)
	defer sub.Close()
	if len(backlog) != 1 || backlog[0].Time.Unix() != 1 {
		t.Fatalf("backlog = %v", times(backlog))
	}
	h.Publish(flowN(3, VerdictForwarded))
	h.Publish(flowN(4, VerdictDropped))
	if it := <-sub.C(); it.Flow.Time.Unix() != 4 {
		t.Fatalf("follower got %v, want flow 4 only", it.Flow.Time.Unix())
	}
	sub.Close()
	h.Publish(flowN(5, VerdictDropped))
	select {
	case it := <-sub.C():
		t.Fatalf("closed follower got %+v", it)
	default:
	}
}

func times(fs []*Flow) []int64 {
	var out []int64
	for _, f := range fs {
		out = append(out, f.Time.Unix())
	}
	return out
}

func TestHubPublishLostReachesFollowers(t *testing.T) {
	h := NewHub(10, "n")
	_, sub := h.Subscribe(0, Selector{}, 1)
	defer sub.Close()
	h.PublishLost(&LostEvents{Source: "kernel", NumEventsLost: 5})
	if it := <-sub.C(); it.Lost == nil || it.Lost.Source != "kernel" || it.Lost.NumEventsLost != 5 {
		t.Fatalf("got %+v, want the kernel loss marker", it)
	}
}

// TestHubSubscribeFromNow (issue 16): a negative n sends no recent flows,
// only those published after the subscription (observe --follow).
func TestHubSubscribeFromNow(t *testing.T) {
	h := NewHub(10, "")
	h.Publish(flowN(1, VerdictDropped))
	if got := h.Last(-1, nil); len(got) != 0 {
		t.Fatalf("Last(-1) = %v, want none", times(got))
	}
	backlog, sub := h.Subscribe(-1, Selector{}, 10)
	defer sub.Close()
	if len(backlog) != 0 {
		t.Fatalf("backlog = %v, want none", times(backlog))
	}
	h.Publish(flowN(2, VerdictDropped))
	if it := <-sub.C(); it.Flow == nil || it.Flow.Time.Unix() != 2 {
		t.Fatalf("follower got %+v, want flow 2", it)
	}
}
