package metrics

import "github.com/prometheus/client_golang/prometheus"

// RuntimeEvents are the system monitor's kernel-side totals.
type RuntimeEvents struct {
	// Sent reached the ring buffer; Lost did not fit in it; Unwatched
	// came from processes in no watched netns and were dropped on purpose.
	Sent, Lost, Unwatched uint64
	// Blocked: operations a cgroup hook denied (Block), counted in the
	// kernel whether or not their event fit in the ring buffer.
	Blocked uint64
}

// RegisterRuntime exports runtime detection's metrics: the kernel's event
// totals, read from events at every scrape, and the returned counter of
// alerts by rule, technique and action, which the caller increments.
func (m *Metrics) RegisterRuntime(events func() (RuntimeEvents, error)) *prometheus.CounterVec {
	alerts := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "runtime_alerts_total", Help: "Runtime detection alerts by rule, ATT&CK technique and action taken.",
	}, []string{"rule", "technique", "action"})
	m.Registry.MustRegister(alerts, &runtimeCollector{events: events})
	return alerts
}

var runtimeEventsDesc = prometheus.NewDesc(namespace+"_runtime_events_total",
	"System monitor events in the kernel, by result: sent (to the ring buffer), lost (the ring buffer was full), unwatched (from a process in no watched netns, dropped on purpose), blocked (operations a cgroup hook denied).",
	[]string{"result"}, nil)

type runtimeCollector struct {
	events func() (RuntimeEvents, error)
}

func (c *runtimeCollector) Describe(ch chan<- *prometheus.Desc) { ch <- runtimeEventsDesc }

func (c *runtimeCollector) Collect(ch chan<- prometheus.Metric) {
	ev, err := c.events()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(runtimeEventsDesc, err)
		return
	}
	for _, r := range []struct {
		result string
		n      uint64
	}{{"sent", ev.Sent}, {"lost", ev.Lost}, {"unwatched", ev.Unwatched}, {"blocked", ev.Blocked}} {
		ch <- prometheus.MustNewConstMetric(runtimeEventsDesc, prometheus.CounterValue, float64(r.n), r.result)
	}
}
