package cnichain

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// FakeAgent is an in-memory api.Backend behind a real unix socket. It
// stands in for bulkhead-agent in tests below the end-to-end tier: it
// enforces nothing, but answers the way the plugin contract says the agent
// must (idempotent ADD, unknown DEL is fine, CHECK compares the veth index).
type FakeAgent struct {
	// Socket is the path the fake listens on.
	Socket string

	srv  *http.Server
	done chan struct{}

	mu        sync.Mutex
	ready     bool
	enforce   bool
	failAdd   error
	failDel   error
	endpoints map[api.EndpointKey]api.EndpointAddRequest
	detached  map[api.EndpointKey]bool
	stale     map[api.EndpointKey]bool
	calls     map[string]int
}

// FakeAgent must keep up with the API the real agent serves.
var _ api.Backend = (*FakeAgent)(nil)

// SocketPath returns a fresh socket path in a short temporary directory
// (sun_path is limited to 108 bytes, and t.TempDir paths can be longer).
func SocketPath(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bhsock")
	if err != nil {
		t.Fatalf("create socket dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "agent.sock")
}

// StartFakeAgent listens on socket and serves until the test ends or Stop
// is called. It starts ready and enforcing.
func StartFakeAgent(t testing.TB, socket string) *FakeAgent {
	t.Helper()
	f := &FakeAgent{
		Socket:    socket,
		ready:     true,
		enforce:   true,
		endpoints: map[api.EndpointKey]api.EndpointAddRequest{},
		detached:  map[api.EndpointKey]bool{},
		stale:     map[api.EndpointKey]bool{},
		calls:     map[string]int{},
		done:      make(chan struct{}),
	}
	l, err := api.Listen(socket)
	if err != nil {
		t.Fatalf("fake agent: %v", err)
	}
	f.srv = &http.Server{Handler: api.NewHandler(f, nil)}
	go func() {
		defer close(f.done)
		_ = f.srv.Serve(l)
	}()
	t.Cleanup(f.Stop)
	return f
}

// Stop closes the socket, as a crashed or stopped agent would. It is safe
// to call more than once.
func (f *FakeAgent) Stop() {
	_ = f.srv.Close()
	<-f.done
}

// SetReady makes the fake report ready or answer every endpoint call with
// api.CodeNotReady, like an agent that is still restoring state.
func (f *FakeAgent) SetReady(ready bool) { f.mu.Lock(); f.ready = ready; f.mu.Unlock() }

// SetEnforce makes ADD answer Enforced=false when false.
func (f *FakeAgent) SetEnforce(on bool) { f.mu.Lock(); f.enforce = on; f.mu.Unlock() }

// FailAdd makes ADD fail with err (nil restores success).
func (f *FakeAgent) FailAdd(err error) { f.mu.Lock(); f.failAdd = err; f.mu.Unlock() }

// FailDel makes DEL fail with err (nil restores success).
func (f *FakeAgent) FailDel(err error) { f.mu.Lock(); f.failDel = err; f.mu.Unlock() }

// Detach makes CHECK report the endpoint's programs as not attached.
func (f *FakeAgent) Detach(k api.EndpointKey) { f.mu.Lock(); f.detached[k] = true; f.mu.Unlock() }

// MakeStale makes CHECK report the endpoint's identity as stale.
func (f *FakeAgent) MakeStale(k api.EndpointKey) { f.mu.Lock(); f.stale[k] = true; f.mu.Unlock() }

// Endpoints returns the endpoints the fake holds.
func (f *FakeAgent) Endpoints() map[api.EndpointKey]api.EndpointAddRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[api.EndpointKey]api.EndpointAddRequest, len(f.endpoints))
	for k, v := range f.endpoints {
		out[k] = v
	}
	return out
}

// Calls returns how often each Backend method was called.
func (f *FakeAgent) Calls(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[method]
}

// TotalCalls returns how many Backend calls the fake served.
func (f *FakeAgent) TotalCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

