package e2e

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// BenchmarkCNIAddAgent measures CNI ADD latency through libcni with the
// real agent: ptp + host-local alone (the baseline) and with bulkhead-cni
// appended, interleaved in the same run so that machine noise hits both.
// One iteration is 100 sequential ADDs of each chain, then 20 concurrent
// ADDs of each. It reports p50/p99 in ms and as ratios to the baseline, and
// "added-p50-x-ptp": Bulkhead's added p50 as a multiple of the ptp step.
//
// TCX attach and detach each wait for an RCU grace period under the RTNL
// lock (about 5 ms for a pod's first attach here and 16 ms for its second,
// and concurrent ADDs queue behind them); cls_bpf does not. So both attach
// modes are measured.
func BenchmarkCNIAddAgent(b *testing.B) {
	for _, mode := range []string{"tcx", "clsact"} {
		b.Run(mode, func(b *testing.B) { benchCNIAddAgent(b, mode) })
	}
}

func benchCNIAddAgent(b *testing.B, mode string) {
	e := newEnv(b, "ptp")
	e.extraArgs = []string{"--attach-mode", mode}
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	base := cnichain.New(b, cnichain.Config{Primary: "ptp", CNIVersion: "1.1.0"})
	bh := e.chain
	ctx := context.Background()
	for _, c := range []*cnichain.Chain{base, bh} { // warm the page cache
		p := c.NewPod(b)
		if _, err := c.Add(ctx, p); err != nil {
			b.Fatal(err)
		}
		_ = c.Remove(ctx, p)
	}
	var seqBase, seqBH, conBase, conBH []time.Duration
	b.ResetTimer()
	for range b.N {
		for range 100 {
			seqBase = append(seqBase, timeAdds(b, base, 1)...)
			seqBH = append(seqBH, timeAdds(b, bh, 1)...)
		}
		conBase = append(conBase, timeAdds(b, base, 20)...)
		conBH = append(conBH, timeAdds(b, bh, 20)...)
	}
	b.StopTimer()
	for _, r := range []struct {
		name     string
		base, bh []time.Duration
	}{{"seq", seqBase, seqBH}, {"conc20", conBase, conBH}} {
		slices.Sort(r.base)
		slices.Sort(r.bh)
		b50, b99 := pct(r.base, 50), pct(r.base, 99)
		h50, h99 := pct(r.bh, 50), pct(r.bh, 99)
		b.ReportMetric(ms(b50), r.name+"-ptp-p50-ms")
		b.ReportMetric(ms(b99), r.name+"-ptp-p99-ms")
		b.ReportMetric(ms(h50), r.name+"-bulkhead-p50-ms")
		b.ReportMetric(ms(h99), r.name+"-bulkhead-p99-ms")
		b.ReportMetric(float64(h50)/float64(b50), r.name+"-p50-ratio")
		b.ReportMetric(float64(h99)/float64(b99), r.name+"-p99-ratio")
		b.ReportMetric(float64(h50-b50)/float64(b50), r.name+"-added-p50-x-ptp")
	}
}

// timeAdds adds n pods at once and returns each ADD's latency; the pods
// are removed afterwards, untimed.
func timeAdds(b *testing.B, c *cnichain.Chain, n int) []time.Duration {
	b.StopTimer()
	defer b.StartTimer()
	ctx := context.Background()
	pods := make([]*cnichain.Pod, n)
	for i := range pods {
		pods[i] = c.NewPod(b)
		pods[i].Namespace, pods[i].Name = "shop", fmt.Sprintf("bench-%s", pods[i].ContainerID[:10])
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
	for i, err := range errs {
		if err != nil {
			b.Fatalf("ADD: %v", err)
		}
		_ = i
	}
	for _, p := range pods {
		if err := c.Remove(ctx, p); err != nil {
			b.Fatal(err)
		}
	}
	return durs
}

func pct(sorted []time.Duration, p int) time.Duration {
	i := (p*len(sorted)+99)/100 - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
