package datapath

import (
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A generation that just went inactive may still be read by a packet that
// loaded the revision before the publish: Apply must not write into it
// until every such packet is done. The programs run inside an RCU
// read-side section (TC runs them with rcu_read_lock, or with bottom halves
// off, which RCU also waits for), so an RCU grace period that starts after
// the publish ends after every program run that saw the old revision, on
// every kernel, preemptible and PREEMPT_RT included. membarrier(2)'s
// MEMBARRIER_CMD_GLOBAL waits for exactly that (synchronize_rcu). A grace
// period takes milliseconds (8 to 75 ms measured here, longer under load),
// so it is started at the publish and runs in the background; the next
// write into the old generation waits for what is left of it.

// membarrierGlobal is MEMBARRIER_CMD_GLOBAL (linux/membarrier.h).
const membarrierGlobal = 1

// rcuGracePeriod waits for an RCU grace period. Tests replace it.
var rcuGracePeriod = func() error {
	_, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierGlobal, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// slotQuiesce is the fallback where membarrier is missing
// (CONFIG_MEMBARRIER off, or a seccomp filter): a program run takes
// microseconds where its CPU is not preempted, which softirq context
// ensures outside PREEMPT_RT.
const slotQuiesce = 2 * time.Millisecond

var membarrierWarn sync.Once

// quiescence is the grace period started at one publish.
type quiescence struct {
	done chan struct{}
	// start is when it was started, for the fallback.
	start time.Time
	err   error
}

// startQuiesce starts the grace period of a publish that just happened.
// d.mu is held.
func (d *Datapath) startQuiesce() {
	q := &quiescence{done: make(chan struct{}), start: time.Now()}
	d.quiesce = q
	go func() {
		q.err = rcuGracePeriod()
		close(q.done)
	}()
}

// waitQuiesce returns once no packet can still judge by the generation
// the last publish made inactive. d.mu is held.
func (d *Datapath) waitQuiesce() {
	q := d.quiesce
	if q == nil {
		return
	}
	<-q.done
	if q.err != nil {
		membarrierWarn.Do(func() {
			d.log.Warn("membarrier(MEMBARRIER_CMD_GLOBAL) failed: waiting a fixed 2 ms for packets still reading an "+
				"old policy generation, which a preempted program (PREEMPT_RT) could outlast", "error", q.err)
		})
		if wait := slotQuiesce - time.Since(q.start); wait > 0 {
			time.Sleep(wait)
		}
	}
	d.quiesce = nil
}
