package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/datapath"
	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// runAgent runs a real agent (datapath under a private bpffs directory, a
// dir store with one namespace) until the test ends, and returns it once it
// is ready.
func runAgent(t *testing.T) *Agent {
	t.Helper()
	return runAgentWith(t, nil)
}

// runAgentWith is runAgent with the configuration adjusted by tune.
func runAgentWith(t *testing.T, tune func(*Config)) *Agent {
	t.Helper()
	a, _ := newTestAgentWith(t, tune)
	startTestAgent(t, a)
	return a
}

// newTestAgent makes the agent runAgent runs, and returns it with its store
// directory.
func newTestAgent(t *testing.T) (*Agent, string) {
	t.Helper()
	return newTestAgentWith(t, nil)
}

// newTestAgentWith is newTestAgent with the configuration adjusted by tune.
func newTestAgentWith(t testing.TB, tune func(*Config)) (*Agent, string) {
	t.Helper()
	privileged.Require(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	ns := "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
	if err := os.WriteFile(filepath.Join(store, "ns.yaml"), []byte(ns), 0o644); err != nil {
		t.Fatal(err)
	}
	bpffs := testBPFFS(t)
	cfg := Config{Store: "dir:" + store, Socket: filepath.Join(dir, "agent.sock"),
		StateDir: filepath.Join(dir, "state"), BPFFS: bpffs, NodeName: "test"}
	if tune != nil {
		tune(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		if errors.Is(err, datapath.ErrNotSupported) {
			privileged.Unsupported(t, "datapath: %v", err)
		}
		t.Fatalf("new agent: %v", err)
	}
	return a, store
}

// testBPFFS names a private bpffs folder for one test's datapath, removed
// when the test ends.
func testBPFFS(t testing.TB) string {
	t.Helper()
	b := make([]byte, 6)
	rand.Read(b)
	dir := filepath.Join("/sys/fs/bpf", "bulkhead-agent-test-"+hex.EncodeToString(b))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startTestAgent runs a until the test ends and waits until it is ready.
// stop stops it earlier, and waits for Run to return.
func startTestAgent(t testing.TB, a *Agent) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent run: %v", err)
		}
	})
	t.Cleanup(stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := a.Status(ctx)
		if err == nil && st.Ready {
			return stop
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready after 10s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// An ADD whose attach fails is rolled back completely: the error reaches
// the plugin, and neither the endpoint nor its record (which is written
// while the attach runs) survives it.
func TestAddAttachFailureLeavesNothing(t *testing.T) {
	a := runAgent(t)
	missing := 1
	for {
		if _, err := net.InterfaceByIndex(missing); err != nil {
			break
		}
		missing++
	}
	_, err := a.AddEndpoint(context.Background(), api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: "c0ffee", IfName: "eth0"},
		Netns:       "/var/run/netns/none", HostVeth: "bh-missing", HostIfIndex: missing,
		IPs: []netip.Prefix{netip.MustParsePrefix("10.213.255.7/32")},
		Pod: api.PodRef{Namespace: "shop", Name: "ghost"},
	})
	if err == nil {
		t.Fatal("ADD onto a missing veth succeeded")
	}
	list, err := a.ListEndpoints(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Endpoints) != 0 {
		t.Errorf("endpoints after a failed ADD: %+v", list.Endpoints)
	}
	keys, err := a.records.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 0 {
		t.Errorf("records after a failed ADD: %v", keys)
	}
}
