package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
	spiretest "github.com/bulkhead-io/bulkhead/tests/spire"
)

// svidBenchTD is the trust domain of the SVID benchmarks' SPIRE server and
// agent.
const svidBenchTD = "bench.test"

// startSPIREForBench starts a SPIRE server and agent, authorizes this test
// process's uid (which the bulkhead agent shares) as a delegate, and waits
// until the agent serves it.
func startSPIREForBench(b *testing.B) (*spiretest.Server, *spiretest.Agent) {
	b.Helper()
	srv := spiretest.StartServer(b, spiretest.ServerConfig{TrustDomain: svidBenchTD})
	sa := srv.StartAgent(b, spiretest.AgentConfig{})
	srv.RegisterDelegate(b, sa)
	sa.WaitForSVID(b, spiretest.DelegateID(srv.TrustDomain()))
	return srv, sa
}

// podEntries are one registration entry per pod, matched by the
// selectors SPIRE's k8s attestor would produce: namespace and pod name.
func podEntries(srv *spiretest.Server, parent spiffeid.ID, pods []*cnichain.Pod) []spiretest.Entry {
	out := make([]spiretest.Entry, len(pods))
	for i, p := range pods {
		out[i] = spiretest.Entry{
			ParentID:  parent,
			SPIFFEID:  spiffeid.RequireFromPath(srv.TrustDomain(), "/bench/"+p.Namespace+"/"+p.Name),
			Selectors: []string{"k8s:ns:" + p.Namespace, "k8s:pod-name:" + p.Name},
		}
	}
	return out
}

// svidsHeld returns the pods ("ns/name") that hold an SVID now.
func (e *env) svidsHeld(ctx context.Context) (map[string]string, error) {
	l, err := e.client.ListIdentities(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(l.SVIDs))
	for _, s := range l.SVIDs {
		if s.SPIFFEID != "" {
			out[s.Pod] = s.SPIFFEID
		}
	}
	return out, nil
}

