package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/agent/flows"
)

// FlowHistory fetches the flows the agent holds in memory since a time, as
// JSON lines for `bulkhead policy generate --since`. The agent keeps only
// its last --flow-ring flows, so the result also says when the oldest flow
// it returned is; a window that begins before that may not be complete.
func FlowHistory(ctx context.Context, c *api.Client, since time.Time) ([]byte, time.Time, error) {
	sel, err := json.Marshal(flows.Selector{Allow: []flows.Filter{{Since: since}}})
	if err != nil {
		return nil, time.Time{}, err
	}
	var buf bytes.Buffer
	var oldest time.Time
	err = c.ObserveFlows(ctx, api.ObserveRequest{Last: 0, Selector: sel}, func(line []byte) error {
		var it flows.Item
		if err := json.Unmarshal(line, &it); err != nil {
			return fmt.Errorf("decode flow from the agent: %w", err)
		}
		if it.Flow != nil && (oldest.IsZero() || it.Flow.Time.Before(oldest)) {
			oldest = it.Flow.Time
		}
		buf.Write(line)
		buf.WriteByte('\n')
		return nil
	})
	if err != nil {
		return nil, time.Time{}, AgentError(c, err)
	}
	return buf.Bytes(), oldest, nil
}
