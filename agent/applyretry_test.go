package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestApplyRetryBackoff: failures are reported and retried with a doubling
// delay up to the cap; a success clears the report and stops retrying.
func TestApplyRetryBackoff(t *testing.T) {
	failures := prometheus.NewCounter(prometheus.CounterOpts{Name: "f"})
	lagging := prometheus.NewGauge(prometheus.GaugeOpts{Name: "l"})
	r := newApplyRetry(slog.New(slog.DiscardHandler), failures, lagging)
	if r.status() != nil {
		t.Fatal("status reports a failure before any")
	}
	var want time.Duration
	var since time.Time
	for i := range 12 {
		before := time.Now()
		r.failed(errors.New("boom"))
		st := r.status()
		want = min(applyRetryMin<<i, applyRetryMax)
		if got := st.NextRetry.Sub(before); got < want || got > want+time.Second {
			t.Fatalf("failure %d: next retry in %s, want %s", i+1, got, want)
		}
		if i == 0 {
			since = st.FailingSince
		}
		if st.LastError != "boom" || !st.FailingSince.Equal(since) {
			t.Fatalf("failure %d: status %+v, want failing since the first failure", i+1, st)
		}
	}
	if want != applyRetryMax {
		t.Fatalf("backoff reached only %s", want)
	}
	r.succeeded()
	if r.status() != nil {
		t.Fatal("status still reports a failure after a success")
	}

	// run calls retry once the backoff has passed, and not again after a
	// success.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var calls atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.run(ctx, func(context.Context) error {
			if calls.Add(1) == 1 {
				r.failed(errors.New("again"))
			} else {
				r.succeeded()
			}
			return nil
		})
	}()
	r.failed(errors.New("first"))
	deadline := time.Now().Add(5 * time.Second)
	for calls.Load() < 2 || r.status() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("%d retries, status %+v", calls.Load(), r.status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(3 * applyRetryMin)
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d retries, want 2 (one failed, one succeeded)", n)
	}
	cancel()
	<-done
}
