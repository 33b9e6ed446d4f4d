package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestScrape(t *testing.T) {
	m := New(func() []MapStat { return []MapStat{{Name: "ipcache", Entries: 12, MaxEntries: 65536}} })
	m.Flows.WithLabelValues("DROPPED", "INGRESS").Add(3)
	m.Drops.WithLabelValues("POLICY_DENY").Inc()
	m.PolicyVerdicts.WithLabelValues("BulkheadPolicy", "shop", "api", "DROPPED").Inc()
	m.LostEvents.WithLabelValues("kernel").Add(7)
	m.Endpoints.Set(4)
	m.PolicyRevision.Set(9)
	m.CompileSeconds.Observe(0.002)
	m.ApplySeconds.Observe(0.001)
	m.CNIAddSeconds.Observe(0.004)

	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`bulkhead_flows_total{direction="INGRESS",verdict="DROPPED"} 3`,
		`bulkhead_drops_total{reason="POLICY_DENY"} 1`,
		`bulkhead_policy_verdicts_total{kind="BulkheadPolicy",namespace="shop",policy="api",verdict="DROPPED"} 1`,
		`bulkhead_lost_events_total{source="kernel"} 7`,
		`bulkhead_lost_events_total{source="userspace"} 0`,
		`bulkhead_endpoints 4`,
		`bulkhead_policy_revision 9`,
		`bulkhead_map_entries{map="ipcache"} 12`,
		`bulkhead_map_max_entries{map="ipcache"} 65536`,
		`bulkhead_policy_compile_seconds_count 1`,
		`bulkhead_policy_apply_seconds_count 1`,
		`bulkhead_cni_add_seconds_count 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
}

func TestStoreConnected(t *testing.T) {
	m := New(nil)
	up := true
	m.StoreConnectedFunc(func() bool { return up })
	scrape := func() string {
		srv := httptest.NewServer(m.Handler())
		defer srv.Close()
		resp, err := srv.Client().Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	if b := scrape(); !strings.Contains(b, "\nbulkhead_store_connected 1\n") {
		t.Errorf("connected: no bulkhead_store_connected 1 in\n%s", b)
	}
	up = false
	if b := scrape(); !strings.Contains(b, "\nbulkhead_store_connected 0\n") {
		t.Errorf("disconnected: no bulkhead_store_connected 0 in\n%s", b)
	}
}
