package api_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// recorder is a Backend that records what it received and returns canned
// answers, so tests see exactly what crosses the socket.
type recorder struct {
	mu     sync.Mutex
	adds   []api.EndpointAddRequest
	err    error
	block  chan struct{}
	status api.StatusResponse
}

func (r *recorder) AddEndpoint(ctx context.Context, req api.EndpointAddRequest) (api.EndpointAddResponse, error) {
	if r.block != nil {
		select {
		case <-r.block:
		case <-ctx.Done():
			return api.EndpointAddResponse{}, ctx.Err()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return api.EndpointAddResponse{}, r.err
	}
	r.adds = append(r.adds, req)
	return api.EndpointAddResponse{Enforced: true, IdentityID: 42, SPIFFEID: "spiffe://cluster.local/ns/a/sa/b", PolicyRevision: 7}, nil
}

func (r *recorder) DeleteEndpoint(_ context.Context, req api.EndpointDelRequest) (api.EndpointDelResponse, error) {
	return api.EndpointDelResponse{Removed: req.ContainerID == "known"}, r.err
}

func (r *recorder) CheckEndpoint(_ context.Context, req api.EndpointCheckRequest) (api.EndpointCheckResponse, error) {
	return api.EndpointCheckResponse{Known: true, Attached: req.HostIfIndex == 5, IdentityCurrent: true}, r.err
}

func (r *recorder) GCEndpoints(_ context.Context, req api.GCRequest) (api.GCResponse, error) {
	return api.GCResponse{Removed: []api.EndpointKey{{ContainerID: "gone-" + req.Network, IfName: "eth0"}}}, r.err
}

func (r *recorder) Status(context.Context) (api.StatusResponse, error) { return r.status, r.err }

func (r *recorder) ListEndpoints(context.Context) (api.EndpointList, error) {
	return api.EndpointList{Endpoints: []api.EndpointInfo{{EndpointKey: api.EndpointKey{ContainerID: "c1", IfName: "eth0"}, HostIfIndex: 9}}}, r.err
}

func (r *recorder) ListIdentities(context.Context) (api.IdentityList, error) {
	return api.IdentityList{Identities: []api.Identity{{ID: 42, Labels: map[string]string{"app": "x"}}}}, r.err
}

func (r *recorder) Explain(_ context.Context, req api.ExplainRequest) (api.ExplainResponse, error) {
	return api.ExplainResponse{Verdict: "DENIED", Reason: req.Protocol}, r.err
}

func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bhapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "agent.sock")
}

func serve(t *testing.T, b api.Backend) (*api.Client, string) {
	t.Helper()
	path := socketPath(t)
	l, err := api.Listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	srv := &http.Server{Handler: api.NewHandler(b, nil)}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	c := api.NewClient(api.ClientConfig{Socket: path, Timeout: 2 * time.Second})
	t.Cleanup(c.Close)
	return c, path
}

func addReq() api.EndpointAddRequest {
	return api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: "c1", IfName: "eth0"},
		Network:     "net",
		Netns:       "/var/run/netns/x",
		PodIfIndex:  2,
		HostVeth:    "veth1",
		HostIfIndex: 5,
		IPs:         []netip.Prefix{netip.MustParsePrefix("10.213.0.5/24"), netip.MustParsePrefix("fd00:213::5/64")},
		Pod:         api.PodRef{Namespace: "ns", Name: "p", UID: "u"},
	}
}

