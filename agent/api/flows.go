package api

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
)

// PathFlows streams flow records: the recent ones, then (with Follow) new
// ones as they happen. The response is JSON lines, each {"flow":{...}} or
// {"lost_events":{...}} where the stream has a gap, as Hubble's GetFlows
// returns them.
const PathFlows = "/v1/flows"

// ObserveRequest selects flows.
type ObserveRequest struct {
	// Last is how many recent flows to send first (0: all that are kept;
	// negative: none, only new ones with Follow).
	Last int `json:"last,omitempty"`
	// Follow keeps the stream open for new flows.
	Follow bool `json:"follow,omitempty"`
	// Selector is an allow and deny list of flow filters
	// ({"allow":[...],"deny":[...]}); the agent validates it. Its schema
	// belongs to the flow record package, which this package must not
	// import.
	Selector json.RawMessage `json:"selector,omitempty"`
}

// FlowStreamer is implemented by backends that serve PathFlows. write sends
// one JSON line; it fails once the client is gone.
type FlowStreamer interface {
	ObserveFlows(ctx context.Context, req ObserveRequest, write func(line []byte) error) error
}

// flowsHandler serves PathFlows with chunked JSON lines, flushing each.
func flowsHandler(logger *slog.Logger, fs FlowStreamer) http.Handler {
	return streamHandler(logger, fs.ObserveFlows)
}

// streamHandler serves a stream of JSON lines, flushing each: the request
// body is decoded into Req and handed to serve with the line writer. An
// error before the first line is an error response; after it, the stream
// just ends.
func streamHandler[Req any](logger *slog.Logger, serve func(context.Context, Req, func([]byte) error) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes)).Decode(&req); err != nil {
			writeError(w, logger, r, Errorf(CodeInvalidRequest, "decode request body: %w", err))
			return
		}
		flusher, _ := w.(http.Flusher)
		started := false
		write := func(line []byte) error {
			if !started {
				w.Header().Set("Content-Type", "application/x-ndjson")
				w.WriteHeader(http.StatusOK)
				started = true
			}
			if _, err := w.Write(append(line, '\n')); err != nil {
				return err
			}
			if flusher != nil {
				flusher.Flush()
			}
			return nil
		}
		err := serve(r.Context(), req, write)
		if err != nil && !started {
			writeError(w, logger, r, err)
			return
		}
		if !started { // an empty, finished stream
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
		}
	})
}

// ObserveFlows calls PathFlows and hands each line to fn until the stream
// ends, ctx is done, or fn returns an error. The client's per-request
// timeout does not apply: a followed stream lasts as long as ctx.
func (c *Client) ObserveFlows(ctx context.Context, req ObserveRequest, fn func(line []byte) error) error {
	return c.stream(ctx, PathFlows, req, fn)
}

// stream POSTs req to path and hands each line of the JSON-lines answer to
// fn.
func (c *Client) stream(ctx context.Context, path string, req any, fn func(line []byte) error) error {
	resp, err := c.send(ctx, http.MethodPost, path, req)
	if err != nil {
		return err
	}
	defer drainAndClose(resp.Body)
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, maxRequestBytes))
		var eb errorBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != nil && eb.Error.Code != "" {
			return eb.Error
		}
		return &Error{Code: codeForStatus(resp.StatusCode), Message: fmt.Sprintf("%s: http %d", path, resp.StatusCode)}
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		if err := fn(sc.Bytes()); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return Errorf(CodeUnavailable, "read %s stream: %w", path, err)
	}
	return nil
}
