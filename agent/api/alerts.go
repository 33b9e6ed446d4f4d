package api

import (
	"context"
	"encoding/json"
)

// PathAlerts streams runtime alerts (--runtime-detection): the recent ones,
// then (with Follow) new ones as they are raised. The response is JSON
// lines, each {"alert":{...}} or {"lost_events":{...}} where a follower
// that lagged lost alerts.
const PathAlerts = "/v1/alerts"

// AlertObserveRequest selects alerts.
type AlertObserveRequest struct {
	// Last is how many recent alerts to send first (0: all that are kept;
	// negative: none, only new ones with Follow).
	Last int `json:"last,omitempty"`
	// Follow keeps the stream open for new alerts.
	Follow bool `json:"follow,omitempty"`
	// Filter is an alert filter ({"pods":[...],"rules":[...],
	// "severities":[...],...}); the agent validates it. Its schema belongs
	// to the flow record package, which this package must not import.
	Filter json.RawMessage `json:"filter,omitempty"`
}

// AlertStreamer is implemented by backends that serve PathAlerts. A backend
// without runtime detection answers CodeUnsupported.
type AlertStreamer interface {
	ObserveAlerts(ctx context.Context, req AlertObserveRequest, write func(line []byte) error) error
}

// ObserveAlerts calls PathAlerts and hands each line to fn until the stream
// ends, ctx is done, or fn returns an error.
func (c *Client) ObserveAlerts(ctx context.Context, req AlertObserveRequest, fn func(line []byte) error) error {
	return c.stream(ctx, PathAlerts, req, fn)
}
