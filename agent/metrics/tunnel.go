package metrics

import "github.com/prometheus/client_golang/prometheus"

// TunnelStat is what the mTLS tunnel endpoint reports at each scrape.
type TunnelStat struct {
	Forwarded, Refused, RejectedByPeer, DialFailures, HandshakeFailures uint64
	InboundAccepted, PoolDials, PoolReuses, Admitted, Denied            uint64
	NotFromNode, HandshakesShed                                         uint64
	BytesOut, BytesIn                                                   uint64
	PoolConns, InboundConns                                             int
	ActiveOutbound, ActiveInbound                                       int64
}

var (
	tunConnsDesc  = prometheus.NewDesc(namespace+"_tunnel_connections_total", "Pod connections the mTLS tunnel handled, by side and result.", []string{"side", "result"}, nil)
	tunTLSDesc    = prometheus.NewDesc(namespace+"_tunnel_tls_connections_total", "TLS connections between tunnel endpoints, by direction and result.", []string{"direction", "result"}, nil)
	tunStreamDesc = prometheus.NewDesc(namespace+"_tunnel_pool_reuses_total", "Tunnelled connections carried by an already open (pooled) TLS connection: no handshake.", nil, nil)
	tunOpenDesc   = prometheus.NewDesc(namespace+"_tunnel_open", "Open tunnel connections: TLS connections by direction, pod connections by side.", []string{"kind", "direction"}, nil)
	tunBytesDesc  = prometheus.NewDesc(namespace+"_tunnel_bytes_total", "Bytes of local pods' tunnelled connections (source side), into and out of the tunnel.", []string{"direction"}, nil)
)

type tunnelCollector struct{ stat func() TunnelStat }

// RegisterTunnel exports the tunnel endpoint's counters, read at every scrape.
func (m *Metrics) RegisterTunnel(stat func() TunnelStat) {
	m.Registry.MustRegister(&tunnelCollector{stat: stat})
}

func (c *tunnelCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{tunConnsDesc, tunTLSDesc, tunStreamDesc, tunOpenDesc, tunBytesDesc} {
		ch <- d
	}
}

func (c *tunnelCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stat()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(tunOpenDesc, prometheus.GaugeValue, v, labels...)
	}
	counter(tunConnsDesc, s.Forwarded, "source", "forwarded")
	counter(tunConnsDesc, s.Refused, "source", "refused")
	counter(tunConnsDesc, s.RejectedByPeer, "source", "rejected_by_peer")
	counter(tunConnsDesc, s.Admitted, "destination", "admitted")
	counter(tunConnsDesc, s.Denied, "destination", "denied")
	counter(tunTLSDesc, s.PoolDials, "outbound", "opened")
	counter(tunTLSDesc, s.DialFailures, "outbound", "failed")
	counter(tunTLSDesc, s.InboundAccepted, "inbound", "accepted")
	counter(tunTLSDesc, s.HandshakeFailures, "inbound", "failed")
	counter(tunTLSDesc, s.NotFromNode, "inbound", "not_from_a_node")
	counter(tunTLSDesc, s.HandshakesShed, "inbound", "shed")
	counter(tunStreamDesc, s.PoolReuses)
	gauge(float64(s.PoolConns), "tls", "outbound")
	gauge(float64(s.InboundConns), "tls", "inbound")
	gauge(float64(s.ActiveOutbound), "pod", "outbound")
	gauge(float64(s.ActiveInbound), "pod", "inbound")
	counter(tunBytesDesc, s.BytesOut, "out")
	counter(tunBytesDesc, s.BytesIn, "in")
}
