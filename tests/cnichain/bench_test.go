package cnichain_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// BenchmarkCNIAdd measures CNI ADD latency through libcni, one pod at a
// time, for the reference chain alone and with bulkhead-cni appended. The
// "+bulkhead-fakeagent" variants talk to FakeAgent, so they measure the
// plugin's own cost (exec, veth discovery, one API round trip), not the
// agent's attach and policy apply; the real-agent variant belongs to the
// end-to-end tier. Compare p50/p99 as ratios to the primary alone.
func BenchmarkCNIAdd(b *testing.B) {
	privileged.Require(b)
	for _, primary := range primaries() {
		b.Run(primary, func(b *testing.B) { benchAdd(b, primary, false) })
		b.Run(primary+"+bulkhead-fakeagent", func(b *testing.B) { benchAdd(b, primary, true) })
	}
}

// BenchmarkCNIAddConcurrent starts 20 pods at once per iteration, as
// kubelet does after a node restart, and reports the per-ADD p50/p99 over
// all of them.
func BenchmarkCNIAddConcurrent(b *testing.B) {
	privileged.Require(b)
	for _, primary := range primaries() {
		b.Run(primary, func(b *testing.B) { benchAddConcurrent(b, primary, false) })
		b.Run(primary+"+bulkhead-fakeagent", func(b *testing.B) { benchAddConcurrent(b, primary, true) })
	}
}

func benchAddConcurrent(b *testing.B, primary string, withBulkhead bool) {
	const n = 20
	ctx := context.Background()
	c := benchChain(b, primary, withBulkhead)
	var lat []time.Duration
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		pods := make([]*cnichain.Pod, n)
		for i := range pods {
			pods[i] = c.NewPod(b)
		}
		durs := make([]time.Duration, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		b.StartTimer()
		for i, p := range pods {
			wg.Go(func() {
				start := time.Now()
				_, errs[i] = c.Add(ctx, p)
				durs[i] = time.Since(start)
			})
		}
		wg.Wait()
		b.StopTimer()
		if err := errors.Join(errs...); err != nil {
			b.Fatalf("ADD: %v", err)
		}
		lat = append(lat, durs...)
		for _, p := range pods {
			if err := c.Remove(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
	b.StopTimer()
	report(b, lat)
}

func benchChain(b *testing.B, primary string, withBulkhead bool) *cnichain.Chain {
	ctx := context.Background()
	cfg := cnichain.Config{Primary: primary, CNIVersion: "1.1.0"}
	if withBulkhead {
		sock := cnichain.SocketPath(b)
		cnichain.StartFakeAgent(b, sock)
		cfg.Bulkhead = &cnichain.BulkheadConfig{Socket: sock, AgentWaitSeconds: 5}
	}
	c := cnichain.New(b, cfg)
	// One untimed ADD warms the page cache for the plugin binaries.
	warm := c.NewPod(b)
	if _, err := c.Add(ctx, warm); err != nil {
		b.Fatalf("warm-up ADD: %v", err)
	}
	if err := c.Remove(ctx, warm); err != nil {
		b.Fatal(err)
	}
	return c
}

func report(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	b.ReportMetric(ms(percentile(lat, 50)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 99)), "p99-ms")
}

func benchAdd(b *testing.B, primary string, withBulkhead bool) {
	ctx := context.Background()
	c := benchChain(b, primary, withBulkhead)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		p := c.NewPod(b)
		b.StartTimer()
		start := time.Now()
		_, err := c.Add(ctx, p)
		d := time.Since(start)
		b.StopTimer()
		if err != nil {
			b.Fatalf("ADD: %v", err)
		}
		lat = append(lat, d)
		if err := c.Remove(ctx, p); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	report(b, lat)
}

// percentile uses the nearest-rank method on sorted samples.
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (p*len(sorted)+99)/100 - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
