package detect

import (
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// Aggregator folds repeated identical alerts from one process: the same
// rule, pod, process (PID and comm), arguments and answer. The first
// alert of a run goes out at once, so an escape attempt is reported without
// delay; the repeats within the window that follows are counted and go out
// as one line at its end, with Count and the first and last repeat's time.
// Nothing is dropped: the Counts of the lines add up to the events.
// Safe for concurrent use.
type Aggregator struct {
	window time.Duration
	mu     sync.Mutex
	open   map[string]*aggRun
}

type aggRun struct {
	first       Alert
	repeats     int
	firstRepeat time.Time
	lastRepeat  time.Time
	deadline    time.Time
}

// NewAggregator folds repeats within window of a run's first alert.
func NewAggregator(window time.Duration) *Aggregator {
	return &Aggregator{window: window, open: map[string]*aggRun{}}
}

func aggKey(a Alert) string {
	var b strings.Builder
	for _, s := range []string{a.RuleID, a.Pod.ID, a.Comm, a.Syscall, a.Action, a.ActionResult} {
		b.WriteString(s)
		b.WriteByte(0)
	}
	b.WriteString(string(rune(a.Pod.Netns)))
	b.WriteByte(0)
	b.WriteString(string(rune(a.PID)))
	for _, k := range slices.Sorted(maps.Keys(a.Args)) {
		b.WriteByte(0)
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(a.Args[k])
	}
	return b.String()
}

// Add takes one alert seen at now and returns what to emit now: the alert
// itself when it starts a run, nothing when it is a repeat.
func (g *Aggregator) Add(a Alert, now time.Time) []Alert {
	k := aggKey(a)
	g.mu.Lock()
	defer g.mu.Unlock()
	if r, ok := g.open[k]; ok && now.Before(r.deadline) {
		if r.repeats == 0 {
			r.firstRepeat = a.Time
		}
		r.repeats++
		r.lastRepeat = a.Time
		return nil
	}
	// A run whose window is over but not flushed yet ends here.
	var out []Alert
	if r, ok := g.open[k]; ok {
		out = append(out, r.summary()...)
	}
	a.Count = 1
	g.open[k] = &aggRun{first: a, deadline: now.Add(g.window)}
	return append(out, a)
}

// Flush ends the runs whose window is over at now and returns their
// repeat lines.
func (g *Aggregator) Flush(now time.Time) []Alert {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []Alert
	for k, r := range g.open {
		if !now.Before(r.deadline) {
			out = append(out, r.summary()...)
			delete(g.open, k)
		}
	}
	return out
}

// FlushAll ends every run (at shutdown).
func (g *Aggregator) FlushAll() []Alert {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []Alert
	for k, r := range g.open {
		out = append(out, r.summary()...)
		delete(g.open, k)
	}
	return out
}

// summary is the run's repeat line; none when there was no repeat.
func (r *aggRun) summary() []Alert {
	if r.repeats == 0 {
		return nil
	}
	a := r.first
	a.Count = r.repeats
	first, last := r.firstRepeat, r.lastRepeat
	a.Time, a.FirstTime, a.LastTime = last, &first, &last
	return []Alert{a}
}
