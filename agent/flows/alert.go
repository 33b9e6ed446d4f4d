package flows

import (
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// AlertItem is one element of an alert stream: a runtime alert, or a
// marker that says how many alerts a slow follower lost at this point.
type AlertItem struct {
	Alert *detect.Alert `json:"alert,omitempty"`
	Lost  *LostEvents   `json:"lost_events,omitempty"`
}

// AlertFilter matches runtime alerts, with the conventions of Filter: every
// field that is set must match (AND), the values of one field are
// alternatives (OR), and an empty AlertFilter matches every alert.
type AlertFilter struct {
	Namespaces []string `json:"namespaces,omitempty"`
	// Pods are "namespace/name", or "name" for any namespace.
	Pods []string `json:"pods,omitempty"`
	// Rules are rule IDs (BH-RT-002), any case.
	Rules []string `json:"rules,omitempty"`
	// Severities are "medium", "high" or "critical", any case.
	Severities []string `json:"severities,omitempty"`
	// SPIFFEIDs are globs of the pod's SPIFFE ID, as in Filter.
	SPIFFEIDs []string `json:"spiffe_ids,omitempty"`
	// Since keeps alerts whose last event is at or after it.
	Since time.Time `json:"since,omitzero"`
}

// Validate rejects what could never match: an unknown rule or severity, or
// a glob path.Match cannot use.
func (f *AlertFilter) Validate() error {
	for _, r := range f.Rules {
		if !slices.ContainsFunc(detect.Rules(), func(rule detect.Rule) bool { return strings.EqualFold(rule.ID, r) }) {
			return fmt.Errorf("unknown rule %q (want BH-RT-001 to BH-RT-%03d)", r, len(detect.Rules()))
		}
	}
	for _, s := range f.Severities {
		switch detect.Severity(strings.ToLower(s)) {
		case detect.SeverityMedium, detect.SeverityHigh, detect.SeverityCritical:
		default:
			return fmt.Errorf("unknown severity %q (want medium, high or critical)", s)
		}
	}
	for _, g := range f.SPIFFEIDs {
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("spiffe id glob %q: %w", g, err)
		}
	}
	return nil
}

// Match reports whether al passes the filter.
func (f *AlertFilter) Match(al *detect.Alert) bool {
	if !f.Since.IsZero() {
		last := al.Time
		if al.LastTime != nil {
			last = *al.LastTime
		}
		if last.Before(f.Since) {
			return false
		}
	}
	if len(f.Namespaces) > 0 && !slices.Contains(f.Namespaces, al.Pod.Namespace) {
		return false
	}
	if len(f.Pods) > 0 && !matchPod(f.Pods, &Endpoint{Namespace: al.Pod.Namespace, PodName: al.Pod.Pod}) {
		return false
	}
	if len(f.Rules) > 0 && !slices.ContainsFunc(f.Rules, func(r string) bool { return strings.EqualFold(r, al.RuleID) }) {
		return false
	}
	if len(f.Severities) > 0 && !slices.ContainsFunc(f.Severities, func(s string) bool { return strings.EqualFold(s, string(al.Severity)) }) {
		return false
	}
	if len(f.SPIFFEIDs) > 0 && !matchSPIFFE(f.SPIFFEIDs, &Endpoint{SPIFFEID: al.Pod.SPIFFEID}) {
		return false
	}
	return true
}

// AlertHub keeps the most recent alerts and fans new ones out to
// followers, as Hub does for flows: a follower that cannot keep up loses
// alerts (counted, and marked in its stream), never slows the runtime
// service.
type AlertHub struct {
	ring[*detect.Alert, AlertItem]
}

// AlertSubscription is one follower of an AlertHub.
type AlertSubscription = follower[*detect.Alert, AlertItem]

// NewAlertHub keeps up to capacity recent alerts (at least 1).
func NewAlertHub(capacity int, nodeName string) *AlertHub {
	return &AlertHub{newRing(capacity, nodeName, func(al *detect.Alert) AlertItem { return AlertItem{Alert: al} },
		func(l *LostEvents) AlertItem { return AlertItem{Lost: l} })}
}

// Last returns up to n of the most recent alerts that pass f, oldest first:
// n == 0 means all that are kept, n < 0 none.
func (h *AlertHub) Last(n int, f *AlertFilter) []*detect.Alert {
	if f == nil {
		return h.last(n, nil)
	}
	return h.last(n, f.Match)
}

// Subscribe returns the last n alerts passing f and a follower that gets
// every later one, with nothing falling between the two.
func (h *AlertHub) Subscribe(n int, f AlertFilter, buffer int) ([]*detect.Alert, *AlertSubscription) {
	return h.subscribe(n, f.Match, buffer)
}

// CompactAlert is one line per alert, for people:
// "05:12:03.101 shop/web BH-RT-002 high unshare of a user or mount
// namespace (T1611) unshare flags=CLONE_NEWUSER pid 4242 comm unshare
// alert".
func CompactAlert(al *detect.Alert, color bool) string {
	var b strings.Builder
	b.WriteString(al.Time.Local().Format("15:04:05.000"))
	b.WriteByte(' ')
	if al.Pod.Pod != "" {
		b.WriteString(al.Pod.Namespace + "/" + al.Pod.Pod)
	} else {
		b.WriteString("netns:" + fmt.Sprint(al.Pod.Netns))
	}
	sev := string(al.Severity)
	if color && (al.Severity == detect.SeverityCritical || al.Severity == detect.SeverityHigh) {
		sev = "\x1b[31m" + sev + "\x1b[0m"
	}
	fmt.Fprintf(&b, " %s %s %s (%s) %s", al.RuleID, sev, al.Rule, al.Technique, al.Syscall)
	for _, k := range slices.Sorted(maps.Keys(al.Args)) {
		fmt.Fprintf(&b, " %s=%s", k, al.Args[k])
	}
	fmt.Fprintf(&b, " pid %d comm %s", al.PID, al.Comm)
	if al.Process != nil && al.Process.Exe != "" {
		b.WriteString(" exe " + al.Process.Exe)
	}
	b.WriteString(" " + al.Action)
	if al.ActionResult != "" {
		b.WriteString(" (" + al.ActionResult + ")")
	}
	if al.Count > 1 {
		fmt.Fprintf(&b, " x%d", al.Count)
		if al.FirstTime != nil && al.LastTime != nil {
			fmt.Fprintf(&b, " %s to %s", al.FirstTime.Local().Format("15:04:05.000"), al.LastTime.Local().Format("15:04:05.000"))
		}
	}
	return b.String()
}