// BenchmarkSVIDAfterAdd measures how long a pod waits for its X.509-SVID
// after its CNI ADD returned, with a real spire-server and spire-agent and
// the bulkhead agent on the Delegated Identity API (--spire-admin-socket).
// The 50 pods' entries exist, and the SPIRE agent has synced them, before
// the first ADD, as for pods of a Deployment that is already registered.
// The pods are added one after another through the real chain (ptp +
// host-local + bulkhead-cni); after each ADD the agent's identities API is
// polled every 5 ms until the pod's SVID is listed. It reports that
// latency's p50 and p99, the ADDs' own p50 as the same-run baseline, and
// their ratio. The agent subscribes for the pod while it handles the ADD,
// so the SVID can arrive before the ADD returns (the first poll, made at
// once, then sees it). The polling itself costs the agent some CPU, and the
// time includes up to one poll interval.
func BenchmarkSVIDAfterAdd(b *testing.B) {
	const pods = 50
	e := newEnv(b, "ptp")
	srv, sa := startSPIREForBench(b)
	e.extraArgs = []string{"--spire-admin-socket", sa.AdminSocket(), "--trust-domain", svidBenchTD}
	e.writeStore("ns.yaml", openStore)
	e.startAgent()
	ctx := context.Background()

	var svidLat, addLat []time.Duration
	b.ResetTimer()
	for round := range b.N {
		b.StopTimer()
		// One warm-up pod per round, not measured: its entry is created
		// with the others, so its SVID arriving means the SPIRE agent has
		// synced all of them (it syncs every 5 s).
		all := make([]*cnichain.Pod, pods+1)
		for i := range all {
			all[i] = e.chain.NewPod(b)
			all[i].Namespace, all[i].Name = "svidbench", fmt.Sprintf("r%d-p%03d", round, i)
		}
		ids := srv.CreateEntries(b, podEntries(srv, sa.ID(), all))
		warm := all[0]
		if _, err := e.chain.Add(ctx, warm); err != nil {
			b.Fatalf("ADD %s: %v", warm.Name, err)
		}
		benchWaitSVID(b, e, warm, 2*time.Minute, time.Now())
		if err := e.chain.Remove(ctx, warm); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for _, p := range all[1:] {
			start := time.Now()
			if _, err := e.chain.Add(ctx, p); err != nil {
				b.Fatalf("ADD %s: %v\nagent log:\n%s", p.Name, err, e.agentLogs())
			}
			added := time.Now()
			addLat = append(addLat, added.Sub(start))
			svidLat = append(svidLat, benchWaitSVID(b, e, p, time.Minute, added))
		}
		b.StopTimer()
		removeAll(b, e.chain, all[1:])
		for _, id := range ids {
			srv.DeleteEntry(b, id)
		}
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(svidLat)
	slices.Sort(addLat)
	p50, p99, a50 := pct(svidLat, 50), pct(svidLat, 99), pct(addLat, 50)
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.ReportMetric(ms(a50), "add-p50-ms")
	b.ReportMetric(ms(pct(addLat, 99)), "add-p99-ms")
	b.ReportMetric(float64(p50)/float64(a50), "p50-x-add-p50")
	b.ReportMetric(float64(p99)/float64(a50), "p99-x-add-p50")
}

// benchWaitSVID polls the agent every 5 ms until p holds an SVID and returns the
// time since from.
func benchWaitSVID(b *testing.B, e *env, p *cnichain.Pod, timeout time.Duration, from time.Time) time.Duration {
	b.Helper()
	key := p.Namespace + "/" + p.Name
	deadline := from.Add(timeout)
	for {
		held, err := e.svidsHeld(context.Background())
		if err != nil {
			b.Fatalf("list identities: %v", err)
		}
		if _, ok := held[key]; ok {
			return time.Since(from)
		}
		if time.Now().After(deadline) {
			b.Fatalf("pod %s: no SVID %v after its ADD\nagent log:\n%s", key, timeout, e.agentLogs())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// removeAll DELs pods and removes their namespaces, one after another:
// unmounting network namespaces concurrently fails now and then with EBUSY.
func removeAll(b *testing.B, c *cnichain.Chain, pods []*cnichain.Pod) {
	b.Helper()
	for _, p := range pods {
		if err := c.Remove(context.Background(), p); err != nil {
			b.Errorf("remove pod %s: %v", p.Name, err)
		}
	}
}

// addAll ADDs pods through c, 8 at a time.
func addAll(b *testing.B, c *cnichain.Chain, pods []*cnichain.Pod) {
	b.Helper()
	errs := forEachConcurrently(pods, 8, func(p *cnichain.Pod) error {
		if _, err := c.Add(context.Background(), p); err != nil {
			return fmt.Errorf("ADD %s/%s: %w", p.Namespace, p.Name, err)
		}
		return nil
	})
	if len(errs) > 0 {
		b.Errorf("%d ADDs failed, first: %v", len(errs), errs[0])
	}
}

func forEachConcurrently[T any](items []T, workers int, f func(T) error) []error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	work := make(chan T)
	for range workers {
		wg.Go(func() {
			for it := range work {
				if err := f(it); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for _, it := range items {
		work <- it
	}
	close(work)
	wg.Wait()
	return errs
}

// BenchmarkAgentRSSWithSVIDs measures the agent's resident memory with
// 1,000 local pods holding 1,000 distinct SVIDs from a real SPIRE (one
// Delegated Identity subscription per pod), against the same agent binary
// with --identity-source none and the same 1,000 pods, in the same run.
// The pods are added through the real chain, 8 ADDs at a time, spread over
// four ptp chains (host-local hands out at most 253 addresses of a /24).
// RSS is VmRSS of /proc/<pid>/status once it has settled (no more than 1%
// change over three seconds); Go returns freed heap to the kernel lazily,
// so RSS includes garbage the collector has not given back yet.
func BenchmarkAgentRSSWithSVIDs(b *testing.B) {
	const pods = 1000
	// Fail (or skip) before the first half's minutes of work, not after.
	privileged.Require(b)
	spiretest.Bin(b)
	var none, withSVIDs []float64
	for range b.N {
		none = append(none, agentRSS(b, pods, false))
		withSVIDs = append(withSVIDs, agentRSS(b, pods, true))
	}
	slices.Sort(none)
	slices.Sort(withSVIDs)
	n, s := none[len(none)/2], withSVIDs[len(withSVIDs)/2]
	b.ReportMetric(n, "none-rss-MiB")
	b.ReportMetric(s, "spire-rss-MiB")
	b.ReportMetric(s/n, "rss-ratio")
	b.ReportMetric((s-n)*1024/pods, "KiB-per-svid")
}

// agentRSS starts an agent (with SPIRE when spire is set), adds pods local
// pods, waits until each holds its SVID (with SPIRE), and returns the
// agent's settled RSS in MiB. The pods, the agent and SPIRE are stopped
// before it returns, so that the next measurement runs alone; what is left
// (folders, subnet locks) goes when b ends.
func agentRSS(b *testing.B, pods int, spire bool) float64 {
	b.Helper()
	name := "none"
	if spire {
		name = "spire"
	}
	e := newEnv(b, "ptp")
	chains := []*cnichain.Chain{e.chain}
	for len(chains)*250 < pods {
		chains = append(chains, cnichain.New(b, cnichain.Config{Primary: "ptp", CNIVersion: "1.1.0",
			Bulkhead: &cnichain.BulkheadConfig{Socket: e.socket, AgentWaitSeconds: 5}}))
	}
	all := make([][]*cnichain.Pod, len(chains))
	var flat []*cnichain.Pod
	for i := range pods {
		c := i % len(chains)
		p := chains[c].NewPod(b)
		p.Namespace, p.Name = "rssbench", fmt.Sprintf("p%04d", i)
		all[c] = append(all[c], p)
		flat = append(flat, p)
	}
	e.writeStore("ns.yaml", openStore)
	var srv *spiretest.Server
	var sa *spiretest.Agent
	if spire {
		srv, sa = startSPIREForBench(b)
		srv.CreateEntries(b, podEntries(srv, sa.ID(), flat))
		e.extraArgs = []string{"--spire-admin-socket", sa.AdminSocket(), "--trust-domain", svidBenchTD}
	} else {
		e.extraArgs = []string{"--identity-source", "none"}
	}
	// Debug logs of 1,000 pods would only cost CPU here.
	e.extraArgs = append(e.extraArgs, "--log-level", "info")
	e.startAgent()
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range chains {
		wg.Go(func() { addAll(b, c, all[i]) })
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	b.Logf("%s: %d ADDs in %v", name, pods, time.Since(start).Round(time.Millisecond))
	if spire {
		waitAllSVIDs(b, e, pods)
		b.Logf("%s: all %d SVIDs held %v after the first ADD", name, pods, time.Since(start).Round(time.Millisecond))
	}
	rss := settledRSS(b, e.agent.cmd.Process.Pid)
	b.Logf("%s: settled RSS %.1f MiB", name, rss)
	start = time.Now()
	for i, c := range chains {
		removeAll(b, c, all[i])
	}
	b.Logf("%s: %d pods removed in %v", name, pods, time.Since(start).Round(time.Millisecond))
	e.stopAgent(syscall.SIGTERM)
	if spire {
		sa.Stop(b)
		srv.Stop(b)
	}
	return rss
}

// waitAllSVIDs waits until n local pods hold n distinct SVIDs.
func waitAllSVIDs(b *testing.B, e *env, n int) {
	b.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		held, err := e.svidsHeld(context.Background())
		if err != nil {
			b.Fatalf("list identities: %v", err)
		}
		if len(held) == n {
			distinct := map[string]bool{}
			for _, id := range held {
				distinct[id] = true
			}
			if len(distinct) != n {
				b.Fatalf("%d distinct SPIFFE IDs for %d pods", len(distinct), n)
			}
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d pods hold an SVID after 5m", len(held), n)
		}
		time.Sleep(time.Second)
	}
}

// settledRSS samples VmRSS every second until three samples in a row stay
// within 1% of the one before (or a minute passed) and returns the last,
// in MiB.
func settledRSS(b *testing.B, pid int) float64 {
	b.Helper()
	prev, stable := vmRSSKiB(b, pid), 0
	for range 60 {
		time.Sleep(time.Second)
		cur := vmRSSKiB(b, pid)
		if diff := cur - prev; diff*100 <= prev && -diff*100 <= prev {
			stable++
		} else {
			stable = 0
		}
		prev = cur
		if stable == 3 {
			break
		}
	}
	return float64(prev) / 1024
}

// vmRSSKiB is VmRSS of /proc/<pid>/status, in KiB.
func vmRSSKiB(b *testing.B, pid int) int {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatalf("agent status: %v", err)
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				b.Fatalf("agent VmRSS %q: %v", v, err)
			}
			return kib
		}
	}
	b.Fatalf("agent status has no VmRSS")
	return 0
}
