package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/policy"
)

// metricValue reads a counter or gauge without labels from the agent's
// registry.
func metricValue(t *testing.T, a *Agent, name string) float64 {
	t.Helper()
	fams, err := a.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		m := f.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func waitStatus(t *testing.T, a *Agent, what string, ok func(api.StatusResponse) bool) api.StatusResponse {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := a.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after 20s; status %+v, apply %+v", what, st, st.PolicyApply)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestApplyFailureRetriedAndReported fails the datapath apply (ENOMEM, as a
// full map would) after a store change: the old policy stays live, status
// and metrics say the apply is failing, the agent retries with backoff, and
// once the datapath accepts the apply again the new state is live and the
// report clears, without any further change to the store.
func TestApplyFailureRetriedAndReported(t *testing.T) {
	a, store := newTestAgent(t)
	var failing atomic.Bool
	var failed atomic.Int64
	apply := a.applyPolicy
	a.applyPolicy = func(ms *policy.MapState) (datapath.ApplyStats, error) {
		if failing.Load() {
			failed.Add(1)
			return datapath.ApplyStats{}, fmt.Errorf("write policy: %w", syscall.ENOMEM)
		}
		return apply(ms)
	}
	startTestAgent(t, a)
	rev := a.dp.Revision()

	// A remote pod's address: the new state has it in the ipcache.
	peer := netip.MustParseAddr("10.213.250.9")
	pod := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: peer\n  namespace: shop\n  labels:\n    app: peer\n" +
		"status:\n  podIPs:\n  - ip: " + peer.String() + "\n"
	failing.Store(true)
	if err := os.WriteFile(filepath.Join(store, "peer.yaml"), []byte(pod), 0o644); err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, a, "failing apply retried twice", func(st api.StatusResponse) bool {
		return st.PolicyApply != nil && st.PolicyApply.Retries >= 2
	})
	if p := st.PolicyApply; !strings.Contains(p.LastError, syscall.ENOMEM.Error()) || p.FailingSince.IsZero() {
		t.Errorf("apply status %+v: want the ENOMEM and when it began", p)
	}
	if n := metricValue(t, a, "bulkhead_policy_apply_failures_total"); n < 3 || n > float64(failed.Load()) {
		t.Errorf("failures metric %v, %d applies failed", n, failed.Load())
	}
	if g := metricValue(t, a, "bulkhead_policy_apply_lagging"); g != 1 {
		t.Errorf("lagging gauge %v while failing", g)
	}
	if a.dp.Revision() != rev {
		t.Error("a failed apply published a revision")
	}
	if _, ok, err := a.dp.IPCacheLookup(peer); err != nil || ok {
		t.Errorf("the new state is live while its apply fails: %v %v", ok, err)
	}
	// Backoff: the retries do not spin.
	if n := failed.Load(); n > 10 {
		t.Errorf("%d failed applies within %s", n, time.Since(st.PolicyApply.FailingSince))
	}

	failing.Store(false)
	waitStatus(t, a, "the report clears after a successful retry", func(st api.StatusResponse) bool {
		return st.PolicyApply == nil
	})
	if _, ok, err := a.dp.IPCacheLookup(peer); err != nil || !ok {
		t.Errorf("after the retry the new state is not live: %v %v", ok, err)
	}
	if a.dp.Revision() == rev {
		t.Error("the successful retry published nothing")
	}
	if g := metricValue(t, a, "bulkhead_policy_apply_lagging"); g != 0 {
		t.Errorf("lagging gauge %v after success", g)
	}
}
