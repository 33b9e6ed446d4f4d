package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// quarantineBackend is an agent that serves the quarantine routes from
// canned answers and remembers what it was asked.
type quarantineBackend struct {
	api.Backend

	mu       sync.Mutex
	list     api.QuarantineList
	resp     api.QuarantineResponse
	err      error
	adds     []api.QuarantineRequest
	releases []api.QuarantineReleaseRequest
}

func (b *quarantineBackend) ListQuarantines(context.Context) (api.QuarantineList, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.list, b.err
}

func (b *quarantineBackend) Quarantine(_ context.Context, req api.QuarantineRequest) (api.QuarantineResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.adds = append(b.adds, req)
	return b.resp, b.err
}

func (b *quarantineBackend) ReleaseQuarantine(_ context.Context, req api.QuarantineReleaseRequest) (api.QuarantineResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.releases = append(b.releases, req)
	return b.resp, b.err
}

func (b *quarantineBackend) asked() ([]api.QuarantineRequest, []api.QuarantineReleaseRequest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.adds), slices.Clone(b.releases)
}

func (b *quarantineBackend) answer(resp api.QuarantineResponse) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.resp = resp
}

func (b *quarantineBackend) calls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.adds) + len(b.releases)
}

// serveAgent serves b's API on a unix socket for the test's life and
// returns the socket.
func serveAgent(t *testing.T, b api.Backend) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bhq") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	l, err := api.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: api.NewHandler(b, nil)}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return sock
}

func byAlert(since time.Time) api.Quarantine {
	return api.Quarantine{
		Pod:        api.PodRef{Namespace: "shop", Name: "web-1"},
		Endpoint:   api.EndpointKey{ContainerID: "3f2a9c1d7b8e44aa0123456789abcdef", IfName: "eth0"},
		EndpointID: 7, Number: 1,
		AlertID: "a-0001", RuleID: "BH-RT-002", Since: since,
	}
}

func byOperator(since time.Time) api.Quarantine {
	return api.Quarantine{
		Pod:        api.PodRef{Namespace: "ops", Name: "debug"},
		Endpoint:   api.EndpointKey{ContainerID: "c0ffee", IfName: "eth0"},
		EndpointID: 9, Number: 2,
		Reason: "INC-4211: reverse shell", Since: since,
	}
}

func TestQuarantineList(t *testing.T) {
	since := time.Now().Add(-90 * time.Minute).Truncate(time.Second)
	b := &quarantineBackend{list: api.QuarantineList{Quarantines: []api.Quarantine{byAlert(since), byOperator(since)}}}
	sock := serveAgent(t, b)

	out, _, err := run(t, "quarantine", "list", "--socket", sock)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[0]), " ") != "POD ENDPOINT SINCE BY" {
		t.Fatalf("want a header and two rows:\n%s", out)
	}
	stamp := since.Local().Format(time.RFC3339)
	// Sorted by pod: ops/debug before shop/web-1.
	for i, want := range [][]string{
		{"ops/debug", "c0ffee/eth0", stamp, " ago)", "operator: INC-4211: reverse shell"},
		{"shop/web-1", "3f2a9c1d7b8e/eth0", stamp, " ago)", "alert a-0001 BH-RT-002"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i+1], w) {
				t.Errorf("row %d lacks %q:\n%s", i+1, w, out)
			}
		}
	}
	if strings.Contains(out, "3f2a9c1d7b8e44") {
		t.Errorf("container ID not shortened:\n%s", out)
	}

	out, _, err = run(t, "quarantine", "list", "--socket", sock, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var got api.QuarantineList
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// JSON keeps the agent's order and every field.
	for i := range got.Quarantines {
		got.Quarantines[i].Since = got.Quarantines[i].Since.Local()
		b.list.Quarantines[i].Since = b.list.Quarantines[i].Since.Local()
	}
	if !reflect.DeepEqual(got, b.list) {
		t.Errorf("json: got %+v, want %+v", got, b.list)
	}

	if _, _, err := run(t, "quarantine", "list", "--socket", sock, "-o", "yaml"); err == nil || !strings.Contains(err.Error(), "want table or json") {
		t.Errorf("-o yaml: %v", err)
	}
	// A group without a subcommand shows its help, as `policy` does, but
	// a mistyped verb fails.
	if out, _, err := run(t, "quarantine", "--socket", sock); err != nil || !strings.Contains(out, "release") {
		t.Errorf("quarantine alone: %v\n%s", err, out)
	}
	if _, _, err := run(t, "quarantine", "relase", "shop/web-1", "--socket", sock); err == nil || !strings.Contains(err.Error(), `unknown command "relase"`) || !strings.Contains(err.Error(), "did you mean release?") {
		t.Errorf("mistyped verb: %v", err)
	}
}