func (f *FakeAgent) enter(method string) error {
	f.calls[method]++
	if !f.ready {
		return api.Errorf(api.CodeNotReady, "fake agent not ready")
	}
	return nil
}

// AddEndpoint implements api.Backend.
func (f *FakeAgent) AddEndpoint(_ context.Context, req api.EndpointAddRequest) (api.EndpointAddResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("AddEndpoint"); err != nil {
		return api.EndpointAddResponse{}, err
	}
	if f.failAdd != nil {
		return api.EndpointAddResponse{}, f.failAdd
	}
	f.endpoints[req.EndpointKey] = req
	delete(f.detached, req.EndpointKey)
	delete(f.stale, req.EndpointKey)
	return api.EndpointAddResponse{Enforced: f.enforce, IdentityID: 1000, PolicyRevision: 1}, nil
}

// DeleteEndpoint implements api.Backend.
func (f *FakeAgent) DeleteEndpoint(_ context.Context, req api.EndpointDelRequest) (api.EndpointDelResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("DeleteEndpoint"); err != nil {
		return api.EndpointDelResponse{}, err
	}
	if f.failDel != nil {
		return api.EndpointDelResponse{}, f.failDel
	}
	_, ok := f.endpoints[req.EndpointKey]
	delete(f.endpoints, req.EndpointKey)
	return api.EndpointDelResponse{Removed: ok}, nil
}

// CheckEndpoint implements api.Backend.
func (f *FakeAgent) CheckEndpoint(_ context.Context, req api.EndpointCheckRequest) (api.EndpointCheckResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("CheckEndpoint"); err != nil {
		return api.EndpointCheckResponse{}, err
	}
	ep, ok := f.endpoints[req.EndpointKey]
	if !ok {
		return api.EndpointCheckResponse{}, api.Errorf(api.CodeEndpointNotFound, "endpoint %s/%s", req.ContainerID, req.IfName)
	}
	return api.EndpointCheckResponse{
		Known:           true,
		Attached:        ep.HostIfIndex == req.HostIfIndex && !f.detached[req.EndpointKey],
		IdentityCurrent: !f.stale[req.EndpointKey],
	}, nil
}

// GCEndpoints implements api.Backend.
func (f *FakeAgent) GCEndpoints(_ context.Context, req api.GCRequest) (api.GCResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("GCEndpoints"); err != nil {
		return api.GCResponse{}, err
	}
	var resp api.GCResponse
	for k, ep := range f.endpoints {
		if ep.Network == req.Network && !slices.Contains(req.ValidAttachments, k) {
			delete(f.endpoints, k)
			resp.Removed = append(resp.Removed, k)
		}
	}
	return resp, nil
}

// Status implements api.Backend.
func (f *FakeAgent) Status(context.Context) (api.StatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["Status"]++
	st := api.StatusResponse{Ready: f.ready, Endpoints: len(f.endpoints), Datapath: "fake"}
	if !f.ready {
		st.Reason = "fake agent not ready"
	}
	return st, nil
}

// ListEndpoints implements api.Backend.
func (f *FakeAgent) ListEndpoints(context.Context) (api.EndpointList, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out api.EndpointList
	for k, ep := range f.endpoints {
		out.Endpoints = append(out.Endpoints, api.EndpointInfo{
			EndpointKey: k, Netns: ep.Netns, HostVeth: ep.HostVeth, HostIfIndex: ep.HostIfIndex,
			IPs: ep.IPs, Pod: ep.Pod, IdentityID: 1000, Attached: !f.detached[k],
		})
	}
	return out, nil
}

// ListIdentities implements api.Backend.
func (f *FakeAgent) ListIdentities(context.Context) (api.IdentityList, error) {
	return api.IdentityList{Identities: []api.Identity{{ID: 1000, Namespace: "default"}}}, nil
}

// Explain implements api.Backend. The fake has no policy engine.
func (f *FakeAgent) Explain(context.Context, api.ExplainRequest) (api.ExplainResponse, error) {
	return api.ExplainResponse{}, api.Errorf(api.CodeUnsupported, "fake agent cannot explain")
}
