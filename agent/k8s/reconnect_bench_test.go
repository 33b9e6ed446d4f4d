package k8s

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/agent/api"
	"github.com/bulkhead-io/bulkhead/policy/store"
	"github.com/bulkhead-io/bulkhead/tests/kubeapi"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// BenchmarkAPIServerReturn measures, against a real kube-apiserver and
// etcd, how long a NetworkPolicy created right after an apiserver restart
// (as soon as its /readyz answers) takes to reach a store state. The
// baseline, in the same run, is client-go's own reconnect backoff
// (ReconnectInterval < 0). Each iteration restarts the apiserver, so run
// it with a small -benchtime (for example 5x).
//
// Metrics: ms-p50 and ms-max over the iterations.
func BenchmarkAPIServerReturn(b *testing.B) {
	srv := kubeapi.Start(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	srv.InstallCRD(ctx, crdPath)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	for _, mode := range []struct {
		name     string
		interval time.Duration
	}{{"wait", 0}, {"clientgo-backoff", -1}} {
		b.Run(mode.name, func(b *testing.B) {
			src, err := NewForConfig(srv.Config(), Config{NodeName: "node-a", Debounce: 100 * time.Millisecond,
				ProbeInterval: 400 * time.Millisecond, ReconnectInterval: mode.interval})
			if err != nil {
				b.Fatal(err)
			}
			f := &fixture{src: src, updates: make(chan *store.Result, 100), fails: make(chan []api.StoreError, 100)}
			f.run(b)
			f.next(b)
			var took []time.Duration
			for i := 0; b.Loop(); i++ {
				srv.StopAPIServer()
				waitFor(b, "Connected() false", func() bool { up, _ := src.Connected(); return !up })
				srv.StartAPIServer()
				name := fmt.Sprintf("%s-%d", mode.name, i)
				start := time.Now()
				np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"}}
				if _, err := cs.NetworkingV1().NetworkPolicies("shop").Create(ctx, np, metav1.CreateOptions{}); err != nil {
					b.Fatal(err)
				}
				// client-go's backoff alone can pass fixture.until's 30 s.
				for deadline := time.After(2 * time.Minute); ; {
					var r *store.Result
					select {
					case r = <-f.updates:
					case <-deadline:
						b.Fatalf("%s: not in the store after 2 minutes", name)
					}
					if slices.Contains(policyNames(r), "np/shop/"+name) {
						break
					}
				}
				took = append(took, time.Since(start))
			}
			sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
			b.ReportMetric(float64(took[len(took)/2])/1e6, "ms-p50")
			b.ReportMetric(float64(took[len(took)-1])/1e6, "ms-max")
			b.Logf("%s: %v", mode.name, took)
		})
	}
}
