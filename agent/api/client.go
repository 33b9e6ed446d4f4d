package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// DefaultTimeout bounds one request when ClientConfig.Timeout is zero. An
// ADD may wait for a program attach and a policy apply, so it is generous.
const DefaultTimeout = 10 * time.Second

// ClientConfig configures a Client.
type ClientConfig struct {
	// Socket is the agent's unix socket; DefaultSocket when empty.
	Socket string
	// Timeout bounds each request, on top of the caller's context.
	Timeout time.Duration
}

// Client calls the agent API. It is safe for concurrent use.
type Client struct {
	socket  string
	timeout time.Duration
	http    *http.Client
}

// NewClient returns a client for the agent at cfg.Socket. It does not
// connect until the first request.
func NewClient(cfg ClientConfig) *Client {
	socket := cfg.Socket
	if socket == "" {
		socket = DefaultSocket
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socket, timeout: timeout, http: &http.Client{Transport: tr}}
}

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// AddEndpoint calls PathEndpointAdd.
func (c *Client) AddEndpoint(ctx context.Context, req EndpointAddRequest) (EndpointAddResponse, error) {
	var resp EndpointAddResponse
	return resp, c.do(ctx, http.MethodPost, PathEndpointAdd, req, &resp)
}

// DeleteEndpoint calls PathEndpointDel.
func (c *Client) DeleteEndpoint(ctx context.Context, req EndpointDelRequest) (EndpointDelResponse, error) {
	var resp EndpointDelResponse
	return resp, c.do(ctx, http.MethodPost, PathEndpointDel, req, &resp)
}

// CheckEndpoint calls PathEndpointCheck.
func (c *Client) CheckEndpoint(ctx context.Context, req EndpointCheckRequest) (EndpointCheckResponse, error) {
	var resp EndpointCheckResponse
	return resp, c.do(ctx, http.MethodPost, PathEndpointCheck, req, &resp)
}

// GCEndpoints calls PathEndpointGC.
func (c *Client) GCEndpoints(ctx context.Context, req GCRequest) (GCResponse, error) {
	var resp GCResponse
	return resp, c.do(ctx, http.MethodPost, PathEndpointGC, req, &resp)
}

// Explain calls PathExplain.
func (c *Client) Explain(ctx context.Context, req ExplainRequest) (ExplainResponse, error) {
	var resp ExplainResponse
	return resp, c.do(ctx, http.MethodPost, PathExplain, req, &resp)
}

// Status calls PathStatus.
func (c *Client) Status(ctx context.Context) (StatusResponse, error) {
	var resp StatusResponse
	return resp, c.do(ctx, http.MethodGet, PathStatus, nil, &resp)
}

// ListEndpoints calls PathEndpoints.
func (c *Client) ListEndpoints(ctx context.Context) (EndpointList, error) {
	var resp EndpointList
	return resp, c.do(ctx, http.MethodGet, PathEndpoints, nil, &resp)
}

// ListIdentities calls PathIdentities.
func (c *Client) ListIdentities(ctx context.Context) (IdentityList, error) {
	var resp IdentityList
	return resp, c.do(ctx, http.MethodGet, PathIdentities, nil, &resp)
}

// do sends one request. Failures to reach the agent, including timeouts,
// come back as CodeUnavailable so callers can tell "agent down" from "agent
// said no".
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	if v, ok := in.(validator); ok {
		if err := v.Validate(); err != nil {
			return Errorf(CodeInvalidRequest, "%s: %w", path, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer drainAndClose(resp.Body)

	data, err := io.ReadAll(io.LimitReader(resp.Body, maxRequestBytes))
	if err != nil {
		return Errorf(CodeUnavailable, "read %s response from %s: %w", path, c.socket, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != nil && eb.Error.Code != "" {
			return eb.Error
		}
		return &Error{Code: codeForStatus(resp.StatusCode), Message: fmt.Sprintf("%s: http %d: %s", path, resp.StatusCode, bytes.TrimSpace(truncate(data, 256)))}
	}
	if err := json.Unmarshal(data, out); err != nil {
		return Errorf(CodeInternal, "decode %s response: %w", path, err)
	}
	return nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// send issues one request with in as its JSON body (none when nil).
// Failures to reach the agent come back as CodeUnavailable.
func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, Errorf(CodeInvalidRequest, "encode %s request: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://bulkhead-agent"+path, body)
	if err != nil {
		return nil, Errorf(CodeInvalidRequest, "build %s request: %w", path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		// *url.Error repeats the fake URL; the dial error names the socket.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, Errorf(CodeUnavailable, "%s %s: %w", method, path, err)
	}
	return resp, nil
}
