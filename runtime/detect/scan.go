package detect

import (
	"net/netip"
	"time"
)

// ScanDetector sees a pod scan (BH-RT-016) in the datapath's drop events:
// new connections from one endpoint, denied by policy, to at least
// Threshold distinct destinations (address, protocol, port) within Window.
// Denied attempts only: a pod's ordinary traffic is allowed by its policy,
// and a workload that talks to many peers does so through allowed ones,
// while a scan mostly knocks where nothing allows it. Once it fires for an
// endpoint it is quiet for that endpoint until a Window has passed, so a
// long scan is one alert a window, not one per probe. Memory is bounded: at
// most Threshold destinations per endpoint, and endpoints whose last
// attempt is older than Window are dropped. Not safe for concurrent use.
type ScanDetector struct {
	Threshold int
	Window    time.Duration
	eps       map[uint32]*scanState
	sweep     time.Time
}

type scanState struct {
	seen  map[ScanTarget]time.Time
	quiet time.Time // no alert before this
	last  time.Time
}

// ScanTarget is one destination a pod tried.
type ScanTarget struct {
	Addr  netip.Addr
	Proto uint8
	Port  uint16
}

// Scan defaults: 20 distinct denied destinations in 10 s. nmap's default
// top-1000 scan makes that within its first tenth of a second; a pod whose
// policy denies it a handful of peers it retries stays far below.
const (
	DefaultScanThreshold = 20
	DefaultScanWindow    = 10 * time.Second
)

// NewScanDetector uses the defaults for a zero threshold or window.
func NewScanDetector(threshold int, window time.Duration) *ScanDetector {
	if threshold <= 0 {
		threshold = DefaultScanThreshold
	}
	if window <= 0 {
		window = DefaultScanWindow
	}
	return &ScanDetector{Threshold: threshold, Window: window, eps: map[uint32]*scanState{}}
}

// Observe records endpoint ep's denied attempt to t at now and reports
// whether it completes a scan; targets are then the distinct destinations
// of the window, which the endpoint's state forgets.
func (d *ScanDetector) Observe(ep uint32, t ScanTarget, now time.Time) (fired bool, targets []ScanTarget) {
	if now.Sub(d.sweep) > d.Window {
		d.sweep = now
		for id, s := range d.eps {
			if now.Sub(s.last) > d.Window {
				delete(d.eps, id)
			}
		}
	}
	s := d.eps[ep]
	if s == nil {
		s = &scanState{seen: map[ScanTarget]time.Time{}}
		d.eps[ep] = s
	}
	s.last = now
	if now.Before(s.quiet) {
		return false, nil
	}
	s.seen[t] = now
	if len(s.seen) < d.Threshold {
		return false, nil
	}
	for k, at := range s.seen {
		if now.Sub(at) > d.Window {
			delete(s.seen, k)
		}
	}
	if len(s.seen) < d.Threshold {
		return false, nil
	}
	targets = make([]ScanTarget, 0, len(s.seen))
	for k := range s.seen {
		targets = append(targets, k)
	}
	clear(s.seen)
	s.quiet = now.Add(d.Window)
	return true, targets
}

// Forget drops endpoint ep's state (it left).
func (d *ScanDetector) Forget(ep uint32) { delete(d.eps, ep) }
