package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
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
	MTLS   bool
	Output string
	Color  bool
}

// Filter turns the options into a flow filter, validated.
func (o *ObserveOptions) Filter(now time.Time) (flows.Filter, error) {
	f := flows.Filter{
		Verdicts: upper(o.Verdict), Namespaces: o.Namespace, Pods: o.Pod, FromPods: o.FromPod, ToPods: o.ToPod,
		Protocols: o.Protocol, Ports: o.Port, SPIFFEIDs: o.SPIFFEID,
		MTLS: o.MTLS,
	}
	if o.Since != "" {
		if d, err := time.ParseDuration(o.Since); err == nil {
			f.Since = now.Add(-d)
		} else if t, err := time.Parse(time.RFC3339, o.Since); err == nil {
			f.Since = t
		} else {
			return f, fmt.Errorf("--since %q: want a duration (5m) or an RFC 3339 time", o.Since)
		}
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

// Observe prints flows from the agent.
func Observe(ctx context.Context, c *api.Client, w io.Writer, o ObserveOptions) error {
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