func TestRoundTrip(t *testing.T) {
	rec := &recorder{status: api.StatusResponse{Ready: true, Endpoints: 3, StoreErrors: []api.StoreError{{File: "a.yaml", Line: 4, Message: "bad"}}}}
	c, _ := serve(t, rec)
	ctx := context.Background()

	add, err := c.AddEndpoint(ctx, addReq())
	if err != nil {
		t.Fatalf("AddEndpoint: %v", err)
	}
	if !add.Enforced || add.IdentityID != 42 || add.PolicyRevision != 7 {
		t.Errorf("AddEndpoint response = %+v", add)
	}
	if len(rec.adds) != 1 {
		t.Fatalf("backend got %d adds, want 1", len(rec.adds))
	}
	got, want := rec.adds[0], addReq()
	if got.ContainerID != want.ContainerID || got.HostIfIndex != want.HostIfIndex || got.Pod != want.Pod ||
		got.Network != want.Network || len(got.IPs) != 2 || got.IPs[0] != want.IPs[0] || got.IPs[1] != want.IPs[1] {
		t.Errorf("backend got %+v, want %+v", got, want)
	}

	del, err := c.DeleteEndpoint(ctx, api.EndpointDelRequest{EndpointKey: api.EndpointKey{ContainerID: "known", IfName: "eth0"}})
	if err != nil || !del.Removed {
		t.Errorf("DeleteEndpoint = %+v, %v", del, err)
	}
	chk, err := c.CheckEndpoint(ctx, api.EndpointCheckRequest{EndpointKey: api.EndpointKey{ContainerID: "c1", IfName: "eth0"}, HostIfIndex: 6})
	if err != nil || chk.Healthy() {
		t.Errorf("CheckEndpoint wrong veth = %+v, %v; want unhealthy", chk, err)
	}
	gc, err := c.GCEndpoints(ctx, api.GCRequest{Network: "n1", ValidAttachments: []api.EndpointKey{}})
	if err != nil || len(gc.Removed) != 1 || gc.Removed[0].ContainerID != "gone-n1" {
		t.Errorf("GCEndpoints = %+v, %v", gc, err)
	}
	st, err := c.Status(ctx)
	if err != nil || !st.Ready || st.Endpoints != 3 || len(st.StoreErrors) != 1 || st.StoreErrors[0].Line != 4 {
		t.Errorf("Status = %+v, %v", st, err)
	}
	eps, err := c.ListEndpoints(ctx)
	if err != nil || len(eps.Endpoints) != 1 || eps.Endpoints[0].HostIfIndex != 9 {
		t.Errorf("ListEndpoints = %+v, %v", eps, err)
	}
	ids, err := c.ListIdentities(ctx)
	if err != nil || len(ids.Identities) != 1 || ids.Identities[0].Labels["app"] != "x" {
		t.Errorf("ListIdentities = %+v, %v", ids, err)
	}
	ex, err := c.Explain(ctx, api.ExplainRequest{
		Source:      api.Peer{Pod: &api.PodRef{Namespace: "a", Name: "b"}},
		Destination: api.Peer{IP: netip.MustParseAddr("10.213.0.9")},
		Protocol:    "TCP", Port: 80,
	})
	if err != nil || ex.Verdict != "DENIED" || ex.Reason != "TCP" {
		t.Errorf("Explain = %+v, %v", ex, err)
	}
}

func TestBackendErrorCodes(t *testing.T) {
	tests := []struct {
		name    string
		backend error
		want    error
	}{
		{"not found", api.Errorf(api.CodeEndpointNotFound, "endpoint %s", "c1"), api.ErrEndpointNotFound},
		{"not ready", api.Errorf(api.CodeNotReady, "restoring"), api.ErrNotReady},
		{"conflict", api.Errorf(api.CodeConflict, "other veth"), api.ErrConflict},
		{"plain error is internal", errors.New("boom"), api.ErrInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := serve(t, &recorder{err: tt.backend})
			_, err := c.AddEndpoint(context.Background(), addReq())
			if !errors.Is(err, tt.want) {
				t.Fatalf("AddEndpoint error = %v, want code %s", err, api.CodeOf(tt.want))
			}
			for _, other := range []error{api.ErrUnavailable, api.ErrInvalidRequest} {
				if errors.Is(err, other) {
					t.Errorf("error %v also matches %v", err, other)
				}
			}
		})
	}
}

