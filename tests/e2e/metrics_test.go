package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestMetricsScrape scrapes the agent's Prometheus endpoint over HTTP after
// real allowed and denied traffic.
func TestMetricsScrape(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	e := newEnv(t, "ptp")
	e.extraArgs = []string{"--metrics-addr", addr}
	e.writeStore("shop.yaml", shopStore)
	e.writeStore("policy.yaml", apiOnlyFromFrontend)
	e.startAgent()
	front, api, db := e.addPod("shop", "frontend"), e.addPod("shop", "api"), e.addPod("shop", "db")
	api.serve(t, 8080)
	if !front.tcpWorks(api.IPv4, 8080) || db.tcpWorks(api.IPv4, 8080) {
		t.Fatal("policy not enforced as expected")
	}
	var body string
	want := []string{
		`bulkhead_flows_total{direction="INGRESS",verdict="DROPPED"} `,
		`bulkhead_flows_total{direction="INGRESS",verdict="FORWARDED"} `,
		`bulkhead_drops_total{reason="POLICY_DENIED"} `,
		`bulkhead_policy_verdicts_total{kind="NetworkPolicy",namespace="shop",policy="api-from-frontend",verdict="FORWARDED"} `,
		`bulkhead_lost_events_total{source="kernel"} 0`,
		`bulkhead_endpoints 3`,
		`bulkhead_map_entries{map="policy"} `,
		`bulkhead_map_max_entries{map="conntrack"} `,
		`bulkhead_cni_add_seconds_count 3`,
		`bulkhead_policy_compile_seconds_count `,
		`bulkhead_policy_apply_seconds_count `,
	}
	ok := eventually(3*time.Second, func() bool {
		resp, err := http.Get(fmt.Sprintf("http://%s/metrics", addr))
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		for _, w := range want {
			if !strings.Contains(body, w) {
				return false
			}
		}
		return true
	})
	if !ok {
		for _, w := range want {
			if !strings.Contains(body, w) {
				t.Errorf("scrape lacks %q", w)
			}
		}
	}
	rev := regexp.MustCompile(`(?m)^bulkhead_policy_revision (\d+)$`).FindStringSubmatch(body)
	if rev == nil || rev[1] == "0" {
		t.Errorf("policy revision gauge missing or zero: %v", rev)
	}
}
