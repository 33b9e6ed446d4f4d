package flows

import (
	"encoding/json"
	"testing"
)

func TestToOCSF(t *testing.T) {
	drop := sampleFlow() // pod → world, dropped
	e := drop.ToOCSF()
	if e.ClassUID != 4001 || e.CategoryUID != 4 || e.ActivityID != 5 || e.TypeUID != 400105 {
		t.Fatalf("drop: class %d category %d activity %d type %d", e.ClassUID, e.CategoryUID, e.ActivityID, e.TypeUID)
	}
	if e.ActionID != 2 || e.DispositionID != 2 || e.Connection.DirectionID != 2 || e.Connection.ProtocolNum != 6 {
		t.Fatalf("drop: action %d disposition %d direction %d proto %d", e.ActionID, e.DispositionID, e.Connection.DirectionID, e.Connection.ProtocolNum)
	}
	if e.SrcEndpoint.Name != "shop/frontend" || e.SrcEndpoint.UID != "spiffe://cluster.local/ns/shop/sa/frontend" || e.DstEndpoint.Port != 8080 {
		t.Fatalf("drop endpoints: %+v %+v", e.SrcEndpoint, e.DstEndpoint)
	}
	if len(e.Unmapped.EgressDeniedBy) != 1 || e.Unmapped.EgressDeniedBy[0].Name != "api" {
		t.Fatalf("deciding policy lost: %+v", e.Unmapped)
	}

	lateral := sampleFlow()
	lateral.Verdict, lateral.EventKind, lateral.DropReasonDesc = VerdictForwarded, "new", ""
	lateral.Destination = &Endpoint{Identity: 301, Namespace: "shop", PodName: "api"}
	if e := lateral.ToOCSF(); e.ActivityID != 1 || e.Connection.DirectionID != 3 || e.ActionID != 1 {
		t.Fatalf("lateral open: activity %d direction %d action %d", e.ActivityID, e.Connection.DirectionID, e.ActionID)
	}
	lateral.EventKind = "end"
	if e := lateral.ToOCSF(); e.ActivityID != 2 {
		t.Fatalf("end: activity %d, want Close", e.ActivityID)
	}
	lateral.EventKind, lateral.Verdict = "new", VerdictAudit
	if e := lateral.ToOCSF(); e.ActivityID != 6 || e.ActionID != 1 {
		t.Fatalf("audit: activity %d action %d, want Traffic/Allowed", e.ActivityID, e.ActionID)
	}

	b, err := drop.AppendOCSF(nil)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if m["class_uid"].(float64) != 4001 || m["connection_info"].(map[string]any)["direction_id"].(float64) != 2 {
		t.Fatalf("encoded event: %s", b)
	}
}
