package datapath

import (
	"errors"
	"log/slog"
	"testing"
	"time"
)

// The next write into a generation waits for the grace period the publish
// started, however long it takes.
func TestWaitQuiesceWaitsForTheGracePeriod(t *testing.T) {
	release := make(chan struct{})
	saved := rcuGracePeriod
	t.Cleanup(func() { rcuGracePeriod = saved })
	rcuGracePeriod = func() error { <-release; return nil }

	d := &Datapath{log: slog.New(slog.DiscardHandler)}
	d.startQuiesce()
	waited := make(chan struct{})
	go func() { d.waitQuiesce(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("waitQuiesce returned before the grace period ended")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	<-waited
	if d.quiesce != nil {
		t.Fatal("the grace period is still pending after the wait")
	}
	d.waitQuiesce() // nothing pending: returns at once
}

// errNoMembarrier stands for a kernel without membarrier.
var errNoMembarrier = errors.New("membarrier: not supported")

// Without membarrier the wait falls back to the fixed interval after the
// publish.
func TestWaitQuiesceFallback(t *testing.T) {
	saved := rcuGracePeriod
	t.Cleanup(func() { rcuGracePeriod = saved })
	rcuGracePeriod = func() error { return errNoMembarrier }
	d := &Datapath{log: slog.New(slog.DiscardHandler)}
	d.startQuiesce()
	start := d.quiesce.start
	d.waitQuiesce()
	if since := time.Since(start); since < slotQuiesce {
		t.Fatalf("fallback waited %s after the publish, want at least %s", since, slotQuiesce)
	}
}

// This kernel has membarrier's RCU grace period.
func TestMembarrierGlobal(t *testing.T) {
	start := time.Now()
	if err := rcuGracePeriod(); err != nil {
		t.Fatalf("membarrier(MEMBARRIER_CMD_GLOBAL): %v", err)
	}
	t.Logf("one grace period: %s", time.Since(start))
}
