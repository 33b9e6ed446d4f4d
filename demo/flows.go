package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
)

// fetchFlows returns the agent's flow records since a time, from its flow
// stream (what `bulkhead observe` reads).
func fetchFlows(ctx context.Context, c *api.Client, since time.Time) ([]*flows.Flow, error) {
	sel, err := json.Marshal(flows.Selector{Allow: []flows.Filter{{Since: since}}})
	if err != nil {
		return nil, err
	}
	var out []*flows.Flow
	err = c.ObserveFlows(ctx, api.ObserveRequest{Selector: sel}, func(line []byte) error {
		var it flows.Item
		if err := json.Unmarshal(line, &it); err != nil {
			return fmt.Errorf("decode flow: %w", err)
		}
		if it.Flow != nil {
			out = append(out, it.Flow)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("observe flows: %w", err)
	}
	return out, nil
}

// cellOf says which probe a record belongs to; ok is false for replies and
// for records that are not between two pods.
func cellOf(f *flows.Flow) (Cell, bool) {
	if f.IsReply || f.Source == nil || f.Destination == nil || f.Source.PodName == "" || f.Destination.PodName == "" || f.L4 == nil {
		return Cell{}, false
	}
	c := Cell{From: f.Source.Namespace + "/" + f.Source.PodName, To: f.Destination.Namespace + "/" + f.Destination.PodName}
	switch {
	case f.L4.TCP != nil:
		c.Port = Port{f.L4.TCP.DestinationPort, "TCP"}
	case f.L4.UDP != nil:
		c.Port = Port{f.L4.UDP.DestinationPort, "UDP"}
	default:
		return Cell{}, false
	}
	return c, true
}

// flowIndex holds each cell's records, in the order the agent sent them.
type flowIndex map[Cell][]*flows.Flow

func indexFlows(fs []*flows.Flow) flowIndex {
	idx := flowIndex{}
	for _, f := range fs {
		if c, ok := cellOf(f); ok {
			idx[c] = append(idx[c], f)
		}
	}
	return idx
}

func (idx flowIndex) has(c Cell, verdict string) bool {
	for _, f := range idx[c] {
		if f.Verdict == verdict {
			return true
		}
	}
	return false
}

// deciding picks the record that explains a cell's outcome: one with the
// outcome's verdict, preferring one that names a policy rule over the
// direction a policy does not select ("default" allow).
func (idx flowIndex) deciding(c Cell, o Outcome) *flows.Flow {
	verdict := flows.VerdictForwarded
	switch o {
	case Denied:
		verdict = flows.VerdictDropped
	case Audited:
		verdict = flows.VerdictAudit
	}
	var best *flows.Flow
	for _, f := range idx[c] {
		if f.Verdict != verdict {
			continue
		}
		p := f.DecidingPolicy()
		if p != nil && p.Kind != "default" {
			return f
		}
		if best == nil || (p != nil && p.Name != "" && best.DecidingPolicy() == nil) {
			best = f
		}
	}
	return best
}

// deciderText says which rule decided a record, in a few words:
// "ingress of shop/db: default deny" or "ingress: BulkheadPolicy shop/api
// rule ingress[0]".
func deciderText(f *flows.Flow) string {
	for _, ps := range [][]*flows.Policy{f.IngressDeniedBy, f.EgressDeniedBy, f.IngressAllowedBy, f.EgressAllowedBy} {
		for _, p := range ps {
			if p.Kind == "default" {
				continue
			}
			return p.String()
		}
	}
	if p := f.DecidingPolicy(); p != nil {
		dir, at := "ingress", f.Destination
		if len(f.EgressDeniedBy) > 0 && len(f.IngressDeniedBy) == 0 {
			dir, at = "egress", f.Source
		}
		who := ""
		if at != nil && at.PodName != "" {
			who = " of " + at.Namespace + "/" + at.PodName
		}
		switch f.Verdict {
		case flows.VerdictDropped:
			return "default deny at the " + dir + who + " (a policy selects it)"
		case flows.VerdictAudit:
			return "audit-mode default deny at the " + dir + who
		}
		return "no policy selects it (" + p.Name + ")"
	}
	return "no rule named in the record"
}