func TestQuarantineListEmpty(t *testing.T) {
	sock := serveAgent(t, &quarantineBackend{})
	out, _, err := run(t, "quarantine", "list", "--socket", sock)
	if err != nil || out != "No pod is quarantined on this node.\n" {
		t.Errorf("table: %v %q", err, out)
	}
	out, _, err = run(t, "quarantine", "list", "--socket", sock, "-o", "json")
	var raw map[string]json.RawMessage
	if err != nil || json.Unmarshal([]byte(out), &raw) != nil || string(raw["quarantines"]) != "[]" {
		t.Errorf("json: want an empty list, not null: %v %q", err, out)
	}
}

func TestQuarantineAdd(t *testing.T) {
	now := time.Now()
	b := &quarantineBackend{resp: api.QuarantineResponse{Quarantines: []api.Quarantine{byAlert(now)}, Changed: true}}
	sock := serveAgent(t, b)

	out, _, err := run(t, "quarantine", "add", "shop/web-1", "--reason", "INC-4211: reverse shell", "--socket", sock)
	want := "quarantined shop/web-1 (endpoint 3f2a9c1d7b8e/eth0): all its traffic is dropped but DNS to the listed resolvers\n"
	if err != nil || out != want {
		t.Errorf("add: %v\n got %q\nwant %q", err, out, want)
	}
	wantReq := api.QuarantineRequest{Pod: api.PodRef{Namespace: "shop", Name: "web-1"}, Reason: "INC-4211: reverse shell"}
	if adds, _ := b.asked(); len(adds) != 1 || adds[0] != wantReq {
		t.Errorf("agent was asked %+v, want %+v", adds, wantReq)
	}

	second := byAlert(now)
	second.Endpoint.IfName = "net1"
	b.answer(api.QuarantineResponse{Quarantines: []api.Quarantine{byAlert(now), second}, Changed: true})
	out, _, err = run(t, "quarantine", "add", "shop/web-1", "--reason", "x", "--socket", sock)
	if err != nil || !strings.Contains(out, "(endpoints 3f2a9c1d7b8e/eth0, 3f2a9c1d7b8e/net1)") {
		t.Errorf("two endpoints: %v %q", err, out)
	}

	b.answer(api.QuarantineResponse{Changed: false})
	out, _, err = run(t, "quarantine", "add", "shop/web-1", "--reason", "again", "--socket", sock)
	if err != nil || out != "shop/web-1 was already quarantined\n" {
		t.Errorf("unchanged: %v %q", err, out)
	}

	out, _, err = run(t, "quarantine", "add", "shop/web-1", "--reason", "again", "--socket", sock, "-o", "json")
	var resp api.QuarantineResponse
	if err != nil || json.Unmarshal([]byte(out), &resp) != nil || resp.Changed {
		t.Errorf("json: %v %q", err, out)
	}

	before := b.calls()
	for _, args := range [][]string{
		{"shop/web-1"},
		{"shop/web-1", "--reason", ""},
		{"shop/web-1", "--reason", "   "},
	} {
		_, _, err := run(t, append([]string{"quarantine", "add", "--socket", sock}, args...)...)
		if err == nil || !strings.Contains(err.Error(), "--reason is required") {
			t.Errorf("%v: got %v, want --reason is required", args, err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"shop/web-1", "--reason", "two\nlines"}, "one line"},
		{[]string{"shop/web-1", "--reason", strings.Repeat("x", 300)}, "at most 256 bytes"},
		{[]string{"shop/web-1", "--reason", "x", "-o", "table"}, "want text or json"},
	} {
		_, _, err := run(t, append([]string{"quarantine", "add", "--socket", sock}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.args, err, tc.want)
		}
	}
	if n := b.calls(); n != before {
		t.Errorf("the agent was asked %d times for invalid commands", n-before)
	}
}

