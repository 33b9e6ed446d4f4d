package agent

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// Backoff of policy apply retries.
const (
	applyRetryMin = 100 * time.Millisecond
	applyRetryMax = 30 * time.Second
)

// applyRetry keeps a failed policy apply from going unnoticed or staying
// failed. A failed datapath Apply publishes nothing (the old policy stays
// enforced, whole), but the node then enforces something other than what
// the store says: applyRetry reports that in status and metrics, and asks
// for the apply again, with exponential backoff, until one succeeds.
type applyRetry struct {
	log      *slog.Logger
	failures prometheus.Counter
	lagging  prometheus.Gauge
	// wake tells run that next changed.
	wake chan struct{}

	mu      sync.Mutex
	lastErr string
	since   time.Time // first failure of the current run of failures
	retries int       // retries asked for since then
	backoff time.Duration
	next    time.Time // when the next retry is due; zero: none
}

func newApplyRetry(log *slog.Logger, failures prometheus.Counter, lagging prometheus.Gauge) *applyRetry {
	return &applyRetry{log: log, failures: failures, lagging: lagging, wake: make(chan struct{}, 1)}
}

// failed records a failed apply and schedules the next retry.
func (r *applyRetry) failed(err error) {
	r.mu.Lock()
	now := time.Now()
	if r.since.IsZero() {
		r.since = now
		r.backoff = applyRetryMin
	} else {
		r.backoff = min(2*r.backoff, applyRetryMax)
	}
	r.lastErr = err.Error()
	r.next = now.Add(r.backoff)
	retries, backoff := r.retries, r.backoff
	r.mu.Unlock()
	r.failures.Inc()
	r.lagging.Set(1)
	r.log.Error("policy apply failed; the previous policy stays enforced", "error", err,
		"retries", retries, "retry_in", backoff)
	r.poke()
}

// succeeded records an apply that made the desired state live.
func (r *applyRetry) succeeded() {
	r.mu.Lock()
	was := !r.since.IsZero()
	retries := r.retries
	r.lastErr, r.since, r.retries, r.backoff, r.next = "", time.Time{}, 0, 0, time.Time{}
	r.mu.Unlock()
	r.lagging.Set(0)
	if was {
		r.log.Info("policy apply succeeded after failures", "retries", retries)
		r.poke()
	}
}

func (r *applyRetry) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// run calls retry whenever a retry is due, until ctx ends. retry goes
// through the batcher like any change, so it never races another apply.
func (r *applyRetry) run(ctx context.Context, retry func(context.Context) error) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		r.mu.Lock()
		next := r.next
		r.mu.Unlock()
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
			timer.Stop()
			continue
		case <-timer.C:
		}
		r.mu.Lock()
		due := !r.next.IsZero() && !time.Now().Before(r.next)
		if due {
			r.retries++
			r.next = time.Time{}
		}
		r.mu.Unlock()
		if !due {
			continue
		}
		if err := retry(ctx); err != nil && ctx.Err() == nil {
			// applyBatch has recorded the failure and scheduled the
			// next retry; this is the same error seen by the caller.
			r.log.Debug("policy apply retry", "error", err)
		}
	}
}

// status is what `bulkhead status` shows; nil while the live policy is the
// desired one.
func (r *applyRetry) status() *api.ApplyStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.since.IsZero() {
		return nil
	}
	return &api.ApplyStatus{LastError: r.lastErr, FailingSince: r.since, Retries: r.retries, NextRetry: r.next}
}
