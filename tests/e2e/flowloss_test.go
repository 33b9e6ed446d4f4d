package e2e

import (
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// TestRingOverflowIsCountedLoss (issue 5): with the agent stopped
// (SIGSTOP), real denied traffic makes far more flow events than the
// kernel ring holds. When the agent runs again, the loss shows as a
// lost_events record in the flow log, in
// bulkhead_lost_events_total{source="kernel"} and in `bulkhead status`,
// all with the same count.
func TestRingOverflowIsCountedLoss(t *testing.T) {
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
	api, db := e.addPod("shop", "api"), e.addPod("shop", "db")
	if got := scrapeLost(t, addr); got != 0 {
		t.Fatalf("kernel loss before the test: %d", got)
	}

	// Every datagram is a new flow (its own destination port) that the
	// api's policy denies: a drop event each, besides db's egress events.
	// The ring holds about 13,000 events.
	const datagrams = 40000
	var pc net.PacketConn
	if err := ns.WithNetNSPath(db.NS.Path(), func(ns.NetNS) error {
		pc, err = net.ListenPacket("udp4", ":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := e.agent.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = e.agent.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	msg := []byte("overflow")
	for i := range datagrams {
		to := &net.UDPAddr{IP: api.IPv4.AsSlice(), Port: 10000 + i}
		if _, err := pc.WriteTo(msg, to); err != nil {
			t.Fatalf("send datagram %d: %v", i, err)
		}
	}
	resume()

	// The agent turns the kernel counter into a record within its flush
	// tick (250 ms). Packets still queued when the agent resumed may add
	// loss a tick later: wait until the log and the metric agree.
	var logged, scraped int
	lostRe := regexp.MustCompile(`"source":"kernel","num_events_lost":(\d+)`)
	if !eventually(5*time.Second, func() bool {
		logged = 0
		for _, l := range e.flowLines(`"lost_events"`) {
			m := lostRe.FindStringSubmatch(l)
			if m == nil {
				t.Fatalf("lost_events record without a kernel count: %s", l)
			}
			n, _ := strconv.Atoi(m[1])
			logged += n
		}
		scraped = scrapeLost(t, addr)
		return logged > 0 && scraped == logged
	}) {
		t.Fatalf("after overflowing the ring: lost_events records in the flow log sum to %d, "+
			"bulkhead_lost_events_total{source=\"kernel\"} is %d\nagent log:\n%s", logged, scraped, e.agentLogs())
	}
	if logged >= 2*datagrams {
		t.Fatalf("%d events lost, more than were made", logged)
	}
	out, err := e.bulkhead(t, "status")
	if err != nil {
		t.Fatalf("bulkhead status: %v\n%s", err, out)
	}
	if !regexp.MustCompile(`Lost flow events:\s+` + strconv.Itoa(logged) + ` in the kernel ring`).MatchString(out) {
		t.Errorf("bulkhead status does not report %d events lost in the kernel ring:\n%s", logged, out)
	}
	// What the ring held was written: the drops of db's datagrams.
	n := len(e.flowLines(`"verdict":"DROPPED"`, `"pod_name":"db"`))
	if n == 0 {
		t.Errorf("no drop record of db's datagrams after the loss")
	}
	t.Logf("%d datagrams: %d events lost in the kernel ring, %d drop records written", datagrams, logged, n)
}

// scrapeLost reads bulkhead_lost_events_total{source="kernel"}.
func scrapeLost(t *testing.T, addr string) int {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^bulkhead_lost_events_total\{source="kernel"\} (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("scrape lacks bulkhead_lost_events_total{source=\"kernel\"}:\n%s", b)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return int(v)
}