// TestQuarantinePodArg: the pod is exactly NAMESPACE/NAME, checked before
// the agent is asked (here there is none to ask).
func TestQuarantinePodArg(t *testing.T) {
	none := filepath.Join(t.TempDir(), "none.sock")
	for _, verb := range [][]string{{"add", "--reason", "x"}, {"release"}} {
		for _, pod := range []string{"web-1", "/web-1", "shop/", "/", "shop/web/1", ""} {
			args := append([]string{"quarantine", "--socket", none, verb[0], pod}, verb[1:]...)
			_, _, err := run(t, args...)
			if err == nil || !strings.Contains(err.Error(), "want NAMESPACE/NAME") {
				t.Errorf("%s %q: got %v, want NAMESPACE/NAME", verb[0], pod, err)
			}
		}
		for _, args := range [][]string{{}, {"shop/a", "shop/b"}} {
			_, _, err := run(t, append(append([]string{"quarantine", "--socket", none}, verb...), args...)...)
			if err == nil || !strings.Contains(err.Error(), "give one pod") {
				t.Errorf("%s %q: got %v, want give one pod", verb[0], args, err)
			}
		}
	}
	// A bad pod is reported before a missing reason.
	if _, _, err := run(t, "quarantine", "add", "web-1", "--socket", none); err == nil || !strings.Contains(err.Error(), "want NAMESPACE/NAME") {
		t.Errorf("bad pod, no reason: %v", err)
	}
}

func TestQuarantineRelease(t *testing.T) {
	b := &quarantineBackend{resp: api.QuarantineResponse{Quarantines: []api.Quarantine{byOperator(time.Now())}, Changed: true}}
	sock := serveAgent(t, b)
	out, _, err := run(t, "quarantine", "release", "ops/debug", "--socket", sock)
	if err != nil || out != "released ops/debug\n" {
		t.Errorf("release: %v %q", err, out)
	}
	want := api.QuarantineReleaseRequest{Pod: api.PodRef{Namespace: "ops", Name: "debug"}}
	if _, rels := b.asked(); len(rels) != 1 || rels[0] != want {
		t.Errorf("agent was asked %+v, want %+v", rels, want)
	}
	b.answer(api.QuarantineResponse{})
	out, _, err = run(t, "quarantine", "release", "ops/debug", "--socket", sock)
	if err != nil || out != "ops/debug was not quarantined\n" {
		t.Errorf("unchanged: %v %q", err, out)
	}
	out, _, err = run(t, "quarantine", "release", "ops/debug", "--socket", sock, "-o", "json")
	var resp api.QuarantineResponse
	if err != nil || json.Unmarshal([]byte(out), &resp) != nil || resp.Changed {
		t.Errorf("json: %v %q", err, out)
	}
}

// TestQuarantineAgentErrors: the agent's refusal reaches the user with its
// code and message, and a missing or older agent is told apart.
func TestQuarantineAgentErrors(t *testing.T) {
	b := &quarantineBackend{err: api.Errorf(api.CodeEndpointNotFound, "pod shop/nope has no endpoint on this node")}
	sock := serveAgent(t, b)
	for _, args := range [][]string{
		{"add", "shop/nope", "--reason", "x"},
		{"release", "shop/nope"},
		{"list"},
	} {
		out, _, err := run(t, append([]string{"quarantine", "--socket", sock}, args...)...)
		if !errors.Is(err, api.ErrEndpointNotFound) || !strings.Contains(err.Error(), "pod shop/nope has no endpoint on this node") || out != "" {
			t.Errorf("%v: got %v, output %q", args, err, out)
		}
	}

	none := filepath.Join(t.TempDir(), "none.sock")
	if _, _, err := run(t, "quarantine", "list", "--socket", none); !errors.Is(err, api.ErrUnavailable) || !strings.Contains(err.Error(), "cannot reach bulkhead-agent") {
		t.Errorf("no agent: %v", err)
	}

	// An agent whose backend cannot quarantine answers unsupported.
	old := serveAgent(t, &lastBackend{})
	if _, _, err := run(t, "quarantine", "add", "shop/web-1", "--reason", "x", "--socket", old); !errors.Is(err, api.ErrUnsupported) {
		t.Errorf("agent without quarantine: %v", err)
	}
}
