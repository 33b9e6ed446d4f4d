package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/explain"
)

// Explain asks the live agent about one connection and prints it the way
// the offline explain does.
func Explain(ctx context.Context, c *api.Client, w io.Writer, from, to string, port uint16, protocol, format string) error {
	src, err := peerOf(from)
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	dst, err := peerOf(to)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	resp, err := c.Explain(ctx, api.ExplainRequest{Source: src, Destination: dst, Protocol: strings.ToUpper(protocol), Port: port})
	if err != nil {
		return AgentError(c, err)
	}
	var r explain.Result
	if err := json.Unmarshal(resp.Detail, &r); err != nil {
		return fmt.Errorf("decode explain result: %w", err)
	}
	switch format {
	case "", "text":
		_, err = io.WriteString(w, explain.Text(r))
		if err == nil {
			_, err = fmt.Fprintf(w, "  (live state of the agent, policy revision %d)\n", resp.PolicyRevision)
		}
		return err
	case FormatJSON:
		return writeJSON(w, r)
	}
	return fmt.Errorf("-o %q: want text or json", format)
}

func peerOf(s string) (api.Peer, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return api.Peer{IP: a}, nil
	}
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		ns, name = "default", s
	}
	if ns == "" || name == "" {
		return api.Peer{}, fmt.Errorf("%q: want NS/POD or an IP", s)
	}
	return api.Peer{Pod: &api.PodRef{Namespace: ns, Name: name}}, nil
}
