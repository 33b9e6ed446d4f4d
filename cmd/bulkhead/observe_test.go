package main

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// lastBackend remembers the flow request it was sent and sends nothing.
type lastBackend struct {
	api.Backend
	got api.ObserveRequest
}

func (b *lastBackend) ObserveFlows(_ context.Context, req api.ObserveRequest, _ func([]byte) error) error {
	b.got = req
	return nil
}

// TestObserveFollowStartsFromNow (issue 16): `observe --follow` asks for no
// recent flows, only new ones, unless --last or --since asks for some;
// without --follow, the last 20 as before.
func TestObserveFollowStartsFromNow(t *testing.T) {
	dir, err := os.MkdirTemp("", "bhobs") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	l, err := api.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	b := &lastBackend{}
	srv := &http.Server{Handler: api.NewHandler(b, nil)}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	for _, tc := range []struct {
		args   []string
		last   int
		follow bool
	}{
		{[]string{"--follow"}, -1, true},
		{[]string{"-f", "--last", "5"}, 5, true},
		{[]string{"--follow", "--last", "20"}, 20, true},
		{[]string{"--follow", "--since", "5m"}, 20, true},
		{nil, 20, false},
	} {
		b.got = api.ObserveRequest{}
		if _, stderr, err := run(t, append([]string{"observe", "--socket", sock}, tc.args...)...); err != nil {
			t.Fatalf("observe %v: %v\n%s", tc.args, err, stderr)
		}
		if b.got.Last != tc.last || b.got.Follow != tc.follow {
			t.Errorf("observe %v: request last %d follow %v, want last %d follow %v", tc.args, b.got.Last, b.got.Follow, tc.last, tc.follow)
		}
	}
}
