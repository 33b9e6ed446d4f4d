// Package metrics owns the agent's Prometheus metrics. They live in their
// own registry (no global state), served at --metrics-addr.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "bulkhead"

// Metrics are the agent's instruments. Counters and histograms are updated
// where things happen; gauges that mirror kernel state (map fill) are read
// at scrape time through MapStats.
type Metrics struct {
	Registry *prometheus.Registry

	// Flows by verdict (FORWARDED, DROPPED, AUDIT) and direction.
	Flows *prometheus.CounterVec
	// Drops by drop_reason_desc.
	Drops *prometheus.CounterVec
	// PolicyVerdicts by deciding policy (kind, namespace, name) and verdict.
	PolicyVerdicts *prometheus.CounterVec
	// LostEvents by where they were lost: "kernel" or "userspace".
	LostEvents     *prometheus.CounterVec
	Endpoints      prometheus.Gauge
	PolicyRevision prometheus.Gauge
	CompileSeconds prometheus.Histogram
	ApplySeconds   prometheus.Histogram
	CNIAddSeconds  prometheus.Histogram
	// PolicyApplyFailures counts failed datapath applies; PolicyApplyLagging
	// is 1 while the live policy is older than the compiled one.
	PolicyApplyFailures prometheus.Counter
	PolicyApplyLagging  prometheus.Gauge
	// StoreHeld is 1 while a store state that removes too much at once is
	// held back; StoreHolds counts such holds.
	StoreHeld  prometheus.Gauge
	StoreHolds prometheus.Counter
	// PolicyOverBudget is 1 for each policy rejected for its trie budget,
	// by kind, namespace, policy, reason ("policy" or "endpoint") and
	// fallback ("previous-version" or "isolation").
	PolicyOverBudget *prometheus.GaugeVec
	// QuarantinesActive is how many endpoints are quarantined.
	QuarantinesActive prometheus.Gauge
}

// MapStat is how full one BPF map is.
type MapStat struct {
	Name       string
	Entries    int
	MaxEntries int
}

// New creates the metrics. mapStats, when not nil, is called at every
// scrape for the fill level of the datapath's maps.
func New(mapStats func() []MapStat) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		Flows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "flows_total", Help: "Flow events by verdict and traffic direction.",
		}, []string{"verdict", "direction"}),
		Drops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "drops_total", Help: "Dropped flows by drop reason.",
		}, []string{"reason"}),
		PolicyVerdicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "policy_verdicts_total", Help: "Flow verdicts by the policy that decided them.",
		}, []string{"kind", "namespace", "policy", "verdict"}),
		LostEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "lost_events_total", Help: "Flow events lost, by where: kernel (ring buffer full) or userspace.",
		}, []string{"source"}),
		Endpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "endpoints", Help: "Endpoints managed on this node.",
		}),
		PolicyRevision: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "policy_revision", Help: "Policy revision live in the datapath.",
		}),
		CompileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "policy_compile_seconds", Help: "Time to compile policy into a MapState.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		ApplySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "policy_apply_seconds", Help: "Time to apply a MapState difference to the datapath.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		QuarantinesActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "quarantined_endpoints",
			Help: "Endpoints whose traffic is cut by a quarantine (all but DNS to the listed resolvers).",
		}),
		CNIAddSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "cni_add_seconds", Help: "Time the agent took to serve a CNI ADD, until enforcement was live.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 12),
		}),
		PolicyApplyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "policy_apply_failures_total",
			Help: "Policy applies to the datapath that failed; the previous policy stayed enforced.",
		}),
		PolicyApplyLagging: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "policy_apply_lagging",
			Help: "1 while the datapath enforces an older policy than the compiled one, because applying failed.",
		}),
		StoreHeld: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "store_held", Help: "1 while a store state that removes every policy or most objects at once is held back for its grace period.",
		}),
		StoreHolds: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "store_holds_total", Help: "Store states held back because they removed every policy or most objects at once.",
		}),
		PolicyOverBudget: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "policy_over_budget", Help: "Policies rejected for their policy-trie budget (1 each), by what is enforced instead.",
		}, []string{"kind", "namespace", "policy", "reason", "fallback"}),
	}
	m.LostEvents.WithLabelValues("kernel")
	m.LostEvents.WithLabelValues("userspace")
	reg.MustRegister(m.Flows, m.Drops, m.PolicyVerdicts, m.LostEvents, m.Endpoints, m.PolicyRevision,
		m.CompileSeconds, m.ApplySeconds, m.CNIAddSeconds, m.PolicyApplyFailures, m.PolicyApplyLagging,
		m.StoreHeld, m.StoreHolds, m.PolicyOverBudget, m.QuarantinesActive,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if mapStats != nil {
		reg.MustRegister(&mapCollector{stats: mapStats})
	}
	return m
}

// StoreConnectedFunc registers bulkhead_store_connected, read from
// connected at every scrape. Only a store that can lose its connection
// (kubernetes) has it.
func (m *Metrics) StoreConnectedFunc(connected func() bool) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "store_connected",
		Help: "1 while the store's apiserver is reachable; while it is not, the last state stays enforced.",
	}, func() float64 {
		if connected() {
			return 1
		}
		return 0
	}))
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

var (
	mapEntriesDesc = prometheus.NewDesc(namespace+"_map_entries", "Entries in a BPF map.", []string{"map"}, nil)
	mapMaxDesc     = prometheus.NewDesc(namespace+"_map_max_entries", "Capacity of a BPF map.", []string{"map"}, nil)
)

type mapCollector struct{ stats func() []MapStat }

func (c *mapCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- mapEntriesDesc
	ch <- mapMaxDesc
}

func (c *mapCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.stats() {
		ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(s.Entries), s.Name)
		ch <- prometheus.MustNewConstMetric(mapMaxDesc, prometheus.GaugeValue, float64(s.MaxEntries), s.Name)
	}
}

// AdoptionFuncs registers bulkhead_pods_adopted_total and
// bulkhead_pods_unadopted, read at every scrape.
func (m *Metrics) AdoptionFuncs(adopted, unadopted func() int) {
	m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Name: "pods_adopted_total",
		Help: "Running pods that no CNI ADD registered and that the agent found and now enforces on.",
	}, func() float64 { return float64(adopted()) }))
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "pods_unadopted",
		Help: "Running pods of this node that no endpoint enforces and whose sandbox the agent could not find (see bulkhead status).",
	}, func() float64 { return float64(unadopted()) }))
}
