package agent

import (
	"context"
	"encoding/json"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
)

// followBuffer is how far a follower may lag before it loses flows (and
// gets a lost_events marker instead).
const followBuffer = 4096

var _ api.FlowStreamer = (*Agent)(nil)

// ObserveFlows streams recent flows, then new ones while req.Follow.
func (a *Agent) ObserveFlows(ctx context.Context, req api.ObserveRequest, write func([]byte) error) error {
	var sel flows.Selector
	if len(req.Selector) > 0 {
		if err := json.Unmarshal(req.Selector, &sel); err != nil {
			return api.Errorf(api.CodeInvalidRequest, "selector: %w", err)
		}
	}
	if err := sel.Validate(); err != nil {
		return api.Errorf(api.CodeInvalidRequest, "selector: %w", err)
	}
	var buf []byte
	emit := func(it flows.Item) error {
		buf = it.AppendJSON(buf[:0])
		return write(buf)
	}
	if !req.Follow {
		for _, f := range a.hub.Last(req.Last, &sel) {
			if err := emit(flows.Item{Flow: f}); err != nil {
				return err
			}
		}
		return nil
	}
	backlog, sub := a.hub.Subscribe(req.Last, sel, followBuffer)
	defer sub.Close()
	for _, f := range backlog {
		if err := emit(flows.Item{Flow: f}); err != nil {
			return err
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.stopping:
			return nil
		case it := <-sub.C():
			if err := emit(it); err != nil {
				return err
			}
		}
	}
}
