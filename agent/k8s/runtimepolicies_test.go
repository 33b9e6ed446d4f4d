package k8s

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestWarnRuntimePolicies: BulkheadRuntimePolicies in the cluster, which
// this store does not read, are an error in the log, never silently
// dropped; their removal is said too.
func TestWarnRuntimePolicies(t *testing.T) {
	rp := &unstructured.Unstructured{}
	rp.SetAPIVersion("bulkhead.io/v1alpha1")
	rp.SetKind("BulkheadRuntimePolicy")
	rp.SetNamespace("shop")
	rp.SetName("guard")
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{RuntimePolicies: "BulkheadRuntimePolicyList"}, rp)
	var logs syncBuf
	s := &Source{cfg: Config{Dynamic: dyn, Logger: slog.New(slog.NewTextHandler(&logs, nil))}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.warnRuntimePolicies(ctx, 10*time.Millisecond) }()
	defer func() { cancel(); <-done }()
	waitLog := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), want); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("log %q: want %q", logs.String(), want)
			}
		}
	}
	waitLog("level=ERROR msg=\"the cluster has BulkheadRuntimePolicies")
	waitLog("example=shop/guard")
	if n := strings.Count(logs.String(), "level=ERROR"); n != 1 {
		t.Errorf("%d errors logged, want one until the state changes: %s", n, logs.String())
	}
	if err := dyn.Resource(RuntimePolicies).Namespace("shop").Delete(context.Background(), "guard", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitLog("no BulkheadRuntimePolicies left")
}
