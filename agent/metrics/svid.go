package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// SVIDStat is what the identity source reports at each scrape.
type SVIDStat struct {
	Source string
	// Held counts distinct SVIDs (one per SPIFFE ID), Pods the local pods
	// holding one, Followed the local pods followed.
	Held, Pods, Followed int
	// EarliestExpiry is zero when none is held.
	EarliestExpiry time.Time
	Rotations      uint64
	Connected      bool
}

var (
	svidHeldDesc = prometheus.NewDesc(namespace+"_svids_held", "Distinct X.509-SVIDs the agent holds for local pods (one per SPIFFE ID).", []string{"source"}, nil)
	svidPodsDesc = prometheus.NewDesc(namespace+"_svid_pods", "Local pods by whether they hold an SVID.", []string{"source", "state"}, nil)
	svidExpDesc  = prometheus.NewDesc(namespace+"_svid_earliest_expiry_seconds", "Seconds until the earliest held SVID expires (absent when none is held).", []string{"source"}, nil)
	svidRotDesc  = prometheus.NewDesc(namespace+"_svid_rotations_total", "SVIDs replaced by a newer one for the same SPIFFE ID.", []string{"source"}, nil)
	svidUpDesc   = prometheus.NewDesc(namespace+"_identity_source_connected", "1 while the SVID source (SPIRE agent) can be reached.", []string{"source"}, nil)
)

type svidCollector struct{ stat func() SVIDStat }

// RegisterSVIDs exports the SVID source's numbers, read at every scrape.
func (m *Metrics) RegisterSVIDs(stat func() SVIDStat) {
	m.Registry.MustRegister(&svidCollector{stat: stat})
}

func (c *svidCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{svidHeldDesc, svidPodsDesc, svidExpDesc, svidRotDesc, svidUpDesc} {
		ch <- d
	}
}

func (c *svidCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stat()
	ch <- prometheus.MustNewConstMetric(svidHeldDesc, prometheus.GaugeValue, float64(s.Held), s.Source)
	ch <- prometheus.MustNewConstMetric(svidPodsDesc, prometheus.GaugeValue, float64(s.Pods), s.Source, "svid")
	ch <- prometheus.MustNewConstMetric(svidPodsDesc, prometheus.GaugeValue, float64(s.Followed-s.Pods), s.Source, "no-svid")
	if !s.EarliestExpiry.IsZero() {
		ch <- prometheus.MustNewConstMetric(svidExpDesc, prometheus.GaugeValue, time.Until(s.EarliestExpiry).Seconds(), s.Source)
	}
	ch <- prometheus.MustNewConstMetric(svidRotDesc, prometheus.CounterValue, float64(s.Rotations), s.Source)
	up := 0.0
	if s.Connected {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(svidUpDesc, prometheus.GaugeValue, up, s.Source)
}