func TestInvalidRequests(t *testing.T) {
	c, path := serve(t, &recorder{})
	bad := addReq()
	bad.HostIfIndex = 0
	if _, err := c.AddEndpoint(context.Background(), bad); !errors.Is(err, api.ErrInvalidRequest) {
		t.Errorf("client-side validation: err = %v, want invalid_request", err)
	}

	// The server validates too: an older or foreign client may skip it.
	raw := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
	t.Cleanup(raw.CloseIdleConnections)
	for _, body := range []string{`{"containerID":"c"}`, `not json`, `{"hostIfIndex":"x"}`} {
		resp, err := raw.Post("http://x"+api.PathEndpointAdd, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("body %q: status %d, want 400", body, resp.StatusCode)
		}
	}
	resp, err := raw.Get("http://x/v2/nothing")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNotImplemented {
		t.Errorf("unknown path: status %d, want 501", resp.StatusCode)
	}
	resp, err = raw.Get("http://x" + api.PathEndpointAdd)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		t.Errorf("GET on a POST path succeeded")
	}
}

func TestClientUnavailable(t *testing.T) {
	path := socketPath(t)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient(api.ClientConfig{Socket: path, Timeout: time.Second})
	_, err := c.Status(context.Background())
	if !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("Status without agent: err = %v, want unavailable", err)
	}
	if !strings.Contains(err.Error(), c.Socket()) {
		t.Errorf("error %q does not name the socket", err)
	}

	// A crashed agent leaves its socket behind: connection refused.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: c.Socket(), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	_ = stale.Close()
	if _, err := c.AddEndpoint(context.Background(), addReq()); !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("AddEndpoint on a stale socket: err = %v, want unavailable", err)
	}
}

func TestClientTimeoutIsUnavailable(t *testing.T) {
	rec := &recorder{block: make(chan struct{})}
	defer close(rec.block)
	path := socketPath(t)
	l, err := api.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: api.NewHandler(rec, nil)}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	c := api.NewClient(api.ClientConfig{Socket: path, Timeout: 100 * time.Millisecond})
	defer c.Close()
	if _, err := c.AddEndpoint(context.Background(), addReq()); !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("hung agent: err = %v, want unavailable", err)
	}
}

func TestListenSocket(t *testing.T) {
	path := socketPath(t)
	l, err := api.Listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, want socket 0600", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil || di.Mode().Perm() != 0o700 {
		t.Errorf("socket dir mode = %v (%v), want 0700", di.Mode(), err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("socket dir holds %d entries, want only the socket", len(entries))
	}

	// A live socket is not stolen.
	if _, err := api.Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second Listen on a live socket: err = %v, want in use", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Close left the socket behind: %v", err)
	}

	// A stale socket (nobody accepting) is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	_ = stale.Close()
	l2, err := api.Listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	_ = l2.Close()

	// Something that is not a socket is never removed.
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Listen(path); err == nil {
		t.Errorf("Listen over a regular file succeeded")
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "x" {
		t.Errorf("regular file was touched: %q, %v", b, err)
	}
}

func TestAddRequestValidateMAC(t *testing.T) {
	base := api.EndpointAddRequest{EndpointKey: api.EndpointKey{ContainerID: "c1", IfName: "eth0"}, Netns: "/n",
		HostVeth: "veth0", HostIfIndex: 3}
	for mac, ok := range map[string]bool{
		"":                        true, // the agent reads it from the netns
		"aa:bb:cc:dd:ee:02":       true,
		"zz":                      false,
		"00:00:00:00:00:00":       false,
		"01:00:5e:00:00:01":       false, // multicast
		"00:11:22:33:44:55:66:77": false,
	} {
		r := base
		r.MAC = mac
		if err := r.Validate(); (err == nil) != ok {
			t.Errorf("mac %q: Validate() = %v, want ok=%v", mac, err, ok)
		}
	}
}
