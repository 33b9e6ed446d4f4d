package agent

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// A record distinguishes a pod without link-local addresses (not read
// again at restore) from a record written before they were kept (read).
func TestRecordLinkLocalKnownOrNot(t *testing.T) {
	for name, c := range map[string]struct {
		ll   []netip.Addr
		want bool // nil after the round trip: unknown
	}{
		"none (IPv6 off)": {[]netip.Addr{}, false},
		"one":             {[]netip.Addr{netip.MustParseAddr("fe80::1")}, false},
		"unknown":         {nil, true},
	} {
		raw, err := json.Marshal(endpointRecord{MAC: "02:00:00:00:00:01", LinkLocal: c.ll})
		if err != nil {
			t.Fatal(err)
		}
		var back endpointRecord
		if err := json.Unmarshal(raw, &back); err != nil {
			t.Fatal(err)
		}
		if (back.LinkLocal == nil) != c.want || len(back.LinkLocal) != len(c.ll) {
			t.Errorf("%s: %s read back as %#v", name, raw, back.LinkLocal)
		}
	}
	var old endpointRecord
	if err := json.Unmarshal([]byte(`{"mac":"02:00:00:00:00:01"}`), &old); err != nil {
		t.Fatal(err)
	}
	if old.LinkLocal != nil {
		t.Fatalf("an older record reads as knowing its link-local addresses: %#v", old.LinkLocal)
	}
}
