package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
)

// FormatCompact is one line per flow, for people.
const FormatCompact = "compact"

// ObserveOptions are the flags of `bulkhead observe`.
type ObserveOptions struct {
	Follow bool
	Last   int
	// Since is a duration back from now ("5m") or an RFC 3339 time.
	Since     string
	Namespace []string
	Pod       []string
	FromPod   []string
	ToPod     []string
	Verdict   []string
	Protocol  []string
	Port      []uint16
	SPIFFEID  []string
	// MTLS keeps only flows through the mTLS tunnel.
	MTLS bool
	// FromNow, with Follow, prints only the flows that happen from now on:
	// no recent ones first (Last is ignored). `bulkhead observe --follow`
	// sets it unless --last or --since is given.
	FromNow bool
	// Alerts shows runtime alerts instead of flows, filtered by Namespace,
	// Pod, SPIFFEID, Rule, Severity and Since.
	Alerts   bool
	Rule     []string
	Severity []string
	Output   string
	Color    bool
}

// since parses --since: a duration back from now, or an RFC 3339 time.
func (o *ObserveOptions) since(now time.Time) (time.Time, error) {
	if o.Since == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(o.Since); err == nil {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339, o.Since); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("--since %q: want a duration (5m) or an RFC 3339 time", o.Since)
}

// AlertFilter turns the options into an alert filter, validated. Options
// that only flows have are refused rather than ignored.
func (o *ObserveOptions) AlertFilter(now time.Time) (flows.AlertFilter, error) {
	f := flows.AlertFilter{Namespaces: o.Namespace, Pods: o.Pod, Rules: upper(o.Rule), Severities: o.Severity, SPIFFEIDs: o.SPIFFEID}
	var flowOnly []string
	for name, set := range map[string]bool{
		"--from-pod": len(o.FromPod) > 0, "--to-pod": len(o.ToPod) > 0, "--verdict": len(o.Verdict) > 0,
		"--protocol": len(o.Protocol) > 0, "--port": len(o.Port) > 0, "--mtls": o.MTLS,
	} {
		if set {
			flowOnly = append(flowOnly, name)
		}
	}
	if len(flowOnly) > 0 {
		slices.Sort(flowOnly)
		return f, fmt.Errorf("%s: filter flows, not alerts (--alerts takes --namespace, --pod, --spiffe-id, --rule, --severity, --since)", strings.Join(flowOnly, ", "))
	}
	var err error
	if f.Since, err = o.since(now); err != nil {
		return f, err
	}
	return f, f.Validate()
}

// observeAlerts prints runtime alerts from the agent.
func observeAlerts(ctx context.Context, c *api.Client, w io.Writer, o ObserveOptions) error {
	switch o.Output {
	case "", FormatCompact, FormatJSON:
	default:
		return fmt.Errorf("-o %q: --alerts prints compact or json", o.Output)
	}
	f, err := o.AlertFilter(time.Now())
	if err != nil {
		return err
	}
	raw, err := json.Marshal(f)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	req := api.AlertObserveRequest{Last: o.Last, Follow: o.Follow, Filter: raw}
	if o.Follow && o.FromNow {
		req.Last = -1 // only alerts raised from now on
	}
	err = c.ObserveAlerts(ctx, req, func(line []byte) error {
		if o.Output == FormatJSON {
			bw.Write(line)
			bw.WriteByte('\n')
			return flushIf(bw, o.Follow)
		}
		var it flows.AlertItem
		if err := json.Unmarshal(line, &it); err != nil {
			return fmt.Errorf("decode alert: %w", err)
		}
		switch {
		case it.Lost != nil:
			fmt.Fprintf(bw, "ALERTS LOST: %d alerts lost (%s) here\n", it.Lost.NumEventsLost, it.Lost.Source)
		case it.Alert != nil:
			fmt.Fprintln(bw, flows.CompactAlert(it.Alert, o.Color))
		}
		return flushIf(bw, o.Follow)
	})
	if err != nil {
		return AgentError(c, err)
	}
	return nil
}

// Filter turns the options into a flow filter, validated.
func (o *ObserveOptions) Filter(now time.Time) (flows.Filter, error) {
	f := flows.Filter{
		Verdicts: upper(o.Verdict), Namespaces: o.Namespace, Pods: o.Pod, FromPods: o.FromPod, ToPods: o.ToPod,
		Protocols: o.Protocol, Ports: o.Port, SPIFFEIDs: o.SPIFFEID,
		MTLS: o.MTLS,
	}
	var err error
	if f.Since, err = o.since(now); err != nil {
		return f, err
	}
	return f, f.Validate()
}

func upper(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToUpper(s)
	}
	return out
}

// Observe prints flows from the agent, or with Alerts its runtime alerts.
func Observe(ctx context.Context, c *api.Client, w io.Writer, o ObserveOptions) error {
	if o.Alerts {
		return observeAlerts(ctx, c, w, o)
	}
	if len(o.Rule) > 0 || len(o.Severity) > 0 {
		return fmt.Errorf("--rule and --severity filter runtime alerts: add --alerts")
	}
	switch o.Output {
	case "", FormatCompact, FormatTable, FormatJSON:
	default:
		return fmt.Errorf("-o %q: want table, compact or json", o.Output)
	}
	f, err := o.Filter(time.Now())
	if err != nil {
		return err
	}
	sel, err := json.Marshal(flows.Selector{Allow: []flows.Filter{f}})
	if err != nil {
		return err
	}
	req := api.ObserveRequest{Last: o.Last, Follow: o.Follow, Selector: sel}
	if o.Follow && o.FromNow {
		req.Last = -1 // the agent sends no recent flows, only new ones
	}
	bw := bufio.NewWriter(w)
	defer bw.Flush()
	var table []*flows.Flow
	err = c.ObserveFlows(ctx, req, func(line []byte) error {
		if o.Output == FormatJSON {
			bw.Write(line)
			bw.WriteByte('\n')
			return flushIf(bw, o.Follow)
		}
		var it flows.Item
		if err := json.Unmarshal(line, &it); err != nil {
			return fmt.Errorf("decode flow: %w", err)
		}
		switch {
		case it.Lost != nil:
			fmt.Fprintf(bw, "EVENTS LOST: %d flow events lost (%s) here\n", it.Lost.NumEventsLost, it.Lost.Source)
		case it.Flow != nil && o.Output == FormatTable && !o.Follow:
			table = append(table, it.Flow)
		case it.Flow != nil:
			fmt.Fprintln(bw, flows.Compact(it.Flow, o.Color))
		}
		return flushIf(bw, o.Follow)
	})
	if err != nil {
		return AgentError(c, err)
	}
	if len(table) > 0 {
		return flows.WriteTable(bw, table, o.Color)
	}
	return nil
}

func flushIf(bw *bufio.Writer, follow bool) error {
	if follow {
		return bw.Flush()
	}
	return nil
}
