package flows

import (
	"fmt"
	"path"
	"slices"
	"strings"
	"time"
)

// Filter matches flows. Every field that is set must match (AND); an empty
// Filter matches everything. Lists within a field are alternatives (OR).
// Pod and namespace fields match either side of the flow, From*/To* only
// the source or the destination, as `hubble observe` does.
type Filter struct {
	Verdicts   []string `json:"verdicts,omitempty"`
	Namespaces []string `json:"namespaces,omitempty"`
	// Pods are "namespace/name", or "name" for any namespace.
	Pods     []string `json:"pods,omitempty"`
	FromPods []string `json:"from_pods,omitempty"`
	ToPods   []string `json:"to_pods,omitempty"`
	// SPIFFEIDs are globs whose "*" matches within one path segment:
	// "spiffe://cluster.local/ns/shop/sa/*".
	SPIFFEIDs []string `json:"spiffe_ids,omitempty"`
	// Protocols are "TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6" (any case).
	Protocols []string `json:"protocols,omitempty"`
	// Ports match the source or the destination port.
	Ports []uint16 `json:"ports,omitempty"`
	// MTLS keeps only flows that travel through the mTLS tunnel.
	MTLS  bool      `json:"mtls,omitempty"`
	Since time.Time `json:"since,omitzero"`
}

// Validate rejects globs that path.Match cannot use, so that a bad filter
// fails when it is given instead of never matching.
func (f *Filter) Validate() error {
	for _, g := range f.SPIFFEIDs {
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("spiffe id glob %q: %w", g, err)
		}
	}
	for _, v := range f.Verdicts {
		switch strings.ToUpper(v) {
		case VerdictForwarded, VerdictDropped, VerdictAudit:
		default:
			return fmt.Errorf("unknown verdict %q (want FORWARDED, DROPPED or AUDIT)", v)
		}
	}
	for _, p := range f.Protocols {
		if _, known := hasProtocol(&Layer4{}, p); !known {
			return fmt.Errorf("unknown protocol %q (want TCP, UDP, SCTP, ICMPv4 or ICMPv6)", p)
		}
	}
	return nil
}

// Match reports whether fl passes the filter.
func (f *Filter) Match(fl *Flow) bool {
	if !f.Since.IsZero() && fl.Time.Before(f.Since) {
		return false
	}
	if len(f.Verdicts) > 0 && !slices.ContainsFunc(f.Verdicts, func(v string) bool { return strings.EqualFold(v, fl.Verdict) }) {
		return false
	}
	if len(f.Namespaces) > 0 && !slices.ContainsFunc(f.Namespaces, func(ns string) bool {
		return (fl.Source != nil && fl.Source.Namespace == ns) || (fl.Destination != nil && fl.Destination.Namespace == ns)
	}) {
		return false
	}
	if len(f.Pods) > 0 && !matchPod(f.Pods, fl.Source) && !matchPod(f.Pods, fl.Destination) {
		return false
	}
	if len(f.FromPods) > 0 && !matchPod(f.FromPods, fl.Source) {
		return false
	}
	if len(f.ToPods) > 0 && !matchPod(f.ToPods, fl.Destination) {
		return false
	}
	if len(f.SPIFFEIDs) > 0 && !matchSPIFFE(f.SPIFFEIDs, fl.Source) && !matchSPIFFE(f.SPIFFEIDs, fl.Destination) {
		return false
	}
	if len(f.Protocols) > 0 && (fl.L4 == nil || !slices.ContainsFunc(f.Protocols, func(p string) bool { has, _ := hasProtocol(fl.L4, p); return has })) {
		return false
	}
	if f.MTLS && !fl.MTLS {
		return false
	}
	if len(f.Ports) > 0 {
		src, dst, ok := fl.L4.ports()
		if !ok || (!slices.Contains(f.Ports, src) && !slices.Contains(f.Ports, dst)) {
			return false
		}
	}
	return true
}

func matchPod(pods []string, e *Endpoint) bool {
	if e == nil || e.PodName == "" {
		return false
	}
	for _, p := range pods {
		ns, name, qualified := strings.Cut(p, "/")
		if qualified && ns == e.Namespace && name == e.PodName || !qualified && p == e.PodName {
			return true
		}
	}
	return false
}

func matchSPIFFE(globs []string, e *Endpoint) bool {
	if e == nil || e.SPIFFEID == "" {
		return false
	}
	for _, g := range globs {
		if ok, _ := path.Match(g, e.SPIFFEID); ok {
			return true
		}
	}
	return false
}

// hasProtocol reports whether l carries the protocol called name, and
// whether name is a protocol at all.
func hasProtocol(l *Layer4, name string) (has, known bool) {
	switch strings.ToUpper(name) {
	case "TCP":
		return l.TCP != nil, true
	case "UDP":
		return l.UDP != nil, true
	case "SCTP":
		return l.SCTP != nil, true
	case "ICMPV4", "ICMP":
		return l.ICMPv4 != nil, true
	case "ICMPV6":
		return l.ICMPv6 != nil, true
	}
	return false, false
}

func (l *Layer4) ports() (src, dst uint16, ok bool) {
	switch {
	case l == nil:
	case l.TCP != nil:
		return l.TCP.SourcePort, l.TCP.DestinationPort, true
	case l.UDP != nil:
		return l.UDP.SourcePort, l.UDP.DestinationPort, true
	case l.SCTP != nil:
		return l.SCTP.SourcePort, l.SCTP.DestinationPort, true
	}
	return 0, 0, false
}

// Selector is an allow list and a deny list of filters, as Hubble's
// exporter has: a flow passes when it matches any allow filter (or there are
// none) and no deny filter.
type Selector struct {
	Allow []Filter `json:"allow,omitempty"`
	Deny  []Filter `json:"deny,omitempty"`
}

// Validate checks every filter.
func (s *Selector) Validate() error {
	for i := range s.Allow {
		if err := s.Allow[i].Validate(); err != nil {
			return fmt.Errorf("allow filter %d: %w", i, err)
		}
	}
	for i := range s.Deny {
		if err := s.Deny[i].Validate(); err != nil {
			return fmt.Errorf("deny filter %d: %w", i, err)
		}
	}
	return nil
}

// Match reports whether fl passes the selector.
func (s *Selector) Match(fl *Flow) bool {
	for i := range s.Deny {
		if s.Deny[i].Match(fl) {
			return false
		}
	}
	if len(s.Allow) == 0 {
		return true
	}
	for i := range s.Allow {
		if s.Allow[i].Match(fl) {
			return true
		}
	}
	return false
}
