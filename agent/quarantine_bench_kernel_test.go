package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// BenchmarkQuarantineLatency: from a syscall in a pod (CLOCK_MONOTONIC just
// before it) to the pod's quarantine enforced (the datapath's slot set,
// polled every 20 µs), under a BulkheadRuntimePolicy that answers the rule
// (BH-RT-002) with Quarantine; the pod is released between events. The
// baseline, from the same run and harness: the same syscall to its alert
// line in --alert-log with no policy (the alert pipeline alone). The
// quarantine comes before the alert line is written, so the difference is
// what deciding and enforcing it cost (the record's fsync most of all).
func BenchmarkQuarantineLatency(b *testing.B) {
	const events, batch = 50, 10
	a, alertLog, nsPath := benchRuntimeAgent(b, "c0ffee91", "10.213.6.91/32")
	var id policy.EndpointID
	for eid, rec := range a.view.Load().endpoints {
		if rec.Key.ContainerID == "c0ffee91" {
			id = eid
		}
	}
	if id == 0 {
		b.Fatal("no endpoint for the pod")
	}
	// lineOf waits for the alert line of the helper's unshare.
	lineOf := func(t *tailer, pid uint32) (int64, detect.Alert) {
		for {
			line, at, err := t.next(30 * time.Second)
			if err != nil {
				b.Fatalf("alert of pid %d: %v", pid, err)
			}
			var al detect.Alert
			if err := json.Unmarshal(line, &al); err != nil {
				b.Fatalf("alert line %s: %v", line, err)
			}
			if al.PID == pid && al.RuleID == detect.RuleUnshareNS.ID {
				return at, al
			}
		}
	}
	var mono unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono)
	wallOff := time.Now().UnixNano() - mono.Nano()
	store := strings.TrimPrefix(a.cfg.Store, "dir:")
	pod := api.PodRef{Namespace: "shop", Name: "web"}
	var base, lat []time.Duration
	for b.Loop() {
		base, lat = base[:0], lat[:0]
		_ = os.Remove(filepath.Join(store, "quarantine.yaml"))
		waitQuarantineRule(b, a, false)
		alerts := newTailer(b, alertLog)
		for len(base) < events {
			for _, p := range startAlertBenchProcs(b, min(batch, events-len(base)), "unshare", nsPath, "") {
				p.fire(b)
				at, _ := lineOf(alerts, uint32(p.cmd.Process.Pid))
				base = append(base, time.Duration(at-p.t0(b)))
				time.Sleep(5 * time.Millisecond)
			}
		}
		rp := "apiVersion: bulkhead.io/v1alpha1\nkind: BulkheadRuntimePolicy\nmetadata: {name: cut, namespace: shop}\n" +
			"spec:\n  selector: {podSelector: {matchLabels: {app: web}}}\n  detections:\n  - {rule: BH-RT-002, action: Quarantine}\n"
		if err := os.WriteFile(filepath.Join(store, "quarantine.yaml"), []byte(rp), 0o644); err != nil {
			b.Fatal(err)
		}
		waitQuarantineRule(b, a, true)
		for len(lat) < events {
			for _, p := range startAlertBenchProcs(b, min(batch, events-len(lat)), "unshare", nsPath, "") {
				pid := uint32(p.cmd.Process.Pid)
				p.fire(b)
				if _, al := lineOf(alerts, pid); al.Quarantine != "quarantined" {
					b.Fatalf("alert %+v", al)
				}
				// When the slot was set: the quarantine's since, taken
				// just after the store (wall clock, placed on
				// CLOCK_MONOTONIC); polling from here would steal the
				// agent's CPU or add its own delay.
				list, err := a.ListQuarantines(context.Background())
				if err != nil || len(list.Quarantines) != 1 {
					b.Fatalf("quarantines %+v %v", list, err)
				}
				enforced := list.Quarantines[0].Since.UnixNano() - wallOff
				lat = append(lat, time.Duration(enforced-p.t0(b)))
				if _, err := a.ReleaseQuarantine(context.Background(), api.QuarantineReleaseRequest{Pod: pod}); err != nil {
					b.Fatal(err)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	p50, bp50 := percentile(lat, 50), percentile(base, 50)
	b.ReportMetric(ms(p50), "enforced-p50-ms")
	b.ReportMetric(ms(percentile(lat, 99)), "enforced-p99-ms")
	b.ReportMetric(ms(bp50), "alert-line-p50-ms")
	b.ReportMetric(ms(percentile(base, 99)), "alert-line-p99-ms")
	b.ReportMetric(float64(p50)/float64(bp50), "p50/alert-line")
	b.ReportMetric(float64(len(lat)), "events")
}

// waitQuarantineRule waits until the store's runtime policies do (want) or
// do not quarantine shop/web for BH-RT-002.
func waitQuarantineRule(b *testing.B, a *Agent, want bool) {
	b.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		in := a.sysmon.inputs.Load()
		if in != nil {
			got := policy.RuntimeQuarantines(in.pols, "shop", in.labels[podRef{"shop", "web"}], "")[detect.RuleUnshareNS.ID]
			if got == want {
				return
			}
		}
		if time.Now().After(deadline) {
			b.Fatalf("quarantine rule in force: want %v after 10s", want)
		}
	}
}
